"""The BDLM mask, cell by cell against a literal reading of DESIGN section 2."""
import pytest
import torch

from conftest import random_doc_ids
from llada_cpt.diffusion.layout import AttentionLayout
from llada_cpt.diffusion.masks import block_diffusion_mask, block_index, document_mask, document_positions


def naive_mask(doc, B):
    """Loop version of the table: one branch per cell, document-relative blocks."""
    L = len(doc)
    start = [0] * L
    for k in range(1, L):
        start[k] = start[k - 1] if doc[k] == doc[k - 1] else k
    b = [(k - start[k]) // B for k in range(L)]
    M = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(2 * L):
        for j in range(2 * L):
            qi, kj = i % L, j % L
            if doc[qi] != doc[kj]:
                continue
            if i < L and j < L:
                M[i, j] = b[qi] == b[kj]
            elif i < L and j >= L:
                M[i, j] = b[qi] > b[kj]
            elif i >= L and j < L:
                M[i, j] = False
            else:
                M[i, j] = b[qi] >= b[kj]
    return M


@pytest.mark.parametrize("B", [1, 2, 4, 32, 24])
def test_table_cell_by_cell(B):
    g = torch.Generator().manual_seed(B)
    for _ in range(4):
        L = 24
        doc = random_doc_ids(L, g)
        got = block_diffusion_mask(doc, B)  # B = 32 > L: one block per document
        assert got.shape == (2 * L, 2 * L)
        assert torch.equal(got, naive_mask(doc.tolist(), B))


def test_no_cross_document_and_x0_never_sees_xt():
    g = torch.Generator().manual_seed(1)
    doc = random_doc_ids(40, g, max_docs=5)
    for B in (1, 4, 40):
        M = block_diffusion_mask(doc, B)
        L = 40
        assert not M[L:, :L].any(), "x_0 must never attend x_t"
        same = document_mask(doc).repeat(2, 2)
        assert not (M & ~same).any(), "no attention across documents"


def test_block_one_is_causal_and_batched_shapes():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0] * 8])
    M = block_diffusion_mask(doc, 1)
    assert M.shape == (2, 16, 16)
    causal_doc = torch.tril(torch.ones(8, 8, dtype=torch.bool)) & document_mask(doc)
    assert torch.equal(M[:, 8:, 8:], causal_doc)
    # with B = 1 an x_t token sees only itself in x_t
    assert torch.equal(M[:, :8, :8], torch.eye(8, dtype=torch.bool).expand(2, 8, 8) & document_mask(doc))


def test_document_relative_block_index():
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    assert document_positions(doc).tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert block_index(doc, 2).tolist() == [0, 0, 1, 0, 0, 1, 1, 2]


def test_layout_matches_dense_masks():
    g = torch.Generator().manual_seed(3)
    doc = torch.stack([random_doc_ids(16, g) for _ in range(2)])
    for B in (1, 4):
        lay = AttentionLayout(doc, B)
        assert torch.equal(lay.dense_mask()[:, 0], block_diffusion_mask(doc, B))
        assert torch.equal(lay.position_ids(), document_positions(doc).repeat(1, 2))
    mdlm = AttentionLayout(doc, 16, mdlm=True)
    assert torch.equal(mdlm.dense_mask()[:, 0], document_mask(doc))
    causal = AttentionLayout(doc, 1, causal=True)
    assert torch.equal(causal.dense_mask()[:, 0], block_diffusion_mask(doc, 1)[:, 16:, 16:])


def test_layout_local_positions_select_rows():
    g = torch.Generator().manual_seed(4)
    doc = random_doc_ids(16, g).unsqueeze(0)
    lay = AttentionLayout(doc, 4)
    pos = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15])
    local = lay.with_local_positions(pos)
    full = block_diffusion_mask(doc, 4)[0]
    rows = torch.cat([pos, pos + 16])
    assert torch.equal(local.dense_mask()[0, 0], full[rows])
    assert torch.equal(local.position_ids()[0], document_positions(doc)[0][rows % 16])
