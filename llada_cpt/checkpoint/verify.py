"""Is a checkpoint complete?  Checked from its files alone, without loading it into a model.

``llada-cpt checkpoint verify PATH`` runs it on one checkpoint or on every
checkpoint of a run (and on what ``latest`` names); training runs it on the
checkpoint it is about to resume from, so a truncated shard or a missing RNG
file becomes one line naming the checkpoint and the way out, instead of an
``EOFError`` from every rank.

What is checked: Megatron's ``metadata.json`` and DCP's ``.metadata`` are
readable; every file the DCP metadata lists exists with exactly the size its
stored items end at; ``common.pt`` and the per-rank RNG files are whole zip
archives (``torch.save``'s format: the central directory sits at the end, so a
truncated file fails); ``config.yaml`` and ``metrics.json`` parse.  Optimizer
state and RNG files are what a resume needs; merged and converted checkpoints
hold weights only and are valid for ``train.init_from``, ``generate``, ``eval``.

No Megatron import (the CLI command starts in about a second).
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from .paths import (
    COMMON_FILE,
    CONFIG_FILE,
    DCP_METADATA,
    LATEST,
    MEGATRON_CONFIG,
    METRICS_FILE,
    CheckpointError,
    list_checkpoints,
)

__all__ = ["Verdict", "verify_checkpoint", "verify_run", "require_complete", "main"]



@dataclass
class Verdict:
    """What one checkpoint directory holds and what is wrong with it."""

    path: Path
    problems: List[str] = field(default_factory=list)
    parts: List[str] = field(default_factory=list)
    resumable: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if not self.ok:
            return f"{self.path}: CORRUPT - {'; '.join(self.problems)}"
        use = "resumable" if self.resumable else "weights only: for train.init_from, generate, eval, convert"
        return f"{self.path}: ok ({', '.join(self.parts)}; {use})"


def _zip_problem(path: Path) -> Optional[str]:
    """None when ``path`` is a whole ``torch.save`` archive, else what is wrong."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"{path.name} is damaged ({err})"
    return None


def _storage_problems(path: Path, verdict: Verdict) -> None:
    """DCP metadata readable; every file it lists present with the size its items end at."""
    import pickle

    meta_file = path / DCP_METADATA
    if not meta_file.is_file():
        verdict.problems.append(f"{DCP_METADATA} is missing (the save did not finish)")
        return
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as err:
        verdict.problems.append(f"{DCP_METADATA} cannot be read ({type(err).__name__}: {err})")
        return
    ends: dict = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name in sorted(ends):
        f = path / name
        if not f.is_file():
            verdict.problems.append(f"file {name} is missing")
            continue
        size = f.stat().st_size
        if size < ends[name]:
            verdict.problems.append(f"file {name}: unexpected end of data ({size} of {ends[name]} bytes)")
        # a longer file is not damage: a writer may pad or append a trailer after the items it lists
    keys = list(metadata.state_dict_metadata)
    if any(not k.startswith("optimizer.") for k in keys):
        verdict.parts.append("model")
    else:
        verdict.problems.append("no model weights in the metadata")
    if any(k.startswith("optimizer.") for k in keys):
        verdict.parts.append("optimizer")


def verify_checkpoint(path: str | Path, weights_only: bool = False) -> Verdict:
    """Check one ``iter_*`` directory (see the module doc); never raises for a damaged checkpoint.

    ``weights_only``: only what loading the model weights needs (a merge's inputs); a training
    checkpoint's metrics, config and RNG files may then be missing.
    """
    import yaml

    path = Path(path)
    verdict = Verdict(path)
    if not path.is_dir():
        verdict.problems.append("not a directory")
        return verdict
    cfg_file = path / MEGATRON_CONFIG
    try:
        backend = json.loads(cfg_file.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            verdict.problems.append(f"{MEGATRON_CONFIG} names the `{backend}` backend; only torch_dist is supported")
    except FileNotFoundError:
        verdict.problems.append(f"{MEGATRON_CONFIG} is missing (not a Megatron dist checkpoint, or the save did "
                                "not finish)")
        return verdict
    except (OSError, ValueError, AttributeError) as err:
        verdict.problems.append(f"{MEGATRON_CONFIG} is damaged ({err})")
    _storage_problems(path, verdict)
    problem = _zip_problem(path / COMMON_FILE)
    if problem:
        verdict.problems.append(problem)
    training = "optimizer" in verdict.parts and not weights_only  # a training save always writes these
    metrics: dict = {}
    try:
        metrics = json.loads((path / METRICS_FILE).read_text())
        verdict.parts.append("metrics")
    except FileNotFoundError:
        if training:
            verdict.problems.append("metrics.json is missing")
    except (OSError, ValueError) as err:
        verdict.problems.append(f"metrics.json is damaged ({err})")
    try:
        yaml.safe_load((path / CONFIG_FILE).read_text())
        verdict.parts.append("config")
    except FileNotFoundError:
        if training:
            verdict.problems.append("config.yaml is missing")
    except (OSError, ValueError, yaml.YAMLError) as err:
        verdict.problems.append(f"config.yaml is damaged ({type(err).__name__})")
    rng_files = sorted((path / "rng").glob("rank_*.pt"))
    world = metrics.get("world_size") if isinstance(metrics, dict) else None
    if rng_files or training:
        expected = int(world) if isinstance(world, int) and world > 0 else len(rng_files)
        names = {f.name for f in rng_files}
        missing = [f"rank_{r:05d}.pt" for r in range(expected) if f"rank_{r:05d}.pt" not in names]
        if missing:
            verdict.problems.append(f"rng/{missing[0]} is missing ({len(missing)} of {expected} RNG files)")
        elif not rng_files:
            verdict.problems.append("the rng/ files are missing")
        for f in rng_files:
            problem = _zip_problem(f)
            if problem:
                verdict.problems.append(f"rng/{problem}")
        verdict.parts.append(f"rng x{len(rng_files)}")
    verdict.resumable = training and bool(rng_files) and {"metrics", "config"} <= set(verdict.parts)
    return verdict


@dataclass
class RunReport:
    """Every checkpoint of a run directory and what ``latest`` names."""

    run_dir: Path
    verdicts: List[Verdict]
    latest_line: Optional[str]
    latest_ok: bool
    partial: List[Path]

    @property
    def ok(self) -> bool:
        return self.latest_ok and all(v.ok for v in self.verdicts)

    def lines(self) -> List[str]:
        out = [v.line() for v in self.verdicts]
        out += [f"{p}: partial save, ignored (safe to delete)" for p in self.partial]
        if self.latest_line:
            out.append(self.latest_line)
        return out


def verify_run(run_dir: str | Path) -> RunReport:
    """Verify every ``iter_*`` of ``run_dir`` (complete or not) and the checkpoint ``latest`` names."""
    root = Path(run_dir)
    dirs = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))
    partial = sorted(p for p in root.glob("iter_*.tmp") if p.is_dir())
    verdicts = [verify_checkpoint(p) for p in dirs]
    pointer = root / LATEST
    latest_line, latest_ok = None, True
    if pointer.is_file():
        name = pointer.read_text().strip()
        match = next((v for v in verdicts if v.path.name == name), None)
        if match is None:
            latest_ok = False
            latest_line = f"{pointer}: names `{name}`, which does not exist"
        elif not match.ok:
            latest_ok = False
            latest_line = f"{pointer}: names {name}, which is CORRUPT"
        else:
            latest_line = f"{pointer}: {name} (complete)"
    elif verdicts:
        latest_line = f"{pointer}: missing (a resume would start from scratch)"
    return RunReport(root, verdicts, latest_line, latest_ok, partial)


def _way_out(path: Path) -> str:
    """What to do about a damaged checkpoint ``path`` of a run: the previous complete one, if any."""
    root = path.parent
    older = [p for p in reversed(list_checkpoints(root)) if p.name < path.name]
    good = next((p for p in older if verify_checkpoint(p).ok), None)
    if good is None:
        return (f"delete {path} (and {root / LATEST} if it names it) to start again, or restore it from a copy")
    return (f"to resume from the previous complete checkpoint {good.name}, delete {path} and write "
            f"`{good.name}` into {root / LATEST}")


_VERIFIED: set = set()  # (checkpoint, resume) verified by this process; checkpoints are never rewritten in place


def require_complete(path: str | Path, resume: bool = False) -> None:
    """Raise :class:`CheckpointError` naming ``path``, the first problem and what to do.

    ``resume``: the optimizer state and RNG files must be there too.
    """
    path = Path(path)
    key = (str(path.resolve()), resume)
    if key in _VERIFIED:  # a resume checks once per process, not again in check_vocab and load_checkpoint
        return
    verdict = verify_checkpoint(path)
    if verdict.ok and resume and not verdict.resumable:
        verdict.problems.append("it holds weights only (no optimizer state or RNG files), so training cannot "
                                "resume from it; start a new run with train.init_from=" + str(path))
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {verdict.problems[0]}")
    if not verdict.ok:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({verdict.problems[0]}); "
                                     + _way_out(path))
    _VERIFIED.add(key)


def _innermost(err: BaseException) -> str:
    """``Type: message`` of what actually failed (DCP collects each rank's exception in ``failures``)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            err = inner
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:100]}{'...' if len(first) > 100 else ''}"


def damaged(path: str | Path, err: BaseException) -> CheckpointError:
    """The error for a load of ``path`` that failed although its files passed :func:`verify_checkpoint`."""
    return CheckpointError(
        f"cannot load checkpoint {path} ({_innermost(err)}): its files are all there but their content is "
        "damaged, or it was saved by another model; " + _way_out(Path(path)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-cpt checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="{verify}", required=True)
    v = sub.add_parser("verify", help="check checkpoints (or every checkpoint of a run) without loading them; "
                                      "exit 0 when all are complete, 1 otherwise")
    v.add_argument("paths", nargs="+", metavar="PATH", help="an iter_* directory or a run directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise CheckpointError(f"`{missing[0]}` does not exist; pass an iter_* directory or a run directory")
    ok = True
    for raw in args.paths:
        path = Path(raw)
        if (path / MEGATRON_CONFIG).is_file() or (path / DCP_METADATA).is_file():
            verdict = verify_checkpoint(path)
            print(verdict.line(), flush=True)
            ok &= verdict.ok
            continue
        report = verify_run(path)
        if not report.verdicts and not report.partial and report.latest_line is None:
            raise CheckpointError(f"`{path}` holds no checkpoint (no iter_* directory and no `latest` file)")
        for line in report.lines():
            print(line, flush=True)
        ok &= report.ok
    return 0 if ok else 1
