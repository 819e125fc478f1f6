"""Tokenizer wrapper: SentencePiece and tokenizers backends, special ids, the added mask token."""
from __future__ import annotations

import io
import json
import pickle

import pytest

from llada_cpt.data.demo_corpus import demo_documents
from llada_cpt.data.tokenizer import MASK_TOKEN, Tokenizer, train_sentencepiece
from llada_cpt.errors import DataError

CODE = 'def f(x):\n\treturn {"a": [x, 3.25]}  # é 漢字\n\n\n    pass\n'


@pytest.fixture(scope="module")
def corpus():
    return [text for _, text in demo_documents(max_bytes=150_000)]


@pytest.fixture(scope="module")
def own_sp(corpus, tmp_path_factory):
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "own.model", vocab_size=512)


def _foreign_sp(corpus, path, **extra):
    """A SentencePiece model trained without our settings (no mask token, default eos)."""
    import sentencepiece as spm

    lines = (line for text in corpus for line in text.split("\n") if line.strip())
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=buf, vocab_size=400,
                                   model_type="bpe", minloglevel=2, **extra)
    path.write_bytes(buf.getvalue())
    return path


def _word_level(path, vocab, config=None):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    tok = HF(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path / "tokenizer.json"


def test_own_sentencepiece_specials_and_lossless_round_trip(own_sp, corpus):
    assert (own_sp.kind, own_sp.vocab_size, own_sp.pad_id, own_sp.eod_id, own_sp.mask_id) == \
        ("sentencepiece", 512, 0, 2, 3)
    assert not own_sp.mask_added
    assert len({own_sp.pad_id, own_sp.eod_id, own_sp.mask_id}) == 3
    for text in [CODE] + corpus[:5]:
        ids = own_sp.encode(text)
        assert own_sp.mask_id not in ids and own_sp.eod_id not in ids
        assert all(0 <= i < own_sp.vocab_size for i in ids)
        assert own_sp.decode(ids) == text


def test_literal_mask_text_never_becomes_the_mask_id(own_sp, tmp_path, corpus):
    foreign = Tokenizer.from_file(_foreign_sp(corpus, tmp_path / "ud.model", user_defined_symbols=["<mask>"]))
    assert not foreign.mask_added and foreign.mask_token == "<mask>"
    # the raw backend does turn the literal into the mask id; the wrapper must not
    assert foreign.mask_id in foreign._encode_raw("x = <mask> + 1")
    for tok, literal in ((own_sp, MASK_TOKEN), (foreign, "<mask>")):
        text = f"x = {literal} + {literal}"
        ids = tok.encode(text)
        assert tok.mask_id not in ids
        assert literal in tok.decode(ids)
        # and the mask id itself is rendered as the mask token
        assert tok.decode(tok.encode("a") + [tok.mask_id] + tok.encode("b")) == f"a{tok.mask_token}b"


def test_foreign_sentencepiece_gets_mask_one_past_its_vocab(corpus, tmp_path):
    path = _foreign_sp(corpus, tmp_path / "foreign.model")
    tok = Tokenizer.from_file(path)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert tok.mask_added
    assert tok.mask_id == sp.get_piece_size() and tok.vocab_size == sp.get_piece_size() + 1
    assert tok.eod_id == sp.eos_id()
    assert tok.pad_id == tok.eod_id  # no pad piece: pad falls back to EOD
    ids = tok.encode("x = [MASK]")
    assert tok.mask_id not in ids and max(ids) < sp.get_piece_size()
    assert tok.decode(ids + [tok.mask_id]).endswith("[MASK]")


def test_sentencepiece_without_eos_needs_eod_token(corpus, tmp_path):
    path = _foreign_sp(corpus, tmp_path / "noeos.model", eos_id=-1, user_defined_symbols=["<|endoftext|>"])
    tok = Tokenizer.from_file(path)  # found among the common spellings
    assert tok.eod_id == tok._backend.piece_to_id("<|endoftext|>")
    path2 = _foreign_sp(corpus, tmp_path / "noeos2.model", eos_id=-1, user_defined_symbols=["<doc_end>"])
    with pytest.raises(DataError, match="eod_token"):
        Tokenizer.from_file(path2)
    assert Tokenizer.from_file(path2, eod_token="<doc_end>").eod_id == \
        Tokenizer.from_file(path2, eod_token="<doc_end>")._backend.piece_to_id("<doc_end>")


def test_hf_tokenizer_json_mask_added_as_special_token(tmp_path):
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "[": 4, "MASK": 5, "]": 6}
    tok = Tokenizer.from_file(_word_level(tmp_path, vocab))
    assert tok.kind == "huggingface" and tok.mask_added
    assert tok.mask_id == len(vocab) and tok.vocab_size == len(vocab) + 1
    assert tok.eod_id == vocab["</s>"] and tok.pad_id == tok.eod_id
    ids = tok.encode("hello [MASK] world")
    assert ids == [vocab[w] for w in ("hello", "[", "MASK", "]", "world")]
    assert tok.decode([vocab["hello"], tok.mask_id]) == "hello [MASK]"
    assert Tokenizer.from_file(tmp_path).path == str(tmp_path / "tokenizer.json")  # directory form


def test_hf_existing_mask_and_config_eos_are_used(tmp_path):
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "</s>": 2, "<|mask|>": 3, "<pad>": 4, "hi": 5}
    config = {"eos_token": {"content": "</s>"}, "pad_token": "<pad>"}
    tok = Tokenizer.from_file(_word_level(tmp_path, vocab, config))
    assert not tok.mask_added and tok.mask_token == "<|mask|>"
    assert (tok.vocab_size, tok.mask_id, tok.eod_id, tok.pad_id) == (len(vocab), 3, 2, 4)


def test_hf_without_eod_is_a_clear_error(tmp_path):
    path = _word_level(tmp_path, {"<unk>": 0, "end": 1, "hi": 2})
    with pytest.raises(DataError, match="end-of-document.*eod_token"):
        Tokenizer.from_file(path)
    assert Tokenizer.from_file(path, eod_token="end").eod_id == 1


def test_pickle_reloads_the_same_tokenizer(own_sp, tmp_path):
    hf = Tokenizer.from_file(_word_level(tmp_path, {"<unk>": 0, "x": 1}), eod_token="x")
    for tok in (own_sp, hf):
        clone = pickle.loads(pickle.dumps(tok))
        assert (clone.vocab_size, clone.eod_id, clone.mask_id, clone.pad_id) == \
            (tok.vocab_size, tok.eod_id, tok.mask_id, tok.pad_id)
        assert clone.encode(CODE) == tok.encode(CODE)


def test_missing_or_invalid_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "bad.model")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
