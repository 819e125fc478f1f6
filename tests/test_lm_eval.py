"""``llada-cpt lm-eval``: the harness model ``llada_cpt`` against the harness's own ``hf`` model and ``generate``.

One random-weight Llama (the ``tests/test_convert.py`` recipe: every parameter
randomised, a word-level tokenizer) is imported with ``llada-cpt convert import``;
local harness tasks over its words (multiple choice, rolling perplexity,
generation) run offline (``HF_DATASETS_OFFLINE=1``).  The Monte-Carlo ELBO is
checked against the ELBO computed exactly by enumerating every mask pattern.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers

from dist import run_distributed
from run_helpers import REPO, cli, run
from test_convert import COMMON, _randomise, _word_level_tokenizer

pytest.importorskip("lm_eval")

OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
STOP = "w5"


def _docs(n: int = 6) -> list:
    r = random.Random(0)

    def words(k: int) -> str:
        return " ".join(f"w{r.randrange(2, 98)}" for _ in range(k))

    rows = []
    for i in range(n):
        ctx, choices = words(r.randrange(3, 9)), [words(r.randrange(1, 4)) for _ in range(3)]
        rows.append({"context": ctx, "choices": choices, "label": i % 3, "text": ctx + " " + " ".join(choices)})
    return rows


def _write_tasks(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "words.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "words_mc.yaml").write_text(
        f"task: words_mc\n{head}output_type: multiple_choice\ndoc_to_text: \"{{{{context}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (root / "words_ppl.yaml").write_text(
        f"task: words_ppl\n{head}output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    (root / "words_gen.yaml").write_text(
        f"task: words_gen\n{head}output_type: generate_until\ndoc_to_text: \"{{{{context}}}}\"\n"
        f"doc_to_target: \"{{{{text}}}}\"\ngeneration_kwargs:\n  until: [\"{STOP}\"]\n  max_gen_toks: 8\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lm_eval")
    config = transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise(model, seed=7)
    model.save_pretrained(root / "hf")
    _word_level_tokenizer(root / "hf")
    proc = run(cli("convert", "import", "--hf", str(root / "hf"), "--out", str(root / "ckpt")), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "hf": root / "hf", "ckpt": root / "ckpt", "tasks": _write_tasks(root / "tasks")}


def _lm_eval(setup: dict, name: str, model_args: str, tasks: list, *extra: str) -> dict:
    """Run the CLI; ``{task: {doc_id: resps}}`` from the logged samples."""
    out = setup["root"] / name
    proc = run(cli("lm-eval", "--model_args", f"ckpt={setup['ckpt']},{model_args}", "--tasks", *tasks,
                   "--include_path", str(setup["tasks"]), "--output_path", str(out), "--log_samples", *extra),
               cwd=REPO, timeout=600, **OFFLINE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples: dict = {}
    for f in out.glob("*/samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        for line in f.read_text().splitlines():
            row = json.loads(line)
            # an instance the harness repeated to even out the ranks' work holds its answer twice
            samples.setdefault(task, {})[row["doc_id"]] = [r[:1] for r in row["resps"]]
    assert set(samples) == set(tasks), (sorted(samples), proc.stdout[-2000:])
    files = sorted(p.name.rsplit("_", 1)[0] for p in out.rglob("*") if p.is_file())  # without the time stamps
    return {"samples": samples, "stdout": proc.stdout, "files": files}


def _floats(resps) -> list:
    """Log-likelihoods of a sample's responses (the harness logs them as strings)."""
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in resps]


@pytest.fixture(scope="module")
def diffusion_runs(setup) -> dict:
    args = "scoring=diffusion,block_size=2,mc_samples=4"
    tasks = ["words_mc", "words_gen", "llada_arith_mc"]
    return {"one": _lm_eval(setup, "diff1", args, tasks, "--limit", "3"),
            "two": _lm_eval(setup, "diff2", args, tasks, "--limit", "3", "--nproc", "2")}


def test_block_size_one_likelihoods_equal_the_harness_hf_model(setup):
    """A fresh import scores autoregressively (scoring=auto): per request equal to the `hf` model, fp32."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = _lm_eval(setup, "ar", "block_size=1,max_length=8", ["words_mc", "words_ppl"])["samples"]
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['hf']},dtype=float32,device=cpu,"
                                  "max_length=8", tasks=["words_mc", "words_ppl"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(setup["tasks"])), batch_size=4)
    compared = 0
    for task in ("words_mc", "words_ppl"):
        for s in ref["samples"][task]:
            theirs = [r[0][0] if isinstance(r[0], tuple) else r[0] for r in s["resps"]]
            mine = _floats(ours[task][s["doc_id"]])
            assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-5), (task, s["doc_id"])
            compared += len(theirs)
    assert compared == 6 * 3 + 6  # every choice and every (multi-window: max_length 8) document


def test_generation_equals_llada_cpt_generate(setup, diffusion_runs, tmp_path):
    docs = _docs()[:3]
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--ckpt", str(setup["ckpt"]), "--block-size", "2", "--max-new-tokens", "8",
            "--chat-template", "raw", "--quiet", "--output", str(out)]
    for d in docs:
        args += ["--prompt", d["context"]]
    proc = run(cli(*args), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    expected = [t[: t.index(STOP)] if STOP in t else t for t in texts]
    got = diffusion_runs["one"]["samples"]["words_gen"]
    assert [got[i][0][0] for i in range(3)] == expected
    assert any(t for t in expected)


def test_two_processes_give_the_results_of_one(diffusion_runs):
    one, two = diffusion_runs["one"], diffusion_runs["two"]
    assert one["samples"] == two["samples"]  # same noise per request whatever the split; same generations
    assert two["files"] == one["files"] and len(one["files"]) == 4  # results + 3 sample files, written once
    assert two["stdout"].count("|words_mc ") == 1  # one table, from rank 0
    mc = [_floats(r) for r in one["samples"]["words_mc"].values()]
    assert all(math.isfinite(x) and x < 0 for row in mc for x in row)


# ------------------------------------------------------------------------ the estimator is unbiased


def _elbo_checks(rank: int, world: int, ckpt: str) -> dict:
    from llada_cpt.diffusion.likelihood import mask_patterns, pattern_weight
    from llada_cpt.inference.harness import LladaLM

    lm = LladaLM(ckpt=ckpt, scoring="diffusion", block_size=2, mc_samples=1)
    ctx, cont = [5, 9, 13], [21, 34, 55]  # positions 3 | 4 5: the continuation spans two blocks

    def exact(block_size: int) -> float:
        lm.block_size = block_size
        tokens, total = ctx + cont, 0.0
        for pattern in mask_patterns(len(cont)):
            row = torch.tensor([False] * len(ctx) + pattern)
            logp = lm._score_rows([tokens], [row], [(len(ctx), cont)])[0][0]
            picked = sum(float(logp[k]) for k, m in enumerate(pattern) if m)
            total += pattern_weight(sum(pattern), len(cont)) * picked
        return total

    out = {"exact_b1": exact(1), "estimate_b1": lm._diffusion_scores([(ctx, cont)])[0][0], "exact": exact(2)}
    draws = []
    for seed in range(300):
        lm.opts.seed = seed
        draws.append(lm._diffusion_scores([(ctx, cont)])[0][0])
    out["draws"] = draws
    # a request's noise does not depend on what it is batched with, or in which order
    lm.opts.seed, lm.opts.mc_samples = 0, 3
    reqs = [(ctx, cont), ([7, 8], [9, 10, 11]), ([3], [4])]
    together = lm._diffusion_scores(reqs)
    alone = [lm._diffusion_scores([r])[0] for r in reqs[::-1]][::-1]
    out["batching"] = (together, alone)
    return out


def test_monte_carlo_elbo_is_unbiased_and_exact_at_block_size_one(setup):
    res = run_distributed(_elbo_checks, 1, str(setup["ckpt"]))[0]
    assert "traceback" not in res, res.get("traceback")
    # block size 1: one block per token, the estimate is the exact ELBO (= the in-place AR factorisation)
    assert res["estimate_b1"] == pytest.approx(res["exact_b1"], rel=1e-5)
    draws = torch.tensor(res["draws"], dtype=torch.float64)
    mean, se = float(draws.mean()), float(draws.std() / math.sqrt(len(draws)))
    assert se > 1e-3  # it is a real estimate at block size 2
    assert abs(mean - res["exact"]) < 3 * se, (mean, se, res["exact"])
    together, alone = res["batching"]  # same noise; only float rounding of differently shaped batches
    assert [g for _, g in together] == [g for _, g in alone]
    assert [v for v, _ in together] == pytest.approx([v for v, _ in alone], rel=1e-6)


# ------------------------------------------------------------------------ memory bound, ar = hf exactly


def _cap_checks(rank: int, world: int, ckpt: str) -> dict:
    from llada_cpt.inference.harness import LladaLM

    lm = LladaLM(ckpt=ckpt, scoring="diffusion", block_size=2, mc_samples=4)
    seen: list = []
    forward = lm.m.model.forward

    def recording(inp, *args, **kwargs):
        seen.append(tuple(inp.shape))  # [rows, input width]
        return forward(inp, *args, **kwargs)

    lm.m.model.forward = recording
    head: list = []  # [positions, rows, vocab] of every output-layer call: the logits the head computed
    lm.m.model.output_layer.register_forward_hook(lambda _m, _a, out: head.append(tuple(out[0].shape)))
    reqs = [([5, 9, 13, 2, 7], [21, 34, 55]), ([7, 8], [9, 10, 11, 12]), ([3], [4]), ([6, 6, 6], [8, 9])]
    out = {}
    for scoring, score in (("diffusion", lm._diffusion_scores), ("ar", lm._ar_scores)):
        lm.scoring = scoring
        for cap in (10 ** 9, 30, 16, 1):
            lm.opts.max_tokens_per_forward = cap
            seen.clear()
            head.clear()
            out[scoring, cap] = (score(reqs), list(seen), list(head))
    return out


def test_forwards_stay_within_max_tokens_per_forward_and_scores_do_not_change(setup):
    res = run_distributed(_cap_checks, 1, str(setup["ckpt"]))[0]
    assert "traceback" not in res, res.get("traceback")
    # block size 2: two requests span a block with two continuation tokens (4 draws + the greedy row each), two
    # hold one continuation token per block (one exact row each)
    for scoring, rows in (("diffusion", 2 * (4 + 1) + 2), ("ar", 4)):
        unbounded, unbounded_seen, logits = res[scoring, 10 ** 9]
        assert [b for b, _ in unbounded_seen] == [rows]  # everything in one forward without a cap
        # the head computes logits at the scored positions only: [n, 1, V], not [L, rows, V]
        (n, one, _), = logits
        assert one == 1 and n < rows * unbounded_seen[0][1] // (2 if scoring == "diffusion" else 1)
        if scoring == "ar":
            assert n == 3 + 4 + 1 + 2  # the continuation tokens
        for cap in (30, 16, 1):
            scores, seen, _ = res[scoring, cap]
            assert sum(b for b, _ in seen) == rows
            assert all(b * width <= cap or b == 1 for b, width in seen), (scoring, cap, seen)
            assert [g for _, g in scores] == [g for _, g in unbounded]
            assert [v for v, _ in scores] == pytest.approx([v for v, _ in unbounded], rel=1e-6)
        assert [b for b, _ in res[scoring, 1][1]] == [1] * rows  # a row wider than the cap runs alone
        assert max(b for cap in (30, 16) for b, _ in res[scoring, cap][1]) > 1  # the cap packs rows


def _ar_and_hf(rank: int, world: int, ckpt: str, hf_dir: str) -> dict:
    from llada_cpt.inference.harness import LladaLM

    lm = LladaLM(ckpt=ckpt)  # a fresh import: scoring=auto is ar
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    # 99 = the tokenizer's own [MASK], an ordinary HF token; the first request pins the normaliser alone
    reqs = [([5, 9, 13, 2], [21, 34]), ([5, 9, 13, 2], [21, 34, 99])]
    ref = []
    for ctx, cont in reqs:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
        ref.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
    return {"scoring": lm.scoring, "ours": [v for v, _ in lm._ar_scores(reqs)], "hf": ref,
            "mask_id": lm.info.mask_id}


def test_ar_scoring_is_the_hf_softmax_even_with_the_mask_in_its_vocabulary(setup):
    """scoring=ar normalises over the HF model's own rows: [MASK] included when the HF vocabulary holds it."""
    import shutil

    hf = setup["root"] / "hf_mask"
    shutil.copytree(setup["hf"], hf)
    _word_level_tokenizer(hf, with_mask=True)  # [MASK] = id 99, inside the HF model's 100 rows
    proc = run(cli("convert", "import", "--hf", str(hf), "--out", str(setup["root"] / "ckpt_mask")), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = run_distributed(_ar_and_hf, 1, str(setup["root"] / "ckpt_mask"), str(hf))[0]
    assert "traceback" not in res, res.get("traceback")
    assert res["scoring"] == "ar" and res["mask_id"] == 99
    assert res["ours"] == pytest.approx(res["hf"], rel=1e-5)


# ------------------------------------------------------------------------ shipped tasks, bad input


def test_shipped_tasks_load_offline(monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    from llada_cpt.eval_tasks import TASKS_DIR

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tasks = get_task_dict(["llada_arith", "llada_arith_mc", "llada_text_ppl"],
                          TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    docs = {name: list(t.test_docs()) for name, t in tasks.items()}
    assert len(docs["llada_arith"]) == len(docs["llada_arith_mc"]) == 200 and len(docs["llada_text_ppl"]) > 50
    for d in docs["llada_arith_mc"]:
        assert len(set(d["choices"])) == 4 and d["choices"][d["label"]]
    assert tasks["llada_arith"].config.generation_kwargs["until"] == ["\n"]


@pytest.mark.parametrize("model_args, message", [
    ("bogus=1", "unknown model_args key `bogus`"),
    ("mc_sample=3", "Did you mean `mc_samples`?"),
    ("mc_samples=0", "mc_samples=0 must be >= 1"),
    ("block_size=big", "block_size='big' is not an integer"),
    ("scoring=exact", "scoring='exact' is not one of auto, diffusion, ar"),
    ("dtype=fp8", "dtype='fp8'"),
    ("max_tokens_per_forward=0", "max_tokens_per_forward=0 must be >= 1"),
])
def test_bad_model_args_are_one_clear_error(setup, capsys, model_args, message):
    from llada_cpt.cli import main

    code = main(["lm-eval", "--model_args", f"ckpt={setup['ckpt']},{model_args}", "--tasks", "words_mc"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llada-cpt lm-eval: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0]


def test_missing_checkpoint_and_tasks_are_named(tmp_path, capsys):
    from llada_cpt.cli import main

    assert main(["lm-eval", "--model_args", f"ckpt={tmp_path / 'nope'}", "--tasks", "words_mc"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lm-eval", "--model_args", "block_size=4", "--tasks", "words_mc"]) == 2
    assert "ckpt=RUN_OR_CHECKPOINT" in capsys.readouterr().err
    assert main(["lm-eval", "--model_args", f"ckpt={tmp_path}"]) == 2
    assert "no --tasks given" in capsys.readouterr().err


def test_chat_template_is_the_tokenizers_own_when_it_has_one(tmp_path):
    from llada_cpt.data.tokenizer import Tokenizer
    from llada_cpt.inference.harness import LladaLM, parse_model_args

    _word_level_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    lm = LladaLM.__new__(LladaLM)  # the template needs no model
    lm.tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json")
    chat = [{"role": "user", "content": "w1 w2"}]
    lm.opts = parse_model_args({"ckpt": "x"})
    assert lm.apply_chat_template(chat) == "<user>w1 w2<assistant>"
    lm.opts = parse_model_args({"ckpt": "x", "chat_template": "chatml"})
    assert lm.apply_chat_template(chat).endswith("<|im_start|>assistant\n")
    assert lm.chat_template(True) == "chatml" and lm.chat_template(False) is None
