"""The tokenizer bridge: a TF WordPiece / BERT tokenizer as the equivalent Hugging Face fast tokenizer.

String graphs do not cross into torch (torch has no string tensors), and a TF tokenizer graph
(``tensorflow_text``'s regex splits and wordpiece lookups) has no exact ONNX form that torch can
run. A WordPiece tokenizer is fully described by its vocabulary and a few flags, though, so the
same ids come out of ``transformers.BertTokenizerFast`` (Rust ``tokenizers``) built on the same
vocabulary with the same normalisation. :func:`hf_tokenizer_from_tf` builds it;
:func:`check_identical_ids` proves it on the user's own text, and the bridge refuses what it cannot
reproduce (OOV hash buckets instead of an unknown token, another suffix indicator than the
vocabulary's).

Sources (what :func:`hf_tokenizer_from_tf` reads from each):

===============================================  =============================================
``tensorflow_text.BertTokenizer``                vocabulary table, ``lower_case`` (= lowercase +
                                                 NFD + strip accents), ``normalization_form``,
                                                 unknown token, suffix indicator
``tensorflow_text.WordpieceTokenizer``           vocabulary table, unknown token, suffix
                                                 indicator (no lower-casing: text is pre-split)
``keras_hub.tokenizers.WordPieceTokenizer``      ``get_vocabulary()``, ``lowercase``,
(and its ``BertTokenizer`` subclass)             ``strip_accents``, ``split_on_cjk``, ``oov_token``,
                                                 ``suffix_indicator``, ``sequence_length``
a vocabulary (list of tokens or a vocab file)    as given, with the keyword flags
===============================================  =============================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.errors import SpecError


def _table_vocab(table: Any, what: str) -> list[str]:
    """Tokens of a TF vocabulary lookup table, ordered by id."""
    # StaticVocabularyTable wraps a StaticHashTable; its OOV bucket(s) are reached only for a word
    # piece missing from the vocabulary, which WordPiece turns into the unknown token first, so they
    # matter only when the unknown token itself is not in the vocabulary (refused below)
    inner = getattr(table, "_table", table)
    keys, values = inner.export()
    keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in keys.numpy()]
    values = np.asarray(values.numpy()).astype(np.int64)
    order = np.argsort(values)
    if not np.array_equal(values[order], np.arange(len(values))):
        raise SpecError(f"{what}: vocabulary ids are not 0..{len(values) - 1}; cannot write them as a vocab file")
    return [keys[i] for i in order]


def _read_source(source: Any) -> dict[str, Any]:
    """Vocabulary and flags of a supported tokenizer object (see the module doc)."""
    cls = type(source).__name__
    mod = type(source).__module__ or ""
    if mod.startswith("keras_hub") and hasattr(source, "get_vocabulary"):
        return {"vocab": list(source.get_vocabulary()), "lowercase": bool(getattr(source, "lowercase", False)),
                "strip_accents": bool(getattr(source, "strip_accents", False)),
                "split_on_cjk": bool(getattr(source, "split_on_cjk", True)),
                "unk_token": getattr(source, "oov_token", "[UNK]"),
                "suffix": getattr(source, "suffix_indicator", "##"),
                "max_length": getattr(source, "sequence_length", None), "kind": f"keras_hub {cls}"}
    if mod.startswith("tensorflow_text"):
        wp = getattr(source, "_wordpiece_tokenizer", source)
        basic = getattr(source, "_basic_tokenizer", None)
        if not hasattr(wp, "_vocab_lookup_table"):
            raise SpecError(f"tokenizer bridge: {cls} is not a WordPiece tokenizer this bridge reads "
                            f"(BertTokenizer, WordpieceTokenizer); pass its vocabulary instead")
        if not getattr(wp, "_use_unknown_token", True):
            raise SpecError(f"tokenizer bridge: {cls} drops unknown words (use_unknown_token=False); a Hugging Face "
                            f"WordPiece tokenizer always emits its unknown token")
        lower = bool(getattr(basic, "_lower_case", False)) if basic is not None else False
        form = getattr(basic, "_normalization_form", None) if basic is not None else None
        if form not in (None, "", "NFD") and not lower:
            raise SpecError(f"tokenizer bridge: normalization_form={form!r} has no Hugging Face BERT normaliser "
                            f"equivalent (only lower_case / NFD accent stripping)")
        unk = getattr(wp, "_unknown_token", "[UNK]")
        return {"vocab": _table_vocab(wp._vocab_lookup_table, f"tensorflow_text {cls}"), "lowercase": lower,
                "strip_accents": lower, "split_on_cjk": basic is not None,
                "unk_token": unk.decode() if isinstance(unk, bytes) else str(unk),
                "suffix": getattr(wp, "_suffix_indicator", "##"), "max_length": None, "kind": f"tensorflow_text {cls}"}
    raise SpecError(f"tokenizer bridge: cannot read a {mod}.{cls}; give a tensorflow_text BertTokenizer / "
                    f"WordpieceTokenizer, a keras_hub WordPieceTokenizer, or the vocabulary (a list or a vocab file)")


def hf_tokenizer_from_tf(source: Any, *, lowercase: bool | None = None, strip_accents: bool | None = None,
                         unk_token: str | None = None, max_length: int | None = None,
                         save_to: str | os.PathLike | None = None) -> Any:
    """The Hugging Face fast tokenizer that gives a TF WordPiece tokenizer's ids.

    Args:
        source: a tensorflow_text ``BertTokenizer`` / ``WordpieceTokenizer``, a keras_hub
            ``WordPieceTokenizer`` (or ``BertTokenizer``), a list of vocabulary tokens (id = position)
            or the path of a vocab file (one token per line).
        lowercase / strip_accents / unk_token / max_length: override what is read from ``source``
            (needed for a bare vocabulary: default no lower-casing, ``[UNK]``, no max length).
        save_to: also ``save_pretrained`` the tokenizer into this folder (loadable offline with
            ``AutoTokenizer.from_pretrained(folder)`` and in mmbridge configs).

    Returns:
        A ``transformers.BertTokenizerFast``; ``tokenizer(texts, add_special_tokens=False)["input_ids"]``
        are the TF tokenizer's flat wordpiece ids (int, one list per text). ``mmbridge_source``
        records what it was built from. Special tokens missing from the vocabulary ([CLS], [SEP]...)
        are added after it by transformers: use ``add_special_tokens=False`` or add them to the
        vocabulary when the ids feed an embedding sized by it.

    Raises:
        SpecError: the source is not supported, or uses something the Hugging Face tokenizer cannot
            reproduce (OOV hash buckets, a normalisation form other than NFD, a suffix indicator that
            is not ``##``-style).
    """
    from transformers import BertTokenizerFast

    if isinstance(source, (str, os.PathLike)):
        vocab = Path(source).read_text(encoding="utf-8").splitlines()
        info: dict[str, Any] = {"vocab": vocab, "kind": f"vocab file {source}"}
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        info = {"vocab": list(source), "kind": "vocabulary list"}
    else:
        info = _read_source(source)
    lower = info.get("lowercase", False) if lowercase is None else lowercase
    strip = info.get("strip_accents", lower) if strip_accents is None else strip_accents
    unk = unk_token or info.get("unk_token", "[UNK]")
    if unk not in info["vocab"]:
        raise SpecError(f"tokenizer bridge: the unknown token {unk!r} is not in the vocabulary "
                        f"({len(info['vocab'])} tokens), so TF hashes unknown words into OOV buckets (its "
                        f"fingerprint hash) where a Hugging Face tokenizer needs one unknown token: the ids would "
                        f"differ. Add {unk!r} to the vocabulary, or pass the token that is there as unk_token=")
    suffix = info.get("suffix", "##")
    if suffix != "##":
        raise SpecError(f"tokenizer bridge: suffix indicator {suffix!r}: the Hugging Face BERT tokenizer marks word "
                        f"pieces with '##'; rewrite the vocabulary's {suffix!r} prefixes as '##' first")
    specials = {k: t for k, t in (("pad_token", "[PAD]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"),
                                  ("mask_token", "[MASK]")) if t in info["vocab"]}
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(info["vocab"])}, do_lower_case=lower,
                            strip_accents=strip, tokenize_chinese_chars=info.get("split_on_cjk", True),
                            unk_token=unk, **specials)
    length = max_length if max_length is not None else info.get("max_length")
    if length:
        tok.model_max_length = int(length)
    tok.mmbridge_source = {"kind": info["kind"], "lowercase": lower, "strip_accents": strip, "unk_token": unk,
                           "vocab_size": len(info["vocab"])}
    if save_to is not None:
        tok.save_pretrained(str(save_to))
    return tok


def tf_token_ids(source: Any, texts: Sequence[str]) -> list[list[int]]:
    """The TF tokenizer's flat wordpiece ids of ``texts`` (no special tokens, no padding)."""
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    mod = type(source).__module__ or ""
    if mod.startswith("keras_hub"):
        length = getattr(source, "sequence_length", None)
        source.sequence_length = None  # ragged, unpadded ids
        try:
            out = source(tf.constant(list(texts)))
        finally:
            source.sequence_length = length
    else:
        out = source.tokenize(tf.constant(list(texts)))
        while getattr(out, "ragged_rank", 0) > 1:
            out = out.merge_dims(-2, -1)
    rows = out.to_list() if hasattr(out, "to_list") else (out.numpy().tolist() if hasattr(out, "numpy") else list(out))
    return [[int(i) for i in (row.numpy().tolist() if hasattr(row, "numpy") else row)] for row in rows]


def check_identical_ids(source: Any, tokenizer: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Tokenize ``texts`` with both and compare the ids exactly.

    Returns:
        ``{"texts": n, "identical": n_same, "first_difference": None | {"text", "tf", "hf"}}``.

    Raises:
        ParityError: any text gets other ids (names the first one, with both id lists).
    """
    from mmbridge.errors import ParityError

    tf_ids = tf_token_ids(source, texts)
    hf_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    same = [a == b for a, b in zip(tf_ids, hf_ids)]
    result: dict[str, Any] = {"texts": len(texts), "identical": int(sum(same)), "first_difference": None}
    if not all(same):
        k = same.index(False)
        result["first_difference"] = {"text": texts[k], "tf": tf_ids[k][:40], "hf": hf_ids[k][:40]}
        raise ParityError(f"tokenizer bridge: {len(texts) - sum(same)} of {len(texts)} texts get other ids; first: "
                          f"{texts[k][:80]!r}: TF {tf_ids[k][:20]} vs Hugging Face {hf_ids[k][:20]}. Check the "
                          f"lower-casing / accent stripping flags (lowercase=, strip_accents=)")
    return result
