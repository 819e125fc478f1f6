"""Chat templating, SFT / preference JSONL loading, effective length and packing."""
import json
import os

import pytest

from llada_cpt.data.chat import generation_prompt_ids, tokenize_chat, tokenize_prompt_response
from llada_cpt.data.preference import collate_pairs, load_preference_dataset
from llada_cpt.data.sft import (
    Sample,
    SFTDataConfig,
    effective_length,
    load_sft_dataset,
    pack_groups,
    pad_to_block,
)
from llada_cpt.errors import ConfigError, DataError

BUNDLED = os.path.join(os.path.dirname(__file__), "..", "llada_cpt", "data", "bundled")

CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ByteTokenizer:
    """Stand-in for llada_cpt.data.tokenizer.Tokenizer: UTF-8 bytes plus three specials."""

    eod_id, mask_id, pad_id, vocab_size = 256, 257, 258, 259
    chat_template = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class TemplatedTokenizer(ByteTokenizer):
    chat_template = CHATML_JINJA


TOK = ByteTokenizer()
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def trained_text(tokens):
    return TOK.decode([i for i, e in zip(tokens.ids, tokens.eligible) if e])


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# ---------------------------------------------------------------------------- chat


def test_plain_template_marks_assistant_turns_only():
    tokens = tokenize_chat(CHAT, TOK, "plain")
    assert TOK.decode(tokens.ids) == "System: be brief\nUser: hi\nAssistant: hello\nUser: 2+2?\nAssistant: 4\n"
    assert tokens.ids[-1] == TOK.eod_id and tokens.eligible[-1]
    assert trained_text(tokens) == "hello\n4\n"
    last_only = tokenize_chat(CHAT, TOK, "plain", loss_from=4)
    assert last_only.ids == tokens.ids and trained_text(last_only) == "4\n"
    assert TOK.decode(generation_prompt_ids(CHAT[:2], TOK, "plain")) == "System: be brief\nUser: hi\nAssistant: "


def test_tokenizer_template_matches_named_chatml_and_auto_picks_it():
    named = tokenize_chat(CHAT, TOK, "chatml")
    assert trained_text(named) == "hello<|im_end|>\n4<|im_end|>\n"
    for template in ("tokenizer", "auto"):
        rendered = tokenize_chat(CHAT, TemplatedTokenizer(), template)
        assert rendered == named
    assert tokenize_chat(CHAT, TOK, "auto") == tokenize_chat(CHAT, TOK, "plain")
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_chat(CHAT, TOK, "tokenizer")

    class Tagged(ByteTokenizer):  # transformers' {% generation %} markers are accepted and ignored
        chat_template = CHATML_JINJA.replace("{{ '<|im_start|>' + m", "{% generation %}{{ '<|im_start|>' + m").replace(
            "{% endfor %}", "{% endgeneration %}{% endfor %}")

    assert "generation" in Tagged.chat_template and tokenize_chat(CHAT, Tagged(), "tokenizer") == named

    class Broken(ByteTokenizer):
        chat_template = "{% for m in messages %}"

    with pytest.raises(ValueError, match="does not compile"):
        tokenize_chat(CHAT, Broken(), "auto")


def test_template_that_rewrites_history_is_rejected():
    class Rewriting(ByteTokenizer):  # drops earlier assistant turns, like reasoning-stripping templates
        chat_template = (
            "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
            "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}"
        )

    with pytest.raises(ValueError, match="prefix-stable"):
        tokenize_chat(CHAT, Rewriting(), "tokenizer")


def test_raw_prompt_response_is_verbatim():
    tokens = tokenize_prompt_response("<q>2+2</q>", "4", TOK, "raw")
    assert TOK.decode(tokens.ids) == "<q>2+2</q>4" and trained_text(tokens) == "4"
    assert tokens.ids[-1] == TOK.eod_id
    with pytest.raises(ValueError, match="raw"):
        tokenize_chat(CHAT, TOK, "raw")


# ------------------------------------------------------------- effective length


@pytest.mark.parametrize("n,block,expected", [(1, 4, 4), (4, 4, 4), (5, 4, 8), (31, 32, 32), (33, 32, 64), (7, 1, 7)])
def test_effective_length(n, block, expected):
    assert effective_length(n, block) == expected


@pytest.mark.parametrize("pad_loss", [True, False])
def test_padding_is_eod_and_trains_iff_pad_loss(pad_loss):
    s = pad_to_block(Sample([1, 2, 3, 4, 5], [False, False, True, True, True]), 4, TOK.eod_id, pad_loss)
    assert s.ids == [1, 2, 3, 4, 5, TOK.eod_id, TOK.eod_id, TOK.eod_id]
    assert s.eligible == [False, False, True, True, True] + [pad_loss] * 3


# ----------------------------------------------------------------------- packing


def test_packing_doc_ids_block_aligned_and_lossless(gen):
    import torch

    B, L = 4, 24
    samples = []
    for i in range(15):
        n = 4 * int(torch.randint(1, 5, (1,), generator=gen))
        samples.append(Sample([i] * n, [False] + [True] * (n - 1), f"s{i}"))
    seqs = pack_groups([[s] for s in samples], L, B, TOK.pad_id)
    seen = []
    for seq in seqs:
        assert len(seq["tokens"]) == len(seq["doc_ids"]) == len(seq["eligible"]) == L
        docs = seq["doc_ids"]
        runs = [(d, docs.index(d), len(docs) - docs[::-1].index(d)) for d in dict.fromkeys(docs)]
        assert [d for d, _, _ in runs] == list(range(len(runs)))  # 0, 1, ... in order, contiguous
        for d, start, end in runs:
            assert start % B == 0 and end - start == docs.count(d)
            toks = seq["tokens"][start:end]
            if set(toks) == {TOK.pad_id}:  # filler: last document, carries no loss
                assert d == len(runs) - 1 and not any(seq["eligible"][start:end])
            else:
                seen.append(toks[0])
                assert toks == samples[toks[0]].ids and seq["eligible"][start:end] == samples[toks[0]].eligible
    assert sorted(seen) == list(range(15))  # every sample exactly once
    assert len(seqs) <= -(-sum(len(s) for s in samples) // L) + 1  # best fit wastes at most one sequence here
    with pytest.raises(ValueError, match="block-padded"):
        pack_groups([[Sample([1, 2, 3], [True] * 3)]], L, B, TOK.pad_id)


# -------------------------------------------------------------------- SFT loading


def test_sft_bad_lines_are_reported_with_line_numbers(tmp_path, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "a", "response": "b"},
        "{not json",
        {"prompt": "a"},
        "",
        {"prompt": "a", "response": "   "},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
        [1, 2],
    ])
    cfg = SFTDataConfig(seq_length=64, block_size=8, chat_template="plain")
    data = load_sft_dataset(path, TOK, cfg)
    st = data.stats
    assert st.samples == 2 and st.lines == 7 and st.bad.total == 5
    assert st.bad.counts == {"invalid JSON": 1, "missing field": 1, "empty field": 1,
                             "invalid messages": 1, "not an object": 1}
    assert [f.split(": ")[0] for f in st.bad.first] == [f"{path}:{n}" for n in (2, 3, 5, 6, 8)]
    assert "skipped 5 bad line(s)" in caplog.text
    assert len(data) == 1 and data[0]["tokens"].shape == (64,)

    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"response": 3}])
    with pytest.raises(DataError, match=rf"{all_bad}:1: invalid JSON.*{all_bad}:2: .*Fix:"):
        load_sft_dataset(all_bad, TOK, cfg)
    with pytest.raises(DataError, match="does not exist"):
        load_sft_dataset(str(tmp_path / "missing.jsonl"), TOK, cfg)
    with pytest.raises(ConfigError, match="must divide"):
        SFTDataConfig(seq_length=60, block_size=8)


def test_sft_samples_mark_response_and_pad_to_blocks(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "abc", "response": "xy"}])
    data = load_sft_dataset(path, TOK, SFTDataConfig(seq_length=32, block_size=8, chat_template="plain"))
    seq = data.sequences[0]
    text = "User: abc\nAssistant: xy\n"  # 24 bytes + EOD = 25 -> effective length 32
    n = len(text) + 1
    assert seq["doc_ids"] == [0] * 32  # one document filling the whole sequence
    assert TOK.decode(seq["tokens"][: n - 1]) == text and seq["tokens"][n - 1 :] == [TOK.eod_id] * (32 - n + 1)
    assert seq["eligible"] == [False] * (len(text) - 3) + [True] * (32 - len(text) + 3)


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_overlong_policies(tmp_path, policy):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "p", "response": "short"},
        {"prompt": "p", "response": "x" * 40},  # 'User: p\nAssistant: ' is 19 bytes, + 41 + EOD > 32
        {"prompt": "q" * 40, "response": "y"},  # prompt alone exceeds the sequence
    ])
    cfg = SFTDataConfig(seq_length=32, block_size=8, chat_template="plain", overlong=policy)
    if policy == "error":
        with pytest.raises(DataError, match=rf"2 record\(s\) are longer.*{path}:2: .*{path}:3: "):
            load_sft_dataset(path, TOK, cfg)
        return
    st = load_sft_dataset(path, TOK, cfg).stats
    if policy == "drop":
        assert (st.samples, st.dropped_overlong, st.truncated, st.dropped_no_target) == (1, 2, 0, 0)
    else:
        assert (st.samples, st.dropped_overlong, st.truncated, st.dropped_no_target) == (2, 0, 1, 1)
        assert st.tokens == 2 * 32  # 'User: p\nAssistant: short\n' + EOD padded to 32, and the cut one


def test_bundled_demo_sets_load_cleanly():
    cfg = SFTDataConfig(seq_length=512, block_size=32, chat_template="chatml")
    sft = load_sft_dataset(os.path.join(BUNDLED, "sft_demo.jsonl"), TOK, cfg)
    assert sft.stats.bad.total == 0 and sft.stats.dropped_overlong == 0 and sft.stats.samples >= 100
    assert any(d["doc_ids"].max() > 0 for d in sft)  # several samples packed per sequence
    pair_cfg = SFTDataConfig(seq_length=1024, block_size=32, chat_template="chatml")  # bytes: two long docs
    dpo = load_preference_dataset(os.path.join(BUNDLED, "dpo_demo.jsonl"), TOK, pair_cfg)
    assert dpo.stats.bad.total == 0 and dpo.stats.dropped_overlong == 0 and dpo.stats.samples >= 50


# ------------------------------------------------------------------- preferences


def test_preference_pairs_share_a_sequence_and_train_only_the_responses(tmp_path):
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
        {"messages": CHAT[:3] + [CHAT[3]], "chosen": {"role": "assistant", "content": "4"},
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "x", "chosen": "a"},
        {"prompt": "x", "chosen": "a", "rejected": {"role": "user", "content": "b"}},
    ])
    cfg = SFTDataConfig(seq_length=256, block_size=8, chat_template="plain")
    data = load_preference_dataset(path, TOK, cfg)
    st = data.stats
    assert st.samples == 2 and st.bad.counts == {"identical responses": 1, "missing field": 1,
                                                 "invalid messages": 1}
    assert [f.split(": ")[0] for f in st.bad.first] == [f"{path}:{n}" for n in (3, 4, 5)]
    batch = collate_pairs(data.sequences)
    idx, elig, toks = batch["sample_index"], batch["eligible"], batch["tokens"]
    assert int(batch["num_pairs"]) == 2
    trained = {}
    for s in range(4):
        sel = idx == s
        rows = sel.nonzero()[:, 0].unique()
        assert len(rows) == 1
        pair_rows = (idx // 2 == s // 2).nonzero()[:, 0].unique()
        assert len(pair_rows) == 1  # chosen and rejected in the same packed row
        trained[s] = TOK.decode(toks[sel & elig].tolist())
        assert int(sel.sum()) % 8 == 0
    # the context's own assistant turn ("hello") carries no loss
    assert sorted(trained.values()) == sorted(["4\n", "five\n", "4\n", "5\n"])
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_preference_dataset(write_jsonl(tmp_path / "bad.jsonl", ["[]"]), TOK, cfg)


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_pairs(tmp_path, policy):
    # 'User: p\nAssistant: ' is 19 bytes; responses + '\n' + EOD, padded to blocks of 8
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "p", "chosen": "ok", "rejected": "r" * 60},  # 24 + 88 > 64: cut the long one to 40
        {"prompt": "p", "chosen": "c" * 30, "rejected": "r" * 40},  # 56 + 64: both cut to 32
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # 24 + 24 fits
    ])
    cfg = SFTDataConfig(seq_length=64, block_size=8, chat_template="plain", overlong=policy)
    data = load_preference_dataset(path, TOK, cfg)
    st = data.stats
    if policy == "drop":
        assert (st.samples, st.dropped_overlong, st.truncated) == (1, 2, 0)
        return
    assert (st.samples, st.dropped_overlong, st.truncated) == (3, 0, 2)
    lengths = sorted(
        tuple(seq["doc_ids"].count(d) for d in (0, 1)) for seq in data.sequences if seq["doc_ids"].count(1)
    )
    assert lengths == [(24, 24), (24, 40), (32, 32)]
