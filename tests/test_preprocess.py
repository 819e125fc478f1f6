"""`llada-cpt preprocess` and the embedded demo corpus."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random

import numpy as np
import pytest

from llada_cpt import cli
from llada_cpt.data import demo_corpus
from llada_cpt.data.demo_corpus import demo_documents, ensure_demo_data
from llada_cpt.data.preprocess import preprocess, read_dataset_meta
from llada_cpt.data.tokenizer import Tokenizer, train_sentencepiece
from llada_cpt.errors import DataError


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def _records(prefix):
    ds = _indexed(prefix)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [t for _, t in demo_documents(max_bytes=120_000)]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=400)


def _texts(n, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "def", "return", "(x)", "{}", "\n", "    ", "é", "漢", "42"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


def test_round_trip_documents_end_with_eod(tok, tmp_path):
    texts = _texts(40)
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[:25])])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"body": t} for t in texts[25:]])
    plain = tmp_path / "c.txt"
    plain.write_text("one whole file\n\nis one document\n", encoding="utf-8")
    summary = preprocess([a, plain], tok, tmp_path / "out" / "ab", progress=False)
    preprocess([b], tok, tmp_path / "out" / "b", text_key="body", progress=False)

    expected = texts[:25] + [plain.read_text(encoding="utf-8")]
    records = _records(tmp_path / "out" / "ab")
    assert len(records) == len(expected) == summary.documents
    for rec, text in zip(records, expected):
        assert rec[-1] == tok.eod_id and tok.eod_id not in rec[:-1]
        assert rec[:-1] == tok.encode(text) and tok.decode(rec[:-1]) == text
    assert summary.tokens == sum(map(len, records)) and summary.skipped == 0
    assert [tok.decode(r[:-1]) for r in _records(tmp_path / "out" / "b")] == texts[25:]

    meta = read_dataset_meta(tmp_path / "out" / "ab")
    assert (meta["vocab_size"], meta["eod_id"], meta["mask_id"], meta["pad_id"]) == \
        (tok.vocab_size, tok.eod_id, tok.mask_id, tok.pad_id)
    assert (meta["documents"], meta["tokens"]) == (summary.documents, summary.tokens)
    assert os.path.samefile(meta["tokenizer"], tok.path) and meta["append_eod"] is True
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{p}{e}" for p in ("ab", "b") for e in (".bin", ".idx", ".meta.json"))


def test_workers_give_identical_output(tok, tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _texts(300, seed=1)] + ["{broken"])
    one = preprocess([src], tok, tmp_path / "w1", workers=1, progress=False)
    two = preprocess([src], tok, tmp_path / "w2", workers=2, progress=False)
    assert (one.documents, one.tokens, one.problems) == (two.documents, two.tokens, two.problems)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_bad_lines_are_reported_with_line_numbers_and_good_lines_kept(tok, tmp_path, capsys):
    good = _texts(6, seed=2)
    rows = [
        {"text": good[0]},   # 1
        "{not json",         # 2 corrupt
        {"text": good[1]},   # 3
        {"txt": "wrong"},    # 4 no text
        "",                  # 5 blank
        {"text": "   "},     # 6 empty
        "[1, 2]",            # 7 corrupt: not an object
        {"text": 7},         # 8 no text: not a string
        {"text": good[2]},   # 9
    ]
    src = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with open(src, "ab") as f:
        f.write(b'{"text": "\xff\xfe"}\n')  # 10 corrupt: not UTF-8
        f.write(json.dumps({"text": good[3]}).encode())  # 11, no final newline
    rc = cli.main(["preprocess", "--input", str(src), "--tokenizer", tok.path, "--output-prefix",
                   str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert [tok.decode(r[:-1]) for r in _records(tmp_path / "out")] == good[:4]
    meta = read_dataset_meta(tmp_path / "out")
    assert meta["skipped"] == {"corrupt": 3, "no_text": 2, "empty": 2}
    assert meta["skipped_examples"]["corrupt"] == [f"{src}:{n}" for n in (2, 7, 10)]
    assert meta["skipped_examples"]["no_text"] == [f"{src}:{n}" for n in (4, 8)]
    assert meta["skipped_examples"]["empty"] == [f"{src}:{n}" for n in (5, 6)]
    assert "wrote 4 documents" in out
    for n in (2, 4, 5, 6, 7, 8, 10):
        assert f"mixed.jsonl:{n}" in out


def test_all_bad_input_fails_and_writes_nothing(tok, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"other": "x"}, ""])
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match="no usable documents.*bad.jsonl:1"):
        preprocess([src], tok, out_dir / "data", progress=False)
    assert os.listdir(out_dir) == []
    rc = cli.main(["preprocess", "--input", str(src), "--tokenizer", tok.path,
                   "--output-prefix", str(out_dir / "data"), "--quiet"])
    assert rc == 2 and "no usable documents" in capsys.readouterr().err
    assert os.listdir(out_dir) == []


def test_failure_mid_run_leaves_no_partial_output(tok, tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _texts(600, seed=3)])
    calls = []
    real = Tokenizer.encode

    def flaky(self, text):
        calls.append(1)
        if len(calls) > 400:  # after the first chunks have been written
            raise RuntimeError("disk on fire")
        return real(self, text)

    monkeypatch.setattr(Tokenizer, "encode", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        preprocess([src], tok, tmp_path / "out" / "data", progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_missing_inputs_and_tokenizer_are_cli_errors(tok, tmp_path, capsys):
    rc = cli.main(["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", tok.path,
                   "--output-prefix", str(tmp_path / "o")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
    src = _write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    rc = cli.main(["preprocess", "--input", str(src), "--tokenizer", str(tmp_path / "t.model"),
                   "--output-prefix", str(tmp_path / "o")])
    assert rc == 2 and "t.model" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_paragraph_mode_and_no_eod(tok, tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("first para\nline two\n\n\nsecond\n   \nthird one\n", encoding="utf-8")
    preprocess([src], tok, tmp_path / "p", split_paragraphs=True, append_eod=False, progress=False)
    assert [tok.decode(r) for r in _records(tmp_path / "p")] == ["first para\nline two", "second", "third one"]
    assert read_dataset_meta(tmp_path / "p")["append_eod"] is False


def test_hf_tokenizer_json_preprocess(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = _texts(50, seed=4)
    hf.train_from_iterator(texts, trainer)
    from tokenizers import decoders

    hf.decoder = decoders.ByteLevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.mask_added and tok.eod_id == hf.token_to_id("<|endoftext|>")
    src = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:10]] + [{"text": "a [MASK] b"}])
    summary = preprocess([src], tmp_path / "tokenizer.json", tmp_path / "hf", progress=False)
    records = _records(tmp_path / "hf")
    assert summary.documents == 11
    assert [tok.decode(r[:-1]) for r in records] == texts[:10] + ["a [MASK] b"]
    assert all(r[-1] == tok.eod_id and tok.mask_id not in r for r in records)
    assert read_dataset_meta(tmp_path / "hf")["mask_id"] == tok.mask_id == hf.get_vocab_size()


# ------------------------------------------------------------------ demo corpus
SMALL = dict(max_bytes=150_000, vocab_size=512)


def test_demo_corpus_builds_losslessly_and_is_cached(tmp_path, monkeypatch):
    data = ensure_demo_data(str(tmp_path), **SMALL)
    docs = demo_documents(SMALL["max_bytes"])
    train, valid = demo_corpus._split(docs)
    assert data.train_documents == len(train) and data.valid_documents == len(valid) >= 1
    assert len(valid) == max(1, len(docs) // demo_corpus.VALID_EVERY)
    tok = Tokenizer.from_file(data.tokenizer_path)
    assert (tok.vocab_size, tok.mask_id, tok.eod_id, tok.pad_id) == \
        (data.vocab_size, data.mask_id, data.eod_id, data.pad_id)
    for prefix, part in ((data.train_prefix, train), (data.valid_prefix, valid)):
        records = _records(prefix)
        assert len(records) == len(part)
        assert tok.decode(records[0][:-1]) == part[0][1] and records[0][-1] == tok.eod_id
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached demo data was rebuilt")

    monkeypatch.setattr(demo_corpus, "_build", no_rebuild)
    assert ensure_demo_data(str(tmp_path), **SMALL) == data
    monkeypatch.setenv("LLADA_CPT_CACHE", str(tmp_path / "env"))
    assert demo_corpus.default_cache_dir() == str(tmp_path / "env" / "demo")


def _demo_in_child(cache_dir, log):
    real = demo_corpus._build

    def logged(directory, *args):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(directory, *args)

    demo_corpus._build = logged
    return ensure_demo_data(cache_dir, **SMALL)


def test_demo_corpus_concurrent_callers_build_once(tmp_path):
    log = tmp_path / "builds.log"
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_demo_in_child, [(str(tmp_path / "cache"), str(log))] * 2)
    assert results[0] == results[1]
    assert len(log.read_text().split()) == 1
    assert _records(results[0].train_prefix)  # complete and readable
