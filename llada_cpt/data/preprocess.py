"""``llada-cpt preprocess``: JSONL / plain text -> Megatron-Core indexed dataset.

Inputs, by file name (an optional ``.gz`` is decompressed):

* ``*.jsonl``, ``*.ndjson``, ``*.json``: one JSON object per line, the document
  text under ``--text-key`` (default ``text``);
* anything else: plain UTF-8 text, one document per file, or one document per
  blank-line-separated paragraph with ``--split-paragraphs``.

Every document becomes one record of ``<prefix>.bin/.idx`` ending with the EOD
token (``--no-append-eod`` turns that off, but packing then cannot see document
boundaries).  ``<prefix>.meta.json`` records the tokenizer and the counts.

Bad records (corrupt JSON, no string under the text key, empty text) are
skipped, counted and reported with ``file:line``; they never stop the run.  If
nothing usable remains the run fails and writes nothing.  Outputs are written
under temporary names and renamed at the end, so a failed run leaves no
partial dataset behind.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import sys
import time
import warnings
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..arg_types import int_range
from ..errors import DataError, reraise_disk_full
from .records import read_json_if_present
from .tokenizer import Tokenizer

__all__ = ["PreprocessSummary", "preprocess", "preprocess_texts", "read_dataset_meta", "main", "META_SUFFIX"]

META_SUFFIX = ".meta.json"
META_FORMAT = "llada_cpt.indexed_dataset/1"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

# Problem kinds, in report order, with how they are described to the user.
PROBLEMS = {
    "corrupt": "corrupt record (invalid JSON, not an object, or not UTF-8)",
    "no_text": "record without a string under the text key",
    "empty": "empty text or blank line",
}
_EXAMPLES = 5  # file:line locations kept per problem kind
_CHUNK_BYTES = 1 << 20  # work sent to a worker at once
_CHUNK_ITEMS = 256


@dataclass
class PreprocessSummary:
    """What a preprocess run wrote and what it skipped."""

    output_prefix: str
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    problems: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in PROBLEMS})
    examples: Dict[str, List[str]] = field(default_factory=lambda: {k: [] for k in PROBLEMS})

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def add_problem(self, kind: str, where: str) -> None:
        self.problems[kind] += 1
        if len(self.examples[kind]) < _EXAMPLES:
            self.examples[kind].append(where)

    def problem_lines(self) -> List[str]:
        lines = []
        for kind, count in self.problems.items():
            if count:
                more = ", ..." if count > len(self.examples[kind]) else ""
                lines.append(f"skipped {count} x {PROBLEMS[kind]}: {', '.join(self.examples[kind])}{more}")
        return lines

    def format(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        head = (f"wrote {self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
                f"({rate:,.0f} tokens/s) to {self.output_prefix}.bin/.idx")
        return "\n".join([head] + ["  " + line for line in self.problem_lines()])


# ------------------------------------------------------------------ reading
# A work item: (kind, where, payload, nbytes); kind "json" carries raw line bytes,
# kind "text" carries a decoded document, kind "bad" carries a problem kind.
_Item = Tuple[str, str, Union[bytes, str], int]


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.lower().endswith(JSONL_SUFFIXES)


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn what reading ``path`` raises (not gzip, truncated, unreadable) into one error naming it."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as err:
        what = "is not a valid gzip file" if path.endswith(".gz") else "cannot be read"
        raise DataError(f"input file {path} {what} ({err}); fix or remove it from --input, nothing written") from None


def _jsonl_items(path: str) -> Iterator[_Item]:
    with _reading(path), _open(path) as f:
        for line_no, line in enumerate(f, 1):
            yield ("json", f"{path}:{line_no}", line, len(line))


def _text_items(path: str, split_paragraphs: bool) -> Iterator[_Item]:
    with _reading(path), _open(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield ("bad", f"{path}:1", "corrupt", len(raw))
        return
    if not split_paragraphs:
        yield ("text", f"{path}:1", text, len(raw))
        return
    para: List[str] = []
    start = 1
    for line_no, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            if not para:
                start = line_no
            para.append(line)
        elif para:
            doc = "\n".join(para)
            yield ("text", f"{path}:{start}", doc, len(doc))
            para = []


def _items(inputs: Sequence[str], split_paragraphs: bool) -> Iterator[_Item]:
    for path in inputs:
        yield from (_jsonl_items(path) if _is_jsonl(path) else _text_items(path, split_paragraphs))


# --------------------------------------------------------------- tokenizing
class _Encoder:
    """Turns work items into token arrays or problem kinds; runs in worker processes."""

    def __init__(self, tokenizer: Tokenizer, text_key: str, append_eod: bool, dtype: type) -> None:
        self.tokenizer, self.text_key, self.append_eod, self.dtype = tokenizer, text_key, append_eod, dtype

    def text_of(self, item: _Item) -> Tuple[Optional[str], Optional[str]]:
        kind, _, payload, _ = item
        if kind == "bad":
            return None, payload  # type: ignore[return-value]
        if kind == "text":
            text = payload
        else:
            if not payload.strip():
                return None, "empty"
            try:
                record = json.loads(payload)
            except ValueError:  # includes UnicodeDecodeError
                return None, "corrupt"
            if not isinstance(record, dict):
                return None, "corrupt"
            text = record.get(self.text_key)
            if not isinstance(text, str):
                return None, "no_text"
        return (text, None) if text.strip() else (None, "empty")

    def __call__(self, chunk: List[_Item]) -> List[Union[np.ndarray, str]]:
        out: List[Union[np.ndarray, str]] = []
        for item in chunk:
            text, problem = self.text_of(item)
            if problem is not None:
                out.append(problem)
                continue
            ids = self.tokenizer.encode(text)
            if self.append_eod:
                ids.append(self.tokenizer.eod_id)
            out.append(np.asarray(ids, dtype=self.dtype) if ids else "empty")
        return out


_WORKER_ENCODER: Optional[_Encoder] = None


def _worker_init(encoder: _Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _worker_run(chunk: List[_Item]) -> List[Union[np.ndarray, str]]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(chunk)


def _chunks(items: Iterable[_Item]) -> Iterator[List[_Item]]:
    chunk: List[_Item] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += item[3]
        if len(chunk) >= _CHUNK_ITEMS or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(
    encoder: _Encoder, chunks: Iterable[List[_Item]], workers: int
) -> Iterator[Tuple[List[_Item], List[Union[np.ndarray, str]]]]:
    """Encode chunks in order; with workers > 1, at most 4 chunks per worker are in flight."""
    if workers <= 1:
        for chunk in chunks:
            yield chunk, encoder(chunk)
        return
    import multiprocessing as mp

    # spawn: fork after the tokenizers' Rust thread pool has run is unsafe.
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_worker_run, (chunk,))))
            if len(pending) >= 4 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


# ------------------------------------------------------------------ writing
def _indexed_dataset_module():
    with warnings.catch_warnings():  # megatron.core's import warns about missing TE/apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _normalise_prefix(prefix: str) -> str:
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def _build(
    items: Iterable[_Item],
    tokenizer: Tokenizer,
    output_prefix: str,
    *,
    text_key: str,
    append_eod: bool,
    workers: int,
    progress: Optional[bool],
    total_bytes: Optional[int],
    sources: List[str],
) -> PreprocessSummary:
    from tqdm import tqdm

    idx_mod = _indexed_dataset_module()
    output_prefix = _normalise_prefix(os.fspath(output_prefix))
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create output directory {out_dir!r} ({err}); "
                        "choose a writable --output-prefix") from err
    dtype = idx_mod.DType.optimal_dtype(tokenizer.vocab_size)
    encoder = _Encoder(tokenizer, text_key, append_eod, dtype)
    summary = PreprocessSummary(output_prefix=output_prefix)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    finals = {ext: output_prefix + ext for ext in (".bin", ".idx", META_SUFFIX)}
    temps = {ext: tmp + ext for ext in finals}
    start = time.perf_counter()
    try:
        builder = idx_mod.IndexedDatasetBuilder(temps[".bin"], dtype=dtype)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                   disable=(not progress) if progress is not None else None, file=sys.stderr)
        with bar:
            for chunk, results in _encoded_chunks(encoder, _chunks(items), workers):
                for item, result in zip(chunk, results):
                    if isinstance(result, str):
                        summary.add_problem(result, item[1])
                    else:
                        builder.add_document(result, [result.size])
                        summary.documents += 1
                        summary.tokens += int(result.size)
                bar.update(sum(item[3] for item in chunk))
        builder.finalize(temps[".idx"])
        summary.seconds = time.perf_counter() - start
        if summary.documents == 0:
            detail = "; ".join(summary.problem_lines()) or "the inputs are empty"
            raise DataError(f"no usable documents, nothing written ({detail}); "
                            f"check the input files and --text-key {text_key!r}")
        meta = {
            "format": META_FORMAT,
            "tokenizer": _tokenizer_reference(tokenizer.path, out_dir),
            "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id,
            "mask_id": tokenizer.mask_id,
            "pad_id": tokenizer.pad_id,
            "append_eod": append_eod,
            "dtype": np.dtype(dtype).name,
            "documents": summary.documents,
            "tokens": summary.tokens,
            "skipped": dict(summary.problems),
            "skipped_examples": {k: v for k, v in summary.examples.items() if v},
            "inputs": sources,
            "text_key": text_key,
        }
        with open(temps[META_SUFFIX], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        for ext in (".bin", ".idx", META_SUFFIX):  # metadata last: its presence means "complete"
            os.replace(temps[ext], finals[ext])
    except BaseException as err:
        for path in temps.values():
            if os.path.exists(path):
                os.remove(path)
        reraise_disk_full(err, f"writing the dataset {output_prefix}", "removed the partial files, nothing was "
                          "written; free space and run preprocess again")
        raise
    return summary


def _tokenizer_reference(tokenizer_path: str, out_dir: str) -> str:
    """Relative to the metadata file when the tokenizer lives under the data directory.

    That keeps a directory holding both (the demo cache) valid when moved.
    """
    path = os.path.abspath(tokenizer_path)
    rel = os.path.relpath(path, out_dir)
    return path if rel.startswith("..") else rel


def read_dataset_meta(prefix: Union[str, os.PathLike]) -> dict:
    """The ``.meta.json`` of a dataset prefix (``{}`` if absent), tokenizer path made absolute."""
    path = os.fspath(prefix) + META_SUFFIX
    meta = read_json_if_present(path, "re-run `llada-cpt preprocess`")
    if "tokenizer" in meta:
        meta["tokenizer"] = os.path.join(os.path.dirname(os.path.abspath(path)), meta["tokenizer"])
    return meta


def _check_inputs(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise DataError("no input files given; pass --input FILE [FILE ...]")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}; check the --input paths")
    return paths


def _as_tokenizer(tokenizer: Union[Tokenizer, str, os.PathLike]) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)


def preprocess(
    inputs: Sequence[Union[str, os.PathLike]],
    tokenizer: Union[Tokenizer, str, os.PathLike],
    output_prefix: Union[str, os.PathLike],
    *,
    text_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    split_paragraphs: bool = False,
    progress: Optional[bool] = None,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.meta.json`` (see module doc).

    ``progress=None`` shows the bar only on a terminal.  Raises :class:`DataError`
    when an input is missing or no usable document remains.
    """
    paths = _check_inputs(inputs)
    tok = _as_tokenizer(tokenizer)
    total = None if any(p.endswith(".gz") for p in paths) else sum(os.path.getsize(p) for p in paths)
    return _build(_items(paths, split_paragraphs), tok, os.fspath(output_prefix), text_key=text_key,
                  append_eod=append_eod, workers=workers, progress=progress, total_bytes=total,
                  sources=[os.path.abspath(p) for p in paths])


def preprocess_texts(
    documents: Iterable[Tuple[str, str]],
    tokenizer: Union[Tokenizer, str, os.PathLike],
    output_prefix: Union[str, os.PathLike],
    *,
    workers: int = 1,
    progress: Optional[bool] = False,
) -> PreprocessSummary:
    """Like :func:`preprocess` for in-memory ``(name, text)`` documents (the demo corpus)."""
    items = (("text", f"{name}:1", text, len(text)) for name, text in documents)
    return _build(items, _as_tokenizer(tokenizer), os.fspath(output_prefix), text_key="text",
                  append_eod=True, workers=workers, progress=progress, total_bytes=None,
                  sources=["<memory>"])


# ---------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llada-cpt preprocess",
        description="Tokenize JSONL / plain-text files into a Megatron-Core indexed dataset "
                    "(<prefix>.bin/.idx) plus <prefix>.meta.json.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="*.jsonl/*.ndjson/*.json: one JSON object per line; other files: plain text "
                        "(one document per file); a .gz suffix is decompressed")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--workers", type=int_range(1), default=min(4, os.cpu_count() or 1),
                   help="tokenizer processes (default: min(4, CPUs))")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the EOD token (default: on; packing needs it)")
    p.add_argument("--split-paragraphs", action="store_true",
                   help="plain text: one document per blank-line-separated paragraph instead of per file")
    p.add_argument("--eod-token", default=None, help="EOD token name if the tokenizer does not declare one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    paths = _check_inputs(args.input)  # before loading the tokenizer: cheap errors first
    tok = Tokenizer.from_file(args.tokenizer, eod_token=args.eod_token)
    summary = preprocess(paths, tok, args.output_prefix, text_key=args.text_key, workers=args.workers,
                         append_eod=args.append_eod, split_paragraphs=args.split_paragraphs,
                         progress=False if args.quiet else None)
    print(f"llada-cpt preprocess: {summary.format()}")
    print(f"  tokenizer: {tok}")
    return 0
