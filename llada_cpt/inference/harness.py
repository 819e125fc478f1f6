"""lm-evaluation-harness model ``llada_cpt``: any checkpoint of the project on the harness's tasks.

``loglikelihood`` scores the continuation with the context clean:

* ``scoring=diffusion`` (trained checkpoints): the block-diffusion ELBO
  (:mod:`llada_cpt.diffusion.likelihood`), ``mc_samples`` seeded noise draws per
  request (seed = hash of the request's tokens, so results do not depend on
  batching or on the data-parallel split), all rows of a batch in one
  ``[x_t ; x_0]`` forward with the training attention layout.  Where every block
  holds at most one continuation token (block size 1) it is exact in one forward.
* ``scoring=ar``: the causal model read autoregressively (the clean half at block
  size 1): what a checkpoint imported from Hugging Face and not yet trained is.
  ``auto`` (default) picks ``ar`` for such an import and ``diffusion`` otherwise.

``diffusion`` scores over the real vocabulary (no padding rows, never ``[MASK]``),
as the sampler proposes; ``ar`` over the Hugging Face model's own rows (its
``vocab_size``, ``[MASK]`` included when it has one), so that it equals the
harness's ``hf`` model.  Rows go through the model in micro-batches of at most
``max_tokens_per_forward`` input tokens; the LM head computes logits only at the
scored positions (:func:`llada_cpt.model.head.head_input`: ``[n scored, V]``, never
``[rows, L, V]``), and only their target log-probability and argmax leave the device.
``loglikelihood_rolling`` scores the harness's rolling windows
of ``max_length`` tokens the same way; ``generate_until`` runs the project's
block sampler (:func:`llada_cpt.inference.generation.generate`, KV cache), greedy
unless the task asks for sampling, and cuts at the stop strings.

Data parallelism: the harness splits requests by :attr:`LladaLM.rank` /
``world_size`` = the data-parallel rank / size; the TP ranks of a replica score
the same requests in lockstep.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..diffusion.layout import AttentionLayout
from ..diffusion.likelihood import continuation_blocks, is_deterministic, request_seed, sample_block_masks
from ..errors import ConfigError
from ..model.head import head_input, x_t_half

__all__ = ["HarnessOptions", "LladaLM", "parse_model_args"]

SCORINGS = ("auto", "diffusion", "ar")
DTYPES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


@dataclass
class HarnessOptions:
    """``--model_args`` of the ``llada_cpt`` model (``key=value,...``)."""

    ckpt: str = ""  # run directory (follows `latest`) or iter_* directory
    block_size: Optional[int] = None  # default: the block size the checkpoint was trained at
    mc_samples: int = 32  # noise draws per loglikelihood request (block size > 1)
    scoring: str = "auto"  # auto | diffusion | ar
    max_length: Optional[int] = None  # tokens per scored window; default: data.seq_length (diffusion) / context (ar)
    threshold: float = 0.95  # sampler: commit positions more confident than this
    steps: Optional[int] = None  # sampler: max steps per block (default: the block size)
    min_tokens_per_step: int = 1
    temperature: float = 0.0  # default for tasks that do not set it (0 = greedy)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256  # default for tasks without max_gen_toks
    chat_template: str = "auto"  # for --apply_chat_template: the tokenizer's own template, else plain
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    tp: int = 1  # tensor-parallel size (needs --nproc a multiple of it)
    seed: int = 0
    batch_size: int = 8  # requests per scoring call (the harness's --batch_size)
    # input tokens (rows x padded width, both halves of [x_t ; x_0]) per model forward: bounds the activations
    # of one forward (the logits are only the scored positions'); a single longer row still runs alone
    max_tokens_per_forward: int = 8192

    def validate(self) -> None:
        if not self.ckpt:
            raise ConfigError("model_args need ckpt=RUN_OR_CHECKPOINT (a run directory or an iter_* directory)")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"model_args scoring={self.scoring!r} is not one of {', '.join(SCORINGS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model_args dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[self.dtype]
        for name in ("mc_samples", "min_tokens_per_step", "tp", "batch_size", "max_new_tokens",
                     "max_tokens_per_forward"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model_args {name}={getattr(self, name)} must be >= 1")
        for name in ("block_size", "steps", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model_args {name}={getattr(self, name)} must be >= 1")
        if not self.threshold >= 0:
            raise ConfigError(f"model_args threshold={self.threshold} must be >= 0 (> 1 disables it)")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("model_args need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


# the harness adds these to every model's arguments
_HARNESS_KEYS = ("max_batch_size", "device")


def _coerce(name: str, value: Any, kind: Any) -> Any:
    text = str(value).strip()
    if "int" in str(kind):
        if text.lower() in ("none", "auto") and "Optional" in str(kind):
            return None
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"model_args {name}={value!r} is not an integer") from None
    if "float" in str(kind):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"model_args {name}={value!r} is not a number") from None
    return text


def parse_model_args(args: Dict[str, Any]) -> HarnessOptions:
    """Typed, validated options; one :class:`ConfigError` naming an unknown key or a bad value."""
    known = {f.name: f.type for f in fields(HarnessOptions)}
    values = {}
    for key, value in args.items():
        if key in _HARNESS_KEYS:
            continue
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else f" Known: {', '.join(known)}."
            raise ConfigError(f"unknown model_args key `{key}`.{hint}")
        if value is None:
            continue
        if key == "batch_size" and str(value).startswith("auto"):
            continue  # the harness's auto batch size: keep ours
        values[key] = _coerce(key, value, known[key])
    opts = HarnessOptions(**values)
    opts.validate()
    return opts


class _TemplateSource:
    """The checkpoint's tokenizer plus the chat template of its ``tokenizer_config.json``, when it has one.

    Why: :mod:`llada_cpt.data.chat` renders ``tokenizer.chat_template`` (``auto``) but the
    project's :class:`~llada_cpt.data.tokenizer.Tokenizer` does not carry it.
    """

    def __init__(self, tokenizer) -> None:
        import os

        from ..data.records import read_json_if_present

        self._tokenizer = tokenizer
        path = os.path.join(os.path.dirname(str(tokenizer.path)), "tokenizer_config.json")
        config = read_json_if_present(path, "fix or remove it") or {}
        self.chat_template = config.get("chat_template")
        for key in ("bos_token", "eos_token"):
            value = config.get(key)
            setattr(self, key, value.get("content") if isinstance(value, dict) else value)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def _resolve_scoring(opts: HarnessOptions, info) -> str:
    if opts.scoring != "auto":
        return opts.scoring
    # a checkpoint written by `convert import` and not trained since is an autoregressive model
    return "ar" if "converted_from" in info.metrics else "diffusion"


@register_model("llada_cpt")
class LladaLM(TemplateLM):
    """The harness's view of a llada-cpt checkpoint (see the module docstring)."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        from .engine import inspect_checkpoint, load_model_for_inference

        self.opts = parse_model_args(model_args)
        info = inspect_checkpoint(self.opts.ckpt)
        self.scoring = _resolve_scoring(self.opts, info)
        self.block_size = self.opts.block_size or info.trained_block_size
        self.m = load_model_for_inference(info, tp=self.opts.tp, precision=self.opts.dtype, seed=self.opts.seed)
        self.info = info
        self.tokenizer = info.tokenizer
        default_len = info.context_length if self.scoring == "ar" else info.config.data.seq_length
        self._max_length = self.opts.max_length or min(default_len, info.context_length)
        from megatron.core import parallel_state as ps

        self._dp_group = ps.get_data_parallel_group()
        self._rank, self._world_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._device = next(self.m.model.parameters()).device

    # ------------------------------------------------------------------ harness plumbing

    @property
    def eot_token_id(self) -> int:
        return self.info.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{self.tokenizer.path}|{self.opts.chat_template}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        from ..data.chat import render_segments, validate_messages

        try:
            messages = validate_messages(chat_history, need_assistant_last=False)
            segments = render_segments(messages, _TemplateSource(self.tokenizer), self.opts.chat_template,
                                       loss_from=len(messages),
                                       generation_prompt=add_generation_prompt)
        except ValueError as err:
            raise ConfigError(f"chat template `{self.opts.chat_template}`: {err}") from None
        return "".join(text for text, _ in segments)

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        """The template name the results record (``model_args chat_template``)."""
        return self.opts.chat_template if chat_template else None

    def get_model_info(self) -> dict:
        return {"checkpoint": str(self.info.path), "block_size": self.block_size, "scoring": self.scoring,
                "mc_samples": self.opts.mc_samples, "max_length": self.max_length,
                "max_tokens_per_forward": self.opts.max_tokens_per_forward}

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._dp_group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        import torch.distributed as dist

        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self._dp_group, dst), group=self._dp_group)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def _progress(self, total: int, desc: str, disable: bool):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=disable or self._rank != 0, dynamic_ncols=True)

    # ------------------------------------------------------------------ scoring

    def _scoring_vocab(self) -> Tuple[int, Optional[int]]:
        """``(rows, excluded)``: the logit rows a score normalises over and the one id left out of them.

        ``ar`` is the Hugging Face model as imported: its own ``vocab_size`` rows (the
        harness's ``hf`` model softmaxes over exactly those), not the added mask row nor
        Megatron's padding.  ``diffusion`` is the sampler's vocabulary: the tokenizer's
        tokens without ``[MASK]``.
        """
        if self.scoring == "ar":
            return int(self.info.metrics.get("hf_vocab_size", self.tokenizer.vocab_size)), None
        return self.tokenizer.vocab_size, self.info.mask_id

    def _micro_batches(self, lengths: List[int], masked: bool) -> List[range]:
        """Consecutive row ranges whose forward input (rows x padded width) stays within ``max_tokens_per_forward``.

        The width is that of :meth:`_forward`'s layout: ``[x_t ; x_0]`` doubles it
        unless one block covers every row (MDLM layout).  A row over the cap runs alone.
        """
        cap, out, first, longest = self.opts.max_tokens_per_forward, [], 0, 0
        for i, n in enumerate(lengths):
            wide = max(longest, n)
            width = wide * (2 if masked and self.block_size < wide else 1)
            if i > first and (i - first + 1) * width > cap:
                out.append(range(first, i))
                first, wide = i, n
            longest = wide
        out.append(range(first, len(lengths)))
        return out

    def _forward(self, tokens: List[List[int]], masked: Optional[List[torch.Tensor]], rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, padded V]`` at the ``n`` positions ``(rows[j], cols[j])`` of one forward (on the
        device, model dtype); the head computes no others.

        ``masked`` None: causal forward of the clean rows (position ``k`` predicts
        token ``k + 1``).  Otherwise row ``i``'s masked positions are ``[MASK]`` in
        ``x_t`` and predicted in place, blocks of ``self.block_size``.
        """
        info, B = self.info, self.block_size
        L = max(len(t) for t in tokens)
        b = len(tokens)
        x0 = torch.full((b, L), info.eos_id, dtype=torch.long)
        docs = torch.ones((b, L), dtype=torch.long)  # padding is a document of its own, never attended to
        for i, t in enumerate(tokens):
            x0[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
            docs[i, : len(t)] = 0
        if masked is None:
            layout, inp = AttentionLayout(doc_ids=docs, block_size=1, causal=True), x0
        else:
            m = torch.zeros((b, L), dtype=torch.bool)
            for i, row in enumerate(masked):
                m[i, : row.numel()] = row
            xt = torch.where(m, torch.full_like(x0, info.mask_id), x0)
            mdlm = B >= L
            layout = AttentionLayout(doc_ids=docs, block_size=min(B, L), mdlm=mdlm)
            inp = xt if mdlm else torch.cat([xt, x0], dim=1)
        dev = self._device
        layout.doc_ids = layout.doc_ids.to(dev)
        module = self.m.model
        flat = (cols * b + rows).to(dev)  # the hidden states reach the head as [S, b, h]

        def scored(hidden: torch.Tensor) -> torch.Tensor:
            return hidden.reshape(-1, 1, hidden.shape[-1]).index_select(0, flat)

        half = head_input(module, x_t_half) if layout.num_copies == 2 else contextlib.nullcontext()
        with torch.no_grad(), half, head_input(module, scored):
            logits = module(inp.to(dev), layout.position_ids(local=False).to(dev), attention_mask=layout,
                            runtime_gather_output=True)
        return logits[0]  # [1, n, V]: the n scored positions are the head's "sequence"

    def _score_rows(self, tokens: List[List[int]], masked: Optional[List[torch.Tensor]],
                    spans: List[Tuple[int, List[int]]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per row, ``(log p(target) [n] float64, argmax == target [n] bool)`` at positions ``start .. start + n``.

        ``spans[i] = (start, targets)``; the forward is :meth:`_forward`'s, in
        micro-batches (:meth:`_micro_batches`).  Only the scored positions' logits are
        normalised (log-sum-exp over :meth:`_scoring_vocab`), on the device.
        """
        vocab, excluded = self._scoring_vocab()
        out: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for part in self._micro_batches([len(t) for t in tokens], masked is not None):
            rows = torch.cat([torch.full((len(spans[i][1]),), j, dtype=torch.long) for j, i in enumerate(part)])
            cols = torch.cat([torch.arange(spans[i][0], spans[i][0] + len(spans[i][1])) for i in part])
            logits = self._forward([tokens[i] for i in part], None if masked is None else [masked[i] for i in part],
                                   rows, cols)
            target = torch.cat([torch.as_tensor(spans[i][1], dtype=torch.long) for i in part]).to(logits.device)
            picked = logits[:, :vocab].float()
            del logits
            if excluded is not None:
                picked[:, excluded] = float("-inf")  # the mask is never a prediction (as in the sampler)
            lp = picked.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)
            hit = picked.argmax(-1) == target
            for lp_i, hit_i in zip(lp.double().cpu().split([len(spans[i][1]) for i in part]),
                                   hit.cpu().split([len(spans[i][1]) for i in part])):
                out.append((lp_i, hit_i))
        return out

    def _ar_scores(self, reqs: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        rows, spans = [], []
        for ctx, cont in reqs:
            whole = (ctx + cont)[-(self.max_length + 1):]
            rows.append(whole[:-1])
            spans.append((len(whole) - 1 - len(cont), cont))
        return [(float(lp.sum()), bool(hit.all())) for lp, hit in self._score_rows(rows, None, spans)]

    def _diffusion_rows(self, ctx: List[int], cont: List[int]):
        """The forward rows of one request: ``(tokens, [(masked, weight)] samples, greedy masked row)``."""
        tokens = (ctx + cont)[-self.max_length:]
        c = len(tokens) - len(cont)
        blocks = continuation_blocks(c, len(cont), self.block_size)
        everything = torch.zeros(len(tokens), dtype=torch.bool)
        everything[c:] = True
        if is_deterministic(blocks):
            return tokens, c, [(everything, torch.ones(len(cont), dtype=torch.float64))], None
        g = torch.Generator().manual_seed(request_seed(self.opts.seed, ctx, cont))
        masked, weight = sample_block_masks(blocks, self.opts.mc_samples, g)
        samples = []
        for s in range(masked.shape[0]):
            row = torch.zeros(len(tokens), dtype=torch.bool)
            row[c:] = masked[s]
            samples.append((row, weight[s]))
        return tokens, c, samples, everything

    def _diffusion_scores(self, reqs: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        rows: List[List[int]] = []
        masks: List[torch.Tensor] = []
        spans: List[Tuple[int, List[int]]] = []
        plan = []
        for ctx, cont in reqs:
            tokens, c, samples, greedy = self._diffusion_rows(ctx, cont)
            first = len(rows)
            for row, _ in samples + ([(greedy, None)] if greedy is not None else []):
                rows.append(tokens)
                masks.append(row)
                spans.append((c, cont))
            plan.append((first, [w for _, w in samples], greedy is not None))
        scored = self._score_rows(rows, masks, spans)
        out = []
        for first, weights, has_greedy in plan:
            estimates = [float((w * scored[first + s][0]).sum()) for s, w in enumerate(weights)]
            greedy_hit = scored[first + len(weights) if has_greedy else first][1]
            out.append((sum(estimates) / len(estimates), bool(greedy_hit.all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        reqs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ConfigError("a loglikelihood request has an empty continuation; nothing to score")
            if len(cont) > self.max_length - (self.scoring == "diffusion"):
                raise ConfigError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}; "
                                  "raise model_args max_length")
            reqs.append((list(ctx), list(cont)))
        # longest first (padding stays small within a batch); results go back in request order
        order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
        score = self._ar_scores if self.scoring == "ar" else self._diffusion_scores
        results: List[Optional[Tuple[float, bool]]] = [None] * len(reqs)
        bar = self._progress(len(reqs), "loglikelihood", disable_tqdm)
        size = self.opts.batch_size
        for i in range(0, len(order), size):
            chunk = order[i:i + size]
            for j, r in zip(chunk, score([reqs[j] for j in chunk])):
                results[j] = r
                if requests[j][0][0] is not None:  # not a rolling window
                    self.cache_hook.add_partial("loglikelihood", requests[j][0], r)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        # a window's tokens (context + continuation) must fit: max_length + 1 for ar (the last is only a target)
        span = self.max_length if self.scoring == "ar" else self.max_length - 1
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=span,
                    context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation

    def _sampler_config(self, kwargs: dict):
        from .sampler import SamplerConfig

        kwargs = dict(kwargs)
        kwargs.pop("until", None)
        max_gen = int(kwargs.pop("max_gen_toks", self.opts.max_new_tokens))
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", self.opts.temperature))
        if do_sample is False:
            temperature = 0.0
        info = self.info
        cfg = SamplerConfig(
            block_size=self.block_size, threshold=self.opts.threshold,
            min_tokens_per_step=self.opts.min_tokens_per_step,
            max_steps_per_block=self.opts.steps, max_new_tokens=max_gen, temperature=temperature,
            top_p=float(kwargs.pop("top_p", self.opts.top_p)), top_k=int(kwargs.pop("top_k", self.opts.top_k)),
            batch_size=self.opts.batch_size, seed=self.opts.seed, mask_id=info.mask_id, eos_id=info.eos_id,
            vocab_size=self.tokenizer.vocab_size, context_length=info.context_length)
        cfg.validate()
        return cfg

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from .generation import generate

        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: List[Optional[str]] = [None] * len(requests)
        bar = self._progress(len(requests), "generate_until", disable_tqdm)
        for key, idx in groups.items():
            kwargs = json.loads(key)
            cfg = self._sampler_config(kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            keep = max(self.info.context_length - cfg.max_new_tokens, 1)
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in idx]
            out = generate(self.m, prompts, cfg)
            for i, r in zip(idx, out):
                text = r.text or ""
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]

