"""MoE load-balancing loss under per-token loss normalisation with CP / sequence parallelism.

With ``calculate_per_token_loss`` the router scales the aux-loss gradient by the
*local* token count (``activation.shape[0]``) before the gradients are divided by
the global token count.  Under context parallelism (and TP with sequence
parallelism) each rank holds 1/(tp*cp) of the tokens, so the aux-loss gradient
comes out 1/(tp*cp) too small: measured on CPU, MoE CP=2 vs CP=1 gave equal losses
but router gradients ~25% apart.  Upstream fixed this later (Megatron-LM PR #5047)
by multiplying the count by ``tp_cp_group.size()``; installs whose router source
already does that are left alone.  Targets megatron-core 0.16.1 - 0.19.
"""
from __future__ import annotations

import inspect

__all__ = ["apply"]


def apply() -> list[str]:
    from megatron.core.transformer.moe.router import TopKRouter

    orig = TopKRouter.attach_and_log_load_balancing_loss
    if getattr(orig, "_llada_patched", False) or "tp_cp_group.size()" in inspect.getsource(orig):
        return []

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = local * self.tp_cp_group.size()
        return orig(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group, reduce_group_has_dp,
                    valid_token_count)

    attach_and_log_load_balancing_loss._llada_patched = True
    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    return ["moe_aux_loss_tp_cp_scale"]
