"""What a checkpoint says about itself, read once: :class:`CheckpointInfo`.

Every stage and tool that starts from a checkpoint (``train.init_from`` of SFT /
DPO / RL, ``generate``, ``eval``, ``lm-eval``, ``convert export``) asks it the
same questions: which config was it trained with, how far did it get, which block
size was in force at its last step, how many vocabulary rows does it store, is its
architecture the one this run builds.  Answering them in one class keeps one
definition of each (two definitions of "trained block size" once disagreed).

No Megatron import: the metadata is read from ``config.yaml``, ``metrics.json``
and the DCP index, so bad inputs fail in a second, before a model is built.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from ..errors import ConfigError
from .paths import CONFIG_FILE, CheckpointError, read_metrics, read_saved_config, resolve_checkpoint

if TYPE_CHECKING:
    from ..config.schema import Config, ModelConfig
    from .io import TensorInfo

__all__ = ["CheckpointInfo", "NOT_ARCHITECTURE"]

NOT_ARCHITECTURE = frozenset({"preset", "attention_backend", "recompute_granularity", "moe_grouped_gemm",
                              "moe_token_dispatcher_type", "init_method_std"})
"""Model fields that choose kernels, memory or initialisation, not what the stored weights mean."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint (an ``iter_*`` directory) and the metadata saved with it.

    ``metrics.json`` is read at once (top-k selection ranks by it); ``config.yaml`` when first asked for."""

    path: Path  # the iter_* directory (a run directory is resolved through `latest`)
    metrics: dict  # metrics.json ({} when it has none)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "CheckpointInfo":
        """Resolve ``path`` (a run directory with ``latest``, or an ``iter_*`` directory) and read its metrics."""
        resolved = resolve_checkpoint(path)
        return cls(resolved, read_metrics(resolved))

    # ------------------------------------------------------------------ metadata

    @cached_property
    def saved_config(self) -> Optional[dict]:
        """``config.yaml`` as plain data; None when it has none."""
        return read_saved_config(self.path)

    @property
    def iteration(self) -> int:
        """From ``metrics.json``, else from the ``iter_*`` name (0 when neither says)."""
        iteration = self.metrics.get("iteration")
        if isinstance(iteration, int) and not isinstance(iteration, bool):
            return iteration
        digits = self.path.name.rpartition("_")[2]
        return int(digits) if digits.isdigit() else 0

    @property
    def consumed_tokens(self) -> Optional[int]:
        """Training tokens consumed up to this checkpoint; None for a converted or merged one."""
        consumed = self.metrics.get("consumed_tokens")
        return None if consumed is None else int(consumed)

    @property
    def stage(self) -> Optional[str]:
        """The stage that wrote it (``cpt`` where the saved config names none: the default); None without one."""
        return None if self.saved_config is None else self.saved_config.get("stage") or "cpt"

    def section(self, name: str) -> dict:
        """One section of the saved config as plain data (``{}`` when absent)."""
        return dict((self.saved_config or {}).get(name) or {})

    @cached_property
    def config(self) -> "Config":
        """The saved config, typed (defaults fill what a resolved config leaves out)."""
        from ..config.loader import config_from_dict

        if self.saved_config is None:
            raise CheckpointError(f"`{self.path}` has no {CONFIG_FILE}, so its model architecture is unknown; use a "
                                  "checkpoint written by llada-cpt (train, merge, convert import)")
        try:
            return config_from_dict(self.saved_config)
        except ConfigError as err:
            raise CheckpointError(f"the {CONFIG_FILE} of `{self.path}` is not a config of this version of llada-cpt "
                                  f"({err}); fix it in that file") from None

    @property
    def context_length(self) -> int:
        """The longest sequence its position embedding (RoPE) was built for."""
        return int(self.config.model.max_position_embeddings)

    @cached_property
    def trained_block_size(self) -> Optional[int]:
        """The block size its last step was trained with (:func:`llada_cpt.diffusion.wsd.trained_block_size`:
        the WSD phase in force at its consumed tokens); None without a config.yaml or a usable schedule in it.

        Only the sections the schedule depends on are typed, so a checkpoint whose other sections an older
        version wrote still gives its block size; what a saved config leaves out takes its default, as in the
        run that saved it (a saved config is a resolved one)."""
        if self.saved_config is None:
            return None
        from ..config.loader import config_from_dict
        from ..diffusion.wsd import trained_block_size

        try:
            cfg = config_from_dict({k: self.section(k) for k in ("data", "train", "diffusion")})
            return trained_block_size(cfg, self.consumed_tokens)
        except ConfigError:  # (e.g. an empty schedule)
            return None

    # ------------------------------------------------------------------ weights

    @cached_property
    def stored_embedding(self) -> Optional["TensorInfo"]:
        """The stored (padded) word embedding, from the DCP index only; None when it stores none."""
        from .io import stored_embedding

        return stored_embedding(self.path)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a checkpoint trained with another vocabulary than ``vocab_size`` tokens.

        Megatron loads the embedding and output layers with ``allow_shape_mismatch``
        (their padding legitimately differs between TP sizes), so a checkpoint of
        another tokenizer would load silently, truncated or zero-padded.  Its row
        count is its vocabulary padded to its own multiple (saved config); this
        run's ``vocab_size`` padded to that multiple must give the same count.
        """
        from .verify import require_complete

        require_complete(self.path)
        tensor = self.stored_embedding
        if tensor is None:  # not a GPT checkpoint of ours (nothing to compare)
            return
        rows = int(tensor.shape[0])
        model, parallel = self.section("model"), self.section("parallel")
        multiple = (int(model.get("make_vocab_size_divisible_by") or 128)
                    * int(parallel.get("tensor_model_parallel_size") or 1))
        expected = int(math.ceil(vocab_size / multiple) * multiple)
        if rows != expected:
            raise CheckpointError(f"checkpoint `{self.path}` has embeddings for {rows} tokens (a vocabulary padded "
                                  f"to a multiple of {multiple}) but this run's tokenizer has {vocab_size} tokens; "
                                  "use the tokenizer the checkpoint was trained with (data.tokenizer), or start "
                                  "without it")

    @property
    def architecture(self) -> Optional[dict]:
        """The saved model fields that define its weights (:data:`NOT_ARCHITECTURE` left out); None without
        a saved config.  What ``init_from`` and ``merge`` compare."""
        if self.saved_config is None:
            return None
        return {k: v for k, v in self.section("model").items() if k not in NOT_ARCHITECTURE}

    def model_differences(self, model: "ModelConfig") -> List[str]:
        """``field: ours vs checkpoint`` for every architecture field that differs."""
        theirs = self.architecture
        if not theirs:
            return []
        ours = dataclasses.asdict(model)
        return [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in ours if k in theirs and ours[k] != theirs[k]]

    def check_model(self, model: "ModelConfig") -> None:
        """Refuse to start from this checkpoint with another architecture (one line naming the fields)."""
        diff = self.model_differences(model)
        if diff:
            raise ConfigError(f"the model section differs from the one {self.path} was trained with "
                              f"({'; '.join(diff)}); use that checkpoint's model settings")
