"""Stacked LoRA experts on a frozen linear, and the per-FFN-block router that feeds them.

The E experts of a linear are stored stacked: ``moral_A`` [E*r, d_in] (expert e = rows e*r:(e+1)*r)
and ``moral_B`` [d_out, E*r]. With gates g [T, E] (top-k renormalised, zero elsewhere, LoRA scaling
folded in) the mixture is two GEMMs and a broadcast multiply, no loop over experts, no host sync:

    u = dropout(x) @ A.T                       # [T, E*r]
    u = (u.view(T, E, r) * g[:, :, None])      # zero for experts outside the top-k
    y = addmm(base(x), u.view(T, E*r), B.T)    # base + sum_e g_e * B_e A_e x in one kernel
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoRALConfig
from .router import Router

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency of the project
    Conv1D = ()  # type: ignore[assignment,misc]

# Linears that read the FFN block input itself; within one block they share one dropout and one
# fused A GEMM. Anything else (down_proj, c_proj, ...) projects its own input with the block's gates.
INPUT_SIDE_NAMES = frozenset({"gate_proj", "up_proj", "c_fc", "dense_h_to_4h", "fc1", "fc_in", "w1", "w3"})


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D; TypeError otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D weight: [in, out]
    raise TypeError(f"MoRAL adapts nn.Linear or transformers Conv1D layers, got {type(module).__name__}")


class MoRALLinear(nn.Module):
    """A frozen linear plus E stacked LoRA experts mixed by a router's gates."""

    def __init__(self, base_layer: nn.Module, config: MoRALConfig, router: Router | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        self.base_layer = base_layer
        self.num_experts, self.rank, self.scaling = config.num_experts, config.rank, config.scaling
        self.dropout = config.dropout
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        stacked = config.num_experts * config.rank
        self.moral_A = nn.Parameter(torch.empty(stacked, self.in_features, dtype=dtype, device=weight.device))
        self.moral_B = nn.Parameter(
            torch.zeros(self.out_features, stacked, dtype=dtype, device=weight.device)
        )
        # Like peft: kaiming-uniform A (fan_in = d_in, the same bound as one [r, d_in] expert), zero B,
        # so a fresh adapter leaves the base model's outputs unchanged.
        nn.init.kaiming_uniform_(self.moral_A, a=math.sqrt(5))
        self.moral_router = router  # linear scope only; None when a BlockRouter feeds this layer
        self.enabled = True
        # Plain attributes (not submodules): the BlockRouter is already registered on the parent block.
        self.block: BlockRouter | None = None
        self.slot = -1  # index in the block's fused input-side product; -1 = computes its own

    def gated_product(self, x2: Tensor, gates4: Tensor) -> Tensor:
        """dropout(x2) [T, d_in] through the stacked A, each expert's r columns times its gate.

        gates4: [T, 1, E, 1] (scaling folded in). Returns u [T, E*r].
        """
        if self.training and self.dropout > 0:
            x2 = F.dropout(x2, self.dropout, training=True)
        u = x2 @ self.moral_A.t()  # [T, E*r]
        num_tokens = u.shape[0]
        return (u.view(num_tokens, 1, self.num_experts, self.rank) * gates4).view(num_tokens, -1)  # [T, E*r]

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer(x)
        if not self.enabled:
            return base  # bit-exact base output
        num_tokens = base.numel() // self.out_features
        block = self.block
        if block is not None:
            if block.gates4 is None:
                raise RuntimeError(
                    "a block-scope MoRAL linear ran outside its block's forward (no router gates); "
                    "call the enclosing block, or use router_scope='linear'"
                )
            if self.slot >= 0 and x is block.block_input:  # gate/up: product precomputed by the block
                u = block.products[:, self.slot]  # [T, E*r], a strided view
            else:  # e.g. down_proj: its own input, the block's gates
                u = self.gated_product(x.reshape(num_tokens, self.in_features), block.gates4)
        else:
            assert self.moral_router is not None
            gates = self.moral_router(x)  # [T, E], scaling folded in
            gates4 = gates.view(num_tokens, 1, self.num_experts, 1)  # [T, E] -> [T, 1, E, 1]
            u = self.gated_product(x.reshape(num_tokens, self.in_features), gates4)
        out = torch.addmm(base.reshape(num_tokens, self.out_features), u, self.moral_B.t())  # [T, d_out]
        return out.view(base.shape)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"
        )


class BlockRouter(Router):
    """One router per FFN block, computed from the block input in a forward pre-hook.

    Its gates (scaling folded in) are shared by every adapted linear of the block. The input-side
    linears (gate/up) also share one dropout of the block input and one GEMM over their
    concatenated A matrices; each then only adds ``u_i @ B_i.T`` to its base output.
    """

    def __init__(self, in_features: int, config: MoRALConfig, device: torch.device | None = None) -> None:
        super().__init__(
            in_features,
            config.num_experts,
            config.top_k,
            init_std=config.router_init_std,
            jitter=config.router_jitter,
            scale=config.scaling,
            device=device,
        )
        self.rank, self.dropout = config.rank, config.dropout
        self.input_side: list[MoRALLinear] = []  # plain list: the linears are registered on the block
        # Per block call (cleared after it): the input, gates [T, 1, E, 1], products [T, n, E*r].
        self.block_input: Tensor | None = None
        self.gates4: Tensor | None = None
        self.products: Tensor | None = None
        self._a_cache: tuple[tuple[tuple[int, int], ...], Tensor] | None = None

    def attach(self, block: nn.Module, linears: dict[str, MoRALLinear]) -> list[Any]:
        """Link the block's adapted linears and hook the block; returns the hook handles."""
        for name, layer in linears.items():
            object.__setattr__(layer, "block", self)  # a plain reference, not a second registration
            if name in INPUT_SIDE_NAMES and layer.in_features == self.in_features:
                layer.slot = len(self.input_side)
                self.input_side.append(layer)
        return [
            block.register_forward_pre_hook(self._before_block, with_kwargs=True),
            block.register_forward_hook(self._after_block),
        ]

    def _stacked_input_a_t(self) -> Tensor:
        """[d, n*E*r]: the input-side A matrices concatenated, transposed (a view)."""
        weights = [layer.moral_A for layer in self.input_side]
        if len(weights) == 1:
            return weights[0].t()
        if torch.is_grad_enabled():
            return torch.cat(weights).t()  # autograd splits the gradient back to each A
        # Inference (e.g. token-by-token decoding): re-use the copy until a weight changes in place.
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if self._a_cache is None or self._a_cache[0] != key:
            self._a_cache = (key, torch.cat(weights).t())
        return self._a_cache[1]

    def _before_block(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not self.enabled or not isinstance(x, Tensor):
            self.block_input, self.gates4, self.products, self.last = None, None, None, None
            return
        gates = self.forward(x)  # [T, E], scaling folded in
        num_tokens = gates.shape[0]
        self.gates4 = gates.view(num_tokens, 1, self.num_experts, 1)  # [T, E] -> [T, 1, E, 1]
        self.block_input = x
        if self.input_side:
            x2 = x.reshape(num_tokens, self.in_features)  # [T, d]
            if self.training and self.dropout > 0:
                x2 = F.dropout(x2, self.dropout, training=True)  # one dropout shared by gate and up
            u = x2 @ self._stacked_input_a_t()  # [T, n*E*r]: one GEMM for every input-side linear
            u = u.view(num_tokens, len(self.input_side), self.num_experts, self.rank)  # [T, n, E, r]
            self.products = (u * self.gates4).view(num_tokens, len(self.input_side), -1)  # [T, n, E*r]

    def _after_block(self, block: nn.Module, args: tuple, output: Any) -> None:
        # Drop per-call references so activations are not kept alive past the block in inference.
        self.block_input, self.gates4, self.products = None, None, None
