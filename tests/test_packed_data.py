"""Packed L-token sequences with document ids, blending, and the resumable DP iterator."""
from __future__ import annotations

import random
from itertools import islice

import pytest
import torch

from dist import run_distributed
from llada_cpt.data.packed import PackedBatchIterator, PackedDataset, doc_ids_from_eod
from llada_cpt.data.preprocess import preprocess_texts
from llada_cpt.data.tokenizer import Tokenizer
from llada_cpt.errors import ConfigError, DataError

L = 32


def _docs(prefix: str, n: int, seed: int):
    rng = random.Random(seed)
    return [" ".join(f"{prefix}{rng.randrange(50)}" for _ in range(rng.randint(1, 3 * L))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two datasets over disjoint word sets, so a token tells which dataset it came from."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    root = tmp_path_factory.mktemp("packed")
    words = ["<unk>", "</s>"] + [f"{p}{i}" for p in "ab" for i in range(50)]
    vocab = {w: i for i, w in enumerate(words)}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(root / "tokenizer.json"))
    tok = Tokenizer.from_file(root / "tokenizer.json")
    docs = {"a": _docs("a", 120, 0), "b": _docs("b", 60, 1)}
    for name, texts in docs.items():
        preprocess_texts(((f"{name}{i}", t) for i, t in enumerate(texts)), tok, root / name)
    encoded = {name: [tok.encode(t) + [tok.eod_id] for t in texts] for name, texts in docs.items()}
    return {"root": root, "tok": tok, "a": str(root / "a"), "b": str(root / "b"), "encoded": encoded}


def _pieces(tokens, eod):
    """Split a sequence after every EOD: [partial-or-whole doc, whole docs..., partial doc]."""
    out, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == eod:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_doc_ids_from_eod_definition():
    tokens = torch.tensor([[5, 1, 7, 7, 1, 9], [1, 1, 3, 4, 4, 4]])
    assert doc_ids_from_eod(tokens, eod_id=1).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]


def test_samples_are_windows_of_the_document_stream(corpus):
    ds = PackedDataset([corpus["a"]], L, seed=3, cache_dir=str(corpus["root"] / "cache"))
    eod = corpus["tok"].eod_id
    docs = corpus["encoded"]["a"]
    total = sum(map(len, docs))
    assert len(ds) == total // L  # one epoch, no extra label token, last partial sequence dropped
    whole = {tuple(d) for d in docs}
    seen_mid_start = False
    for i in range(len(ds)):
        s = ds[i]
        tokens, doc_ids = s["tokens"], s["doc_ids"]
        assert s["index"] == i and tokens.shape == doc_ids.shape == (L,)
        assert tokens.dtype == doc_ids.dtype == torch.long
        # doc ids start at 0 and increase by exactly one right after each EOD
        assert doc_ids[0] == 0
        step = (doc_ids[1:] - doc_ids[:-1]).tolist()
        assert step == [int(t == eod) for t in tokens[:-1].tolist()]
        # each piece is a real document, or a suffix (first) / prefix (last) of one
        pieces = _pieces(tokens.tolist(), eod)
        for k, piece in enumerate(pieces):
            if tuple(piece) in whole:
                continue
            seen_mid_start |= k == 0
            if piece[-1] == eod:  # the tail of a document begun before this sequence
                assert k == 0 and any(d[len(d) - len(piece):] == piece for d in docs)
            elif k == 0:  # the sequence lies inside one long document
                assert len(pieces) == 1 and any(_contains(d, piece) for d in docs)
            else:  # the head of a document that continues in the next sequence
                assert k == len(pieces) - 1 and any(d[: len(piece)] == piece for d in docs)
    assert seen_mid_start  # the "sequence starts inside a document" case did occur


def test_deterministic_across_constructions_and_seeded(corpus, tmp_path):
    def samples(seed, cache):
        ds = PackedDataset([corpus["a"]], L, seed=seed, num_samples=200, cache_dir=str(cache))
        return torch.stack([ds[i]["tokens"] for i in range(len(ds))])

    first = samples(7, tmp_path / "c1")
    assert len(first) >= 200  # num_samples beyond one epoch draws more epochs
    assert torch.equal(first, samples(7, tmp_path / "c2"))  # fresh cache: rebuilt identically
    assert torch.equal(first, samples(7, tmp_path / "c1"))  # cache hit
    assert not torch.equal(first, samples(8, tmp_path / "c1"))


def test_weighted_blend(corpus, tmp_path):
    n = 400
    ds = PackedDataset([(corpus["a"], 1.0), (corpus["b"], 3.0)], L, num_samples=n, cache_dir=str(tmp_path))
    assert len(ds) == n
    a_ids = {corpus["tok"].encode(f"a{i}")[0] for i in range(50)}
    eod = corpus["tok"].eod_id
    from_a = 0
    for i in range(n):
        content = [t for t in ds[i]["tokens"].tolist() if t != eod]
        in_a = [t in a_ids for t in content]
        assert all(in_a) or not any(in_a)  # a sample never mixes datasets
        from_a += in_a[0]
    assert abs(from_a - n / 4) <= 2
    with pytest.raises(ConfigError, match="num_samples"):
        PackedDataset([(corpus["a"], 1.0), (corpus["b"], 3.0)], L, cache_dir=str(tmp_path))


def test_iterator_resume_is_exact(corpus):
    ds = PackedDataset([corpus["a"]], L, num_samples=120, cache_dir=str(corpus["root"] / "cache"))
    unbroken = list(PackedBatchIterator(ds, micro_batch_size=3, dp_rank=1, dp_size=2))
    assert len(unbroken) == len(ds) // 6
    it = PackedBatchIterator(ds, micro_batch_size=3, dp_rank=1, dp_size=2)
    head = list(islice(it, 5))
    state = it.state_dict()
    assert state == {"consumed_samples": 5 * 6}
    resumed = PackedBatchIterator(ds, micro_batch_size=3, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    also = list(PackedBatchIterator(ds, 3, 1, 2, start_sample=state["consumed_samples"]))
    for got, want in zip(head + rest, unbroken, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(also, rest, strict=True))
    assert head[0]["tokens"].shape == head[0]["doc_ids"].shape == (3, L)


def test_dp_ranks_get_disjoint_samples(corpus):
    ds = PackedDataset([corpus["a"]], L, cache_dir=str(corpus["root"] / "cache"))
    seen = []
    for rank in range(3):
        idx = torch.cat([b["index"] for b in PackedBatchIterator(ds, micro_batch_size=2, dp_rank=rank, dp_size=3)])
        seen.append(set(idx.tolist()))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(range(len(ds) // 6 * 6))


def test_bad_arguments_are_clear_errors(corpus, tmp_path):
    cache = str(tmp_path)
    with pytest.raises(DataError, match="not found"):
        PackedDataset([str(tmp_path / "missing")], L, cache_dir=cache)
    with pytest.raises(DataError, match="fewer than"):
        PackedDataset([corpus["b"]], 10**6, cache_dir=cache)
    with pytest.raises(ConfigError, match="split"):
        PackedDataset([corpus["a"]], L, split="100,0,0", split_name="valid", cache_dir=cache)
    with pytest.raises(ConfigError, match="dp_rank"):
        PackedBatchIterator(PackedDataset([corpus["a"]], L, cache_dir=cache), 1, dp_rank=2, dp_size=2)
    preprocess_texts([("x", "a1 a2 " * 40)], corpus["tok"], tmp_path / "noeod")
    meta = tmp_path / "noeod.meta.json"
    meta.write_text(meta.read_text().replace('"append_eod": true', '"append_eod": false'))
    with pytest.raises(DataError, match="--append-eod"):
        PackedDataset([str(tmp_path / "noeod")], L, cache_dir=cache)


def _packed_on_rank(rank, world_size, prefixes, cache):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    single = PackedDataset([prefixes[0]], L, seed=5, num_samples=64, cache_dir=cache)
    batches = list(PackedBatchIterator(single, micro_batch_size=2, dp_rank=rank, dp_size=world_size))
    blend = PackedDataset([(p, 1.0) for p in prefixes], L, seed=5, num_samples=40, cache_dir=cache)
    return ([b["index"] for b in batches], [b["tokens"] for b in batches],
            torch.stack([blend[i]["tokens"] for i in range(len(blend))]))


def test_two_ranks_share_the_index_cache_and_split_the_data(corpus, tmp_path):
    """Rank 0 builds, rank 1 waits at Megatron's barrier and loads (a lock here would deadlock)."""
    cache = tmp_path / "cache"
    out = run_distributed(_packed_on_rank, 2, [corpus["a"], corpus["b"]], str(cache), timeout=240)
    (idx0, _, blend0), (idx1, _, blend1) = out
    assert not set(torch.cat(idx0).tolist()) & set(torch.cat(idx1).tolist())
    ref = PackedDataset([corpus["a"]], L, seed=5, num_samples=64, cache_dir=str(cache))
    for idx, toks, _ in out:
        for i, t in zip(torch.cat(idx).tolist(), torch.cat(toks)):
            assert torch.equal(ref[i]["tokens"], t)
    assert torch.equal(blend0, blend1)
    ref_blend = PackedDataset([(p, 1.0) for p in (corpus["a"], corpus["b"])], L, seed=5, num_samples=40,
                              cache_dir=str(tmp_path / "single-process"))
    assert torch.equal(blend0, torch.stack([ref_blend[i]["tokens"] for i in range(len(ref_blend))]))
    assert list(cache.glob("*-BlendedDataset-train-dataset_index.npy"))  # cached under a process group
