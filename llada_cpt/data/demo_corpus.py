"""Embedded demo corpus: the Python standard library's source, tokenized, no network.

:func:`ensure_demo_data` turns the ``*.py`` files of this interpreter's stdlib
(sorted by relative path, test suites and files over 256 kB left out, capped at
``max_bytes``) into a SentencePiece tokenizer (trained here, ``[MASK]``
reserved) and train/valid indexed datasets; every 50th document (2 %) is held
out for validation.

The result is cached under ``<cache_dir>/<key>/`` where ``cache_dir`` is the
argument, else ``$LLADA_CPT_CACHE/demo``, else ``~/.cache/llada_cpt/demo``,
and ``key`` names the format version, the Python version and the size
parameters, so a second call only reads a small JSON file.  Concurrent callers
(e.g. two torchrun ranks) serialise on a file lock; the data is built in a
temporary directory and renamed into place, so a crash never leaves a
half-built cache behind.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .preprocess import preprocess_texts
from .tokenizer import train_sentencepiece

__all__ = ["DemoData", "ensure_demo_data", "demo_documents", "default_cache_dir", "DEMO_VERSION"]

DEMO_VERSION = "1"  # bump when the corpus, tokenizer settings or layout change
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_VOCAB_SIZE = 4096
VALID_EVERY = 50  # every 50th document goes to validation (2 %)
_MAX_FILE_BYTES = 256_000  # generated data tables, not code
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MANIFEST = "demo.json"


@dataclass(frozen=True)
class DemoData:
    """Paths and special ids of the built demo data."""

    root: str
    tokenizer_path: str
    train_prefix: str
    valid_prefix: str
    vocab_size: int
    mask_id: int
    eod_id: int
    pad_id: int
    train_documents: int
    valid_documents: int
    train_tokens: int
    valid_tokens: int


def default_cache_dir() -> str:
    root = os.environ.get("LLADA_CPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llada_cpt")
    return os.path.join(root, "demo")


def demo_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> List[Tuple[str, str]]:
    """``(relative path, source)`` of stdlib files in sorted order, until ``max_bytes`` is reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: List[Tuple[str, str]] = []
    total = 0
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0 or size > _MAX_FILE_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append((rel.as_posix(), text))
        total += size
        if total >= max_bytes:
            break
    return docs


def _split(docs: List[Tuple[str, str]]) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    valid_idx = {i for i in range(len(docs)) if i % VALID_EVERY == VALID_EVERY - 1} or {len(docs) - 1}
    train = [d for i, d in enumerate(docs) if i not in valid_idx]
    valid = [d for i, d in enumerate(docs) if i in valid_idx]
    return train, valid


def _key(max_bytes: int, vocab_size: int) -> str:
    return f"v{DEMO_VERSION}-py{platform.python_version()}-{max_bytes}B-vocab{vocab_size}"


def _load(directory: str) -> Optional[DemoData]:
    manifest = os.path.join(directory, _MANIFEST)
    if not os.path.isfile(manifest):
        return None
    with open(manifest, encoding="utf-8") as f:
        fields = json.load(f)
    # Paths are stored relative so a cache directory can be moved or mounted elsewhere.
    for name in ("tokenizer_path", "train_prefix", "valid_prefix"):
        fields[name] = os.path.join(directory, fields[name])
    return DemoData(root=directory, **fields)


def _build(directory: str, max_bytes: int, vocab_size: int, workers: int) -> None:
    docs = demo_documents(max_bytes)
    if len(docs) < 2:
        raise RuntimeError(f"the standard library under {sysconfig.get_paths()['stdlib']!r} has too few "
                           "Python files for the demo corpus")
    tok = train_sentencepiece((text for _, text in docs), os.path.join(directory, "tokenizer.model"), vocab_size)
    train, valid = _split(docs)
    train_sum = preprocess_texts(train, tok, os.path.join(directory, "train"), workers=workers)
    valid_sum = preprocess_texts(valid, tok, os.path.join(directory, "valid"), workers=workers)
    manifest = {
        "tokenizer_path": "tokenizer.model", "train_prefix": "train", "valid_prefix": "valid",
        "vocab_size": tok.vocab_size, "mask_id": tok.mask_id, "eod_id": tok.eod_id, "pad_id": tok.pad_id,
        "train_documents": train_sum.documents, "valid_documents": valid_sum.documents,
        "train_tokens": train_sum.tokens, "valid_tokens": valid_sum.tokens,
    }
    with open(os.path.join(directory, _MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


def ensure_demo_data(
    cache_dir: Optional[str] = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
) -> DemoData:
    """Build the demo tokenizer and datasets once; later calls return the cached ones.

    ``max_bytes`` caps the corpus (tests use a few hundred kB); ``vocab_size``
    must suit the corpus size (SentencePiece refuses a vocabulary it cannot fill).
    """
    base = os.path.abspath(cache_dir or default_cache_dir())
    key = _key(max_bytes, vocab_size)
    final = os.path.join(base, key)
    cached = _load(final)
    if cached is not None:
        return cached
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        cached = _load(final)  # another process may have built it while we waited
        if cached is not None:
            return cached
        tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=base)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            _build(tmp, max_bytes, vocab_size, workers)
            if os.path.exists(final):  # leftover without a manifest (cannot happen via rename)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    loaded = _load(final)
    assert loaded is not None
    return loaded


def _describe(data: DemoData) -> str:
    return json.dumps(asdict(data), indent=2)


if __name__ == "__main__":  # `python -m llada_cpt.data.demo_corpus` builds (or shows) the cache
    print(_describe(ensure_demo_data()))
