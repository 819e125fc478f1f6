"""Everything that names, reads, writes, checks, selects or merges checkpoints.

* :mod:`.paths`     run-directory names: ``latest``, ``iter_*``, ``metrics.json``
* :mod:`.io`        torch_dist checkpoints region by region (DCP readers / writers, no process group)
* :mod:`.raw`       where a stored chunk's bytes lie (direct slab reads for the merge)
* :mod:`.verify`    is a checkpoint complete? (``llada-cpt checkpoint verify``, and before every load)
* :mod:`.selection` top-k selection by a metric, and training's retention (the same choice)
* :mod:`.merge`     ``llada-cpt merge``: streaming top-k averaging

None of them imports Megatron-Core (~1.5 s and ~150 MB to import), so the offline
tools stay light; the Megatron save / load of a training run is
:mod:`llada_cpt.training.checkpoint`, which builds on these.  This ``__init__``
imports nothing, so ``import llada_cpt.checkpoint.paths`` does not pull in torch.
"""
