"""Router auxiliary losses as pure tensor functions (no module state, no host sync).

Every function takes an optional token mask (1 = real token, 0 = padding) so padding never
counts towards balance; the model combines them in ``MoRALModel.aux_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis 0 of ``values`` [T, ...], counting only tokens where ``mask`` [T] is 1."""
    if mask is None:
        return values.mean(0)
    mask = mask.to(values.dtype)
    weights = mask / mask.sum().clamp_min(1.0)  # [T]; all-padding batches give 0, not NaN
    return torch.tensordot(weights, values, dims=1)  # [T] . [T, ...] -> [...]


def switch_balance_loss(probs: Tensor, topk_idx: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Mixtral/Switch load balancing ``E * sum_e f[e] * P[e]`` (unweighted; equals k when uniform).

    probs: [T, E] router softmax; topk_idx: [T, k] chosen experts (None: dense, all chosen);
    f[e] = fraction of real tokens whose top-k includes e, P[e] = mean router probability.
    """
    num_experts = probs.shape[-1]
    if topk_idx is None:
        chosen = torch.ones_like(probs)  # [T, E]: dense routing uses every expert
    else:
        chosen = torch.zeros_like(probs).scatter_(-1, topk_idx, 1.0)  # [T, E] one-hot of the top-k
    f = _masked_mean(chosen, mask)  # [E]; no gradient (selection is discrete)
    p = _masked_mean(probs, mask)  # [E]
    return num_experts * (f * p).sum()


def expert_group_ids(num_experts: int, num_groups: int, device: torch.device | None = None) -> Tensor:
    """Group id of each expert [E]: contiguous, as even as possible (E=8, G=2 -> 0 0 0 0 1 1 1 1)."""
    return torch.arange(num_experts, device=device) * num_groups // num_experts


def localized_balance_loss(
    gates: Tensor,
    mask: Tensor | None,
    sample_group: Tensor | None,
    num_groups: int,
    delta: float,
) -> Tensor:
    """LoRAMoE's localized balancing constraint ``Var(I*Q) / (Mean(I*Q)^2 + 1e-10)`` (unweighted).

    gates: [B, S, E] gates applied per token; mask: [B, S] or None; sample_group: [B] ids in
    [0, num_groups) (None: all group 0). Q[m, e] = sum of real-token gates; I[m, e] = 1+delta when
    expert e's group is sample m's group, else 1-delta. Var is the unbiased variance over all B*E
    entries, as LoRAMoE's code computes it.
    """
    batch, _, num_experts = gates.shape
    if mask is not None:
        gates = gates * mask.to(gates.dtype)[..., None]  # [B, S, E], padding zeroed
    q = gates.sum(1)  # [B, E]
    if sample_group is None:
        sample_group = torch.zeros(batch, dtype=torch.long, device=gates.device)
    elif sample_group.shape != (batch,):
        raise ValueError(f"sample_group must have shape [{batch}], got {list(sample_group.shape)}")
    experts = expert_group_ids(num_experts, num_groups, gates.device)  # [E]
    in_group = sample_group.to(gates.device)[:, None] == experts[None, :]  # [B, E]
    weighted = (q * torch.where(in_group, 1.0 + delta, 1.0 - delta)).flatten()  # [B*E]
    if weighted.numel() < 2:
        return gates.new_zeros(())
    return weighted.var() / (weighted.mean() ** 2 + 1e-10)


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` over real tokens; logits: [T, E]."""
    return _masked_mean(torch.logsumexp(logits, dim=-1) ** 2, mask)
