import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "1")


def random_doc_ids(L: int, generator, max_docs: int = 4):
    """Random contiguous document layout of length L (documents of arbitrary length)."""
    import torch

    n = int(torch.randint(1, max_docs + 1, (1,), generator=generator))
    cuts = sorted(torch.randperm(L - 1, generator=generator)[: n - 1].add(1).tolist())
    doc = torch.zeros(L, dtype=torch.long)
    for i, c in enumerate(cuts):
        doc[c:] = i + 1
    return doc


@pytest.fixture
def gen():
    import torch

    return torch.Generator().manual_seed(0)


def load_script(relpath: str):
    """Import a script of the repository (``benchmarks/*.py``, ``kernels/*.py``) by its path.

    Why: those folders are deliberately not packages (a top-level ``kernels`` package shadowed
    Hugging Face's ``kernels`` distribution), so tests load the file itself.
    """
    path = REPO / relpath
    name = "_script_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
