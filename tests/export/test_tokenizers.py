"""The tokenizer bridge (mmbridge.export.tokenizers): a TF WordPiece tokenizer and the Hugging Face
fast tokenizer built from it give identical ids, on the pokedex descriptions (accents, curly
quotes) and on the package's built-in sample; what it cannot reproduce is refused."""

from __future__ import annotations

import csv
import re
from collections import Counter

import pytest

import mmbridge
from mmbridge.data import sample_dir

pytestmark = pytest.mark.tf
text_lib = pytest.importorskip("tensorflow_text", reason="tensorflow-text is not installed")


def _texts(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def _vocab(texts, *, lower: bool):
    """Special tokens, the 300 most frequent words, and every character alone and as ``##`` piece
    (so no word is unknown), plus a few frequent suffixes."""
    words = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower() if lower else t))
    chars = sorted({c for t in texts for c in (t.lower() if lower else t) if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(300)]
    vocab += ["##ing", "##ed", "##s", "##ly"] + chars + ["##" + c for c in chars]
    return list(dict.fromkeys(vocab))


@pytest.fixture(scope="module")
def pokedex_texts(pokedex_dir):
    return _texts(pokedex_dir / "text.csv")


@pytest.mark.data
@pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])
def test_tensorflow_text_bert_tokenizer_ids_identical_on_pokedex(tf, tmp_path, pokedex_texts, lower):
    from mmbridge.export.tokenizers import check_identical_ids, hf_tokenizer_from_tf

    vocab = _vocab(pokedex_texts[::2], lower=lower)  # unseen words in the other half: real wordpiece splits
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tf_tok = text_lib.BertTokenizer(str(path), lower_case=lower, token_out_type=tf.int64)
    hf_tok = hf_tokenizer_from_tf(tf_tok, save_to=tmp_path / "hf")
    res = check_identical_ids(tf_tok, hf_tok, pokedex_texts)
    assert res == {"texts": 898, "identical": 898, "first_difference": None}
    ids = hf_tok(pokedex_texts[:50], add_special_tokens=False)["input_ids"]
    assert any(vocab.index("[UNK]") in row for row in ids) or any(
        any(vocab[i].startswith("##") for i in row) for row in ids)  # word pieces really occur
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert reloaded(pokedex_texts[:5], add_special_tokens=False)["input_ids"] == ids[:5]


def test_keras_hub_wordpiece_tokenizer_ids_identical_on_the_sample(tf):
    keras_hub = pytest.importorskip("keras_hub")
    from mmbridge.export.tokenizers import check_identical_ids, hf_tokenizer_from_tf

    texts = _texts(sample_dir() / "text.csv") + ["Café CRÈME brûlée, naïve résumé!", "déjà vu: 日本語 text"]
    vocab = _vocab(texts[:60], lower=True)
    tok = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocab, lowercase=True, strip_accents=True,
                                                  sequence_length=64)
    hf = hf_tokenizer_from_tf(tok)
    assert hf.model_max_length == 64
    assert check_identical_ids(tok, hf, texts)["identical"] == len(texts)


def test_a_wrong_flag_is_caught_not_passed(tf, tmp_path):
    """The check can fail: the same vocabulary without accent stripping gives other ids."""
    from mmbridge.export.tokenizers import check_identical_ids, hf_tokenizer_from_tf

    texts = ["Pokémon évolue", "naïve café"]
    vocab = _vocab(["pokemon evolue naive cafe"], lower=True)
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tf_tok = text_lib.BertTokenizer(str(path), lower_case=True)
    wrong = hf_tokenizer_from_tf(vocab, lowercase=True, strip_accents=False)
    with pytest.raises(mmbridge.ParityError, match="2 of 2 texts get other ids"):
        check_identical_ids(tf_tok, wrong, texts)
    assert check_identical_ids(tf_tok, hf_tokenizer_from_tf(tf_tok), texts)["identical"] == 2


def test_oov_hash_buckets_are_refused(tf):
    """A vocabulary without the unknown token: TF hashes unknown words into buckets; refused."""
    from mmbridge.export.tokenizers import hf_tokenizer_from_tf

    keys = ["x", "a", "b"]
    table = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.constant([0, 1, 2], tf.int64)), num_oov_buckets=3)
    with pytest.raises(mmbridge.SpecError, match="OOV buckets"):
        hf_tokenizer_from_tf(text_lib.WordpieceTokenizer(table, token_out_type=tf.int64))
