"""Tensor work for the adapter bank: LoRAs out of a MoRAL version, their pairwise similarity, the most
diverse group, and copying a LoRA into one expert.

A LoRA here is ``{module name: (A [r, d_in], B [d_out, r], scale)}``, the form
:func:`moe.model.read_peft_lora` returns, so a registered peft adapter and an expert sliced out of a
saved MoRAL version are interchangeable.  Pure functions of tensors; no files, no registry.
"""

from __future__ import annotations

import itertools
import math
import re

import torch
from torch import Tensor

from .model import MoRALModel

LoRA = dict[str, tuple[Tensor, Tensor, float]]
_MORAL_KEY = re.compile(r"^(?P<module>.+)\.moral_(?P<part>[AB])$")


def version_expert_loras(
    tensors: dict[str, Tensor], num_experts: int, rank: int, scaling: float
) -> list[LoRA]:
    """Each expert of a saved MoRAL adapter as a LoRA (router weights are not part of any expert).

    Layout (see moe/layer.py): ``moral_A`` [E*r, d_in] and ``moral_B`` [E*r, d_out] (B transposed);
    expert e owns rows e*r:(e+1)*r of both, and its delta is ``scaling * B_e.T @ A_e``.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _MORAL_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor.float()
    if not parts:
        raise ValueError("no moral_A/moral_B tensors: not a MoRAL adapter")
    experts: list[LoRA] = [{} for _ in range(num_experts)]
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{module} has only moral_{next(iter(ab))}")
        a, b = ab["A"], ab["B"]  # [E*r, d_in], [E*r, d_out]
        if a.shape[0] != num_experts * rank or b.shape[0] != num_experts * rank:
            raise ValueError(
                f"{module}: {a.shape[0]} stacked rows, expected {num_experts} experts x rank {rank}"
            )
        for e in range(num_experts):
            rows = slice(e * rank, (e + 1) * rank)
            experts[e][module] = (a[rows].clone(), b[rows].t().contiguous(), scaling)  # [r, d_in], [d_out, r]
    return experts


def lora_inner(x: LoRA, y: LoRA) -> float:
    """Frobenius inner product of the two LoRAs' full weight deltas, summed over shared modules.

    <s_x B_x A_x, s_y B_y A_y> = s_x s_y trace((B_x^T B_y)(A_y A_x^T)): two r x r products per
    module instead of materialising [d_out, d_in] deltas.  Computed on the deltas, not on the raw
    A/B factors: a LoRA's factorisation is not unique (any invertible r x r mix of A's rows undone
    in B gives the same adapter), so a cosine of flattened A/B would compare bases, not adapters.
    """
    total = 0.0
    for module in x.keys() & y.keys():
        ax, bx, sx = x[module]
        ay, by, sy = y[module]
        left = bx.t() @ by  # [r_x, d_out] @ [d_out, r_y] -> [r_x, r_y]
        right = ay @ ax.t()  # [r_y, d_in] @ [d_in, r_x] -> [r_y, r_x]
        total += sx * sy * float(torch.trace(left @ right))
    return total


def abs_cosine_matrix(loras: list[LoRA]) -> Tensor:
    """[n, n] |cosine| between the LoRAs' flattened weight deltas (1 on the diagonal; 0 for a zero LoRA)."""
    n = len(loras)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = lora_inner(loras[i], loras[j])
    norms = gram.diagonal().clamp(min=0).sqrt()  # [n]
    denom = norms[:, None] * norms[None, :]  # [n, n]
    cos = torch.where(denom > 0, gram / denom.clamp(min=1e-30), torch.zeros_like(gram))
    cos.fill_diagonal_(1.0)
    return cos.abs()


def group_cost(abs_cos: Tensor, group: tuple[int, ...]) -> float:
    """Summed |cosine| over the distinct pairs of ``group``."""
    return float(sum(abs_cos[i, j] for i, j in itertools.combinations(group, 2)))


def most_diverse_group(abs_cos: Tensor, size: int, max_exact: int = 20_000) -> tuple[list[int], float, str]:
    """The ``size`` indices with the lowest summed pairwise |cosine|: (group, cost, 'exact' | 'greedy').

    Exact search over every combination while there are at most ``max_exact`` of them; otherwise
    greedy: start from index 0 (the caller orders candidates best-scoring first) and repeatedly add
    the candidate that raises the cost least.  Ties keep the earlier (better-scoring) candidate.
    """
    n = abs_cos.shape[0]
    size = min(size, n)
    if size <= 0:
        return [], 0.0, "exact"
    if math.comb(n, size) <= max_exact:
        best = min(
            itertools.combinations(range(n), size), key=lambda g: (round(group_cost(abs_cos, g), 9), g)
        )
        return list(best), group_cost(abs_cos, best), "exact"
    group = [0]
    while len(group) < size:
        rest = [i for i in range(n) if i not in group]
        nxt = min(rest, key=lambda i: (round(float(abs_cos[i, group].sum()), 9), i))
        group.append(nxt)
    return group, group_cost(abs_cos, tuple(group)), "greedy"


def load_expert(model: MoRALModel, expert: int, lora: LoRA) -> list[str]:
    """Make expert ``expert`` of ``model`` equal to ``lora``; returns the modules it covered.

    Same rules as :meth:`MoRALModel.init_experts_from_lora`: a LoRA of rank r_l <= rank fills the
    expert's first r_l rows of A and (transposed) B and zeroes its other B rows, so the expert's
    delta equals the LoRA's; B is rescaled by scale_l / (alpha/rank).  Modules the LoRA does not
    adapt are zeroed in B too, so re-loading a probe expert never leaks the previous candidate.
    """
    cfg = model.moral_config
    if not 0 <= expert < cfg.num_experts:
        raise ValueError(f"expert index must be in [0, {cfg.num_experts}), got {expert}")
    r = cfg.rank
    loaded = []
    with torch.no_grad():
        for name, layer in model.layers.items():
            block = slice(expert * r, (expert + 1) * r)
            if name not in lora:
                layer.moral_B[block].zero_()  # this expert adds nothing here
                continue
            a, b, scale = lora[name]  # [r_l, d_in], [d_out, r_l]
            r_l = a.shape[0]
            if r_l > r:
                raise ValueError(f"LoRA rank {r_l} at {name} exceeds the expert rank {r}")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ValueError(
                    f"LoRA shapes at {name} ({list(b.shape)} x {list(a.shape)}) do not fit "
                    f"[{layer.out_features}, {layer.in_features}]"
                )
            rows = slice(expert * r, expert * r + r_l)
            layer.moral_A[rows].copy_(a)
            layer.moral_B[block].zero_()
            layer.moral_B[rows].copy_(b.t() * (scale / layer.scaling))  # moral_B is [E*r, d_out]
            loaded.append(name)
    return loaded
