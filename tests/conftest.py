import os

import pytest

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
