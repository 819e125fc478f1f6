"""Which checkpoints of a run count: top-k selection by a metric, and retention.

``llada-cpt merge --top-k`` averages the checkpoints :func:`select_top_k` picks,
and training's retention (``checkpoint.keep_best``) keeps exactly those, with the
same scoring and tie-break, so deleting old checkpoints never removes one a later
merge would want.  No Megatron or torch import: both the offline merge and the
training loop use it.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import UserError
from . import paths as ckpt
from .info import CheckpointInfo
from .paths import CheckpointError

__all__ = ["DEFAULT_METRIC", "MergeError", "score", "Selection", "normalise_weights",
           "select_top_k", "select_explicit", "apply_retention"]

DEFAULT_METRIC = "val_ppl"


class MergeError(UserError, ValueError):
    """The requested merge is impossible or unsafe (mismatched inputs, bad output path, bad weights)."""


def score(info: CheckpointInfo, metric: str) -> Tuple[Optional[float], str]:
    """``(value, "")`` or ``(None, why it cannot be ranked)``: a finite number in ``metrics.json``."""
    value = info.metrics.get(metric)
    if value is None:
        return None, f"no `{metric}` in metrics.json"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"`{metric}` is {value!r}, not a number"
    if not math.isfinite(value):
        return None, f"`{metric}` is {value}"
    return float(value), ""


@dataclass
class Selection:
    """The checkpoints to merge, their normalised weights, and what was left out and why."""

    chosen: List[CheckpointInfo]
    weights: List[float]
    metric: Optional[str] = None
    mode: Optional[str] = None
    skipped: List[Tuple[CheckpointInfo, str]] = field(default_factory=list)
    protected: List[Path] = field(default_factory=list)  # directories the output must stay out of

    def describe(self) -> str:
        metric = self.metric or DEFAULT_METRIC
        lines = [f"  {'#':>2}  {'iteration':>9}  {metric:>12}  {'weight':>7}  path"]
        for i, (c, w) in enumerate(zip(self.chosen, self.weights), 1):
            value, _ = score(c, metric)
            shown = f"{value:.6g}" if value is not None else "-"
            lines.append(f"  {i:>2}  {c.iteration:>9}  {shown:>12}  {w:>7.4f}  {c.path}")
        for c, why in self.skipped:
            lines.append(f"  skipped {c.path.name}: {why}")
        return "\n".join(lines)


def normalise_weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    """Uniform ``1/n`` without weights; else the given weights scaled to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} checkpoints; pass one weight per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise MergeError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise MergeError("the weights sum to 0; give at least one checkpoint a positive weight")
    return [w / total for w in weights]


def select_top_k(run_dir: str | Path, k: int, metric: str = DEFAULT_METRIC, mode: str = "min",
                 weights: Optional[Sequence[float]] = None) -> Selection:
    """The ``k`` best complete checkpoints of a run by ``metric`` (ties: newer first).

    Checkpoints without a finite numeric ``metric`` are reported as skipped.
    ``weights``, if given, apply in rank order (best first).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run directory `{run}` does not exist; pass the checkpoint.save_dir of a run")
    if k < 1:
        raise MergeError(f"--top-k must be >= 1, got {k}")
    if mode not in ("min", "max"):
        raise MergeError(f"--mode must be `min` or `max`, got `{mode}`")
    scored, skipped = [], []
    for path in ckpt.list_checkpoints(run):
        try:
            cand = CheckpointInfo.read(path)
        except CheckpointError as err:  # a damaged metrics.json: not rankable, like one without the metric
            cand, (value, why) = CheckpointInfo(path, {}), (None, str(err))
        else:
            value, why = score(cand, metric)
        if value is None:
            skipped.append((cand, why))
        else:
            scored.append((value, cand))
    if len(scored) < k:
        listed = ", ".join(f"{c.path.name} ({why})" for c, why in skipped) or "none"
        raise CheckpointError(
            f"`{run}` has {len(scored)} checkpoint(s) with `{metric}` but --top-k is {k} "
            f"(unscored: {listed}); lower --top-k or evaluate more checkpoints")
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda vc: (sign * vc[0], -vc[1].iteration))
    chosen = [c for _, c in scored[:k]]
    return Selection(chosen, normalise_weights(weights, k), metric, mode, skipped, protected=[run])


def select_explicit(paths: Sequence[str | Path], weights: Optional[Sequence[float]] = None,
                    metric: str = DEFAULT_METRIC) -> Selection:
    """The given checkpoints (iter_* or run directories, which follow ``latest``), in that order."""
    if not paths:
        raise MergeError("no checkpoints given; pass --ckpts A B ... or --run-dir RUN --top-k K")
    resolved, protected = [], []
    for p in paths:
        if not Path(p).exists():
            raise CheckpointError(f"checkpoint `{p}` does not exist; pass an iter_* or run directory")
        resolved.append(ckpt.resolve_checkpoint(p))
        protected.append(Path(p))
    seen = set()
    for p in resolved:
        if p.resolve() in seen:
            raise MergeError(f"`{p}` is listed twice; use --weights to weight one checkpoint more")
        seen.add(p.resolve())
    chosen = [CheckpointInfo.read(p) for p in resolved]
    return Selection(chosen, normalise_weights(weights, len(chosen)), metric, None, [], protected)


def apply_retention(save_dir: str | Path, keep_last: int, keep_best: int, metric: str = DEFAULT_METRIC) -> list[Path]:
    """Delete old checkpoints beyond the newest ``keep_last``, never one of the best ``keep_best``
    by ``metric`` (what ``llada-cpt merge --top-k`` would pick) and never the one ``latest`` names.

    ``keep_last <= 0`` keeps everything.  Call it on one rank only.
    """
    if keep_last <= 0:
        return []
    ckpts = ckpt.list_checkpoints(save_dir)
    keep = set(ckpts[-keep_last:])
    latest = ckpt.latest_checkpoint(save_dir)
    if latest is not None:
        keep.add(latest)
    for k in range(min(keep_best, len(ckpts)), 0, -1):  # fewer scored checkpoints than keep_best: all
        try:
            keep.update(c.path for c in select_top_k(save_dir, k, metric).chosen)
            break
        except CheckpointError:
            continue
    removed = [p for p in ckpts if p not in keep]
    for p in removed:
        shutil.rmtree(p)
    return removed
