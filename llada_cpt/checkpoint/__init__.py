"""Everything that saves, loads, names, reads, writes, checks, selects or merges checkpoints.

* :mod:`.paths`     run-directory names: ``latest``, ``iter_*``, ``metrics.json``; the one ``CheckpointError``
* :mod:`.info`      :class:`~.info.CheckpointInfo`: what a checkpoint says about itself (saved config, metrics,
  trained block size, stored vocabulary rows, architecture checks)
* :mod:`.io`        torch_dist checkpoints read region by region (DCP readers, no process group)
* :mod:`.writer`    torch_dist checkpoints written region by region
* :mod:`.raw`       where a stored chunk's bytes lie (direct slab reads for the merge)
* :mod:`.verify`    is a checkpoint complete? (``llada-cpt checkpoint verify``, and before every load)
* :mod:`.selection` top-k selection by a metric, and training's retention (the same choice)
* :mod:`.merge`     ``llada-cpt merge``: streaming top-k averaging
* :mod:`.megatron`  the atomic save / load of a training run (Megatron ``dist_checkpointing``)
* :mod:`.optimizer_state` optimizer state saved per role (dense / expert), loadable across EP sizes

Only :mod:`.megatron` imports Megatron-Core (~1.5 s and ~150 MB to import;
:mod:`.optimizer_state` serves it), so the offline tools stay light (``tests/test_import_graph.py`` checks it).  This
``__init__`` imports nothing, so ``import llada_cpt.checkpoint.paths`` does not
pull in torch.
"""
