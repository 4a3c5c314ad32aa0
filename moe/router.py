"""Token-wise top-k router in fp32, and host-sync-free expert statistics.

The router's forward does the minimum (one GEMM, top-k, softmax, scatter): on CPU decoding, each
extra tensor op costs microseconds per layer per token. Router probabilities, padding masks and
load/importance statistics are derived later, from the ``RouterRecord`` it keeps, by the losses
(``MoRALModel.aux_loss``) and by ``expert_statistics`` (batched over all routers of a model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RoutingContext:
    """Per-forward inputs shared by every router of one model (set by ``MoRALModel``).

    attention_mask: [B, L] (1 = real token) as passed to the base model; during KV-cache decoding
    L covers the past tokens too, so a router takes its last S columns. sample_group: [B] group ids
    for the localized balance loss.
    """

    attention_mask: Tensor | None = None
    sample_group: Tensor | None = None


def token_mask(attention_mask: Tensor | None, batch_shape: tuple[int, ...]) -> Tensor | None:
    """Float mask [T] for routed tokens of leading shape (B, S), or None when the mask does not fit."""
    if attention_mask is None or len(batch_shape) != 2 or attention_mask.dim() != 2:
        return None
    batch, seq = batch_shape
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
        return None
    return attention_mask[:, -seq:].reshape(-1).float()  # [B, S] (last S positions) -> [B*S]


@dataclass
class RouterRecord:
    """What a router's forward leaves for the experts, the aux losses and the statistics."""

    logits: Tensor  # [T, E] fp32 (keeps the autograd graph)
    topk_idx: Tensor | None  # [T, k]; None for dense routing
    weights: Tensor  # [T, k] gates of the chosen experts ([T, E] when dense), times ``scale``
    scale: float  # LoRA scaling folded into the gates
    batch_shape: tuple[int, ...]  # leading dims of the routed input, e.g. (B, S)
    attention_mask: Tensor | None  # the model's mask at that forward ([B, L])
    sample_group: Tensor | None  # [B]
    counted: bool = False  # already added to the statistics
    _gates: Tensor | None = None

    @property
    def gates(self) -> Tensor:
        """[T, E] gates as applied (scaled): the top-k weights, zero elsewhere."""
        if self._gates is None:
            if self.topk_idx is None:
                self._gates = self.weights
            else:  # [T, k] scattered into [T, E]
                self._gates = torch.zeros_like(self.logits).scatter_(-1, self.topk_idx, self.weights)
        return self._gates

    @property
    def mask(self) -> Tensor | None:
        """[T] float, 1 for real tokens (None: every token counts)."""
        return token_mask(self.attention_mask, self.batch_shape)

    @property
    def probs(self) -> Tensor:
        """[T, E] router softmax."""
        return self.logits.softmax(dim=-1)


def topk_gates(logits: Tensor, top_k: int, scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Top-k weights [T, k] (times ``scale``) and indices [T, k] from logits [T, E].

    softmax -> top-k -> renormalise equals a softmax over the k largest logits, which is what is
    computed. top_k == E is LoRAMoE's dense softmax: returns ([T, E] probabilities, None).
    top_k == 1 keeps the raw probability (Switch): a renormalised single gate would be the
    constant 1 and the router would get no gradient.
    """
    if top_k >= logits.shape[-1]:
        return logits.softmax(dim=-1) * scale, None
    values, idx = logits.topk(top_k, dim=-1)  # [T, k]
    if top_k == 1:
        weights = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()  # [T, 1] = p_max
    else:
        weights = values.softmax(dim=-1)  # [T, k], renormalised over the chosen experts
    return weights * scale, idx


class Router(nn.Module):
    """Linear d -> E (no bias, fp32) followed by ``topk_gates``; keeps its last ``RouterRecord``."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        init_std: float = 0.02,
        jitter: float = 0.0,
        scale: float = 1.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.num_experts, self.top_k = in_features, num_experts, top_k
        self.jitter, self.scale = jitter, scale
        # fp32 whatever the base dtype: softmax/top-k decisions are sensitive to bf16 rounding.
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=init_std)
        self.context = RoutingContext()  # replaced by the model's shared context on injection
        self.enabled = True
        self.last: RouterRecord | None = None

    def forward(self, x: Tensor) -> RouterRecord:
        """Route x [..., d] (T = product of the leading dims); the record is also kept as ``last``."""
        batch_shape = x.shape[:-1]
        xr = x.reshape(-1, self.in_features)  # [T, d]
        if xr.dtype != torch.float32:
            xr = xr.float()
        if self.training and self.jitter > 0:
            xr = xr * torch.empty_like(xr).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        if torch.is_autocast_enabled(xr.device.type):  # keep the router in fp32 under bf16 autocast
            with torch.autocast(device_type=xr.device.type, enabled=False):
                logits = F.linear(xr, self.weight)  # [T, E]
        else:
            logits = F.linear(xr, self.weight)  # [T, E]
        weights, idx = topk_gates(logits, self.top_k, self.scale)
        ctx = self.context
        record = RouterRecord(
            logits, idx, weights, self.scale, batch_shape, ctx.attention_mask, ctx.sample_group
        )
        object.__setattr__(self, "last", record)  # skips nn.Module.__setattr__ (hot path)
        return record


@torch.no_grad()
def expert_statistics(
    logits: Tensor, topk_idx: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-router sums over real tokens, for R routers at once (no host sync).

    logits: [R, T, E]; topk_idx: [R, T, k] or None (dense); mask: [T] or None.
    Returns load [R, E] (tokens whose top-k includes e), importance [R, E] (sum of router
    probabilities) and the number of real tokens (0-d tensor).
    """
    probs = logits.detach().float().softmax(dim=-1)  # [R, T, E]
    if topk_idx is None:
        chosen = torch.ones_like(probs)  # [R, T, E]
    else:
        chosen = torch.zeros_like(probs).scatter_(-1, topk_idx, 1.0)  # [R, T, E]
    if mask is None:
        tokens = probs.new_full((), float(probs.shape[1]))  # a device fill, not a host->device copy
        return chosen.sum(1), probs.sum(1), tokens
    return mask @ chosen, mask @ probs, mask.sum()  # [T] @ [R, T, E] -> [R, E]


class ExpertStats:
    """Running per-router load and importance, accumulated on device from ``RouterRecord``s.

    ``update`` adds every record not yet counted, stacking the routers that share a shape so one
    forward costs a handful of tensor ops whatever the depth (it runs once per decoding step).
    """

    def __init__(self, routers: dict[str, Router]) -> None:
        self.routers = routers
        self.enabled = True
        self._load: Tensor | None = None  # [R, E]
        self._importance: Tensor | None = None  # [R, E]
        self._tokens: Tensor | None = None  # [R]

    def update(self) -> None:
        """Count the routers' latest records (call before the next forward overwrites them)."""
        if not self.enabled:
            return
        groups: dict[tuple, list[tuple[int, RouterRecord]]] = {}
        for i, router in enumerate(self.routers.values()):
            rec = router.last
            if rec is not None and not rec.counted:
                rec.counted = True
                key = (
                    tuple(rec.logits.shape),
                    rec.logits.device,
                    rec.topk_idx is None,
                    rec.batch_shape,
                    id(rec.attention_mask),
                )
                groups.setdefault(key, []).append((i, rec))
        for items in groups.values():
            first = items[0][1]
            logits = torch.stack([rec.logits for _, rec in items])  # R' x [T, E] -> [R', T, E]
            idx = None if first.topk_idx is None else torch.stack([rec.topk_idx for _, rec in items])
            load, importance, tokens = expert_statistics(logits, idx, first.mask)
            if self._load is None:
                self.reset(device=logits.device)
            if load.device != self._load.device:  # routers spread over several devices
                load, importance, tokens = (t.to(self._load.device) for t in (load, importance, tokens))
            if len(items) == len(self.routers):  # the usual case: every router, in order
                self._load.add_(load)
                self._importance.add_(importance)
                self._tokens.add_(tokens)
            else:
                rows = torch.tensor([i for i, _ in items], device=self._load.device)
                self._load.index_add_(0, rows, load)
                self._importance.index_add_(0, rows, importance)
                self._tokens.index_add_(0, rows, tokens.expand(len(items)))

    def reset(self, device: torch.device | None = None) -> None:
        """Zero the sums; records already made are not counted afterwards."""
        for router in self.routers.values():
            if router.last is not None:
                router.last.counted = True
        if device is None:
            device = next(iter(self.routers.values())).weight.device
        num_experts = next(iter(self.routers.values())).num_experts
        # Normal tensors even when the first forward runs under torch.inference_mode(): an inference
        # tensor could not be updated in place once the caller leaves inference mode (e.g. training).
        with torch.inference_mode(False):
            self._load = torch.zeros(len(self.routers), num_experts, device=device)
            self._importance = torch.zeros(len(self.routers), num_experts, device=device)
            self._tokens = torch.zeros(len(self.routers), device=device)

    def report(self) -> dict[str, dict[str, list[float]]]:
        """Per router: load (fraction of real tokens routed to each expert; sums to top_k),
        importance (mean router probability; sums to 1), tokens. Syncs with the device."""
        self.update()
        if self._load is None:
            self.reset()
        tokens = self._tokens.clamp_min(1.0)[:, None]  # [R, 1]
        load = (self._load / tokens).cpu().tolist()
        importance = (self._importance / tokens).cpu().tolist()
        counts = self._tokens.cpu().tolist()
        return {
            name: {"load": load[i], "importance": importance[i], "tokens": [counts[i]]}
            for i, name in enumerate(self.routers)
        }
