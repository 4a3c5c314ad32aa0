"""Stacked LoRA experts on a frozen linear, and the per-FFN-block router that feeds them.

The E experts of a linear are stored stacked: ``moral_A`` [E*r, d_in] and ``moral_B`` [E*r, d_out]
(expert e = rows e*r:(e+1)*r of both; B is kept transposed so an expert's rows are contiguous).
With gates g [T, E] (top-k renormalised, zero elsewhere, LoRA scaling folded in) the mixture is two
GEMMs and a broadcast multiply, no loop over experts, no host sync (the "dense" plan):

    u = dropout(x) @ A.T                         # [T, E*r]
    u = u.view(T, 1, E, r) * g.view(T, 1, E, 1)  # zero for experts outside the top-k
    y = addmm(base(x), u.view(T, E*r), B)        # base + sum_e g_e * B_e A_e x in one kernel

Batch-1 token-by-token decoding (one token, no autograd) uses the "sparse" plan instead: only the
chosen experts' rows of A and B are gathered, so each step reads k/E of the adapter weights
(decoding is memory-bound: reading all eight experts costs ~8% more bytes per token than the base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoRALConfig
from .router import Router, RouterRecord

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


class _DropoutLinear(torch.autograd.Function):
    """u = (x * keep / (1 - p)) @ A.T, saving x and a bool mask for backward.

    ``F.dropout`` then ``F.linear`` would keep the dropped-out copy of x and a float mask alive
    until backward (4 + 4 bytes per element); this keeps x (often saved anyway, e.g. by the router)
    and a 1-byte mask, and recomputes the product in backward. About 7 MB per FFN block at
    8 x 128 tokens on SmolLM2: what makes the mixture's peak memory match plain LoRA's.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        # torch.where, not x * keep: a bool operand of a multiply is first cast to a float copy.
        return F.linear(torch.where(keep, x, 0.0), weight) * scale  # [T, d] -> [T, out], scaled small side

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, keep = ctx.saved_tensors
        grad = grad * ctx.scale  # [T, out]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, grad @ weight.to(grad.dtype), 0.0)  # [T, d]
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ torch.where(keep, x.to(grad.dtype), 0.0)).to(weight.dtype)  # [out, d]
        return grad_x, grad_w, None, None


def dropout_linear(x: Tensor, weight: Tensor, p: float, training: bool) -> Tensor:
    """``F.linear(F.dropout(x, p, training), weight)`` with the memory-lean backward above."""
    if not training or p == 0.0:
        return F.linear(x, weight)
    keep = keep_mask(x.shape, p, x.device)  # [T, d]
    return _DropoutLinear.apply(x, weight, keep, 1.0 / (1.0 - p))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A bool mask, True with probability 1 - p.

    On CPU, ``bernoulli_`` draws one random number per element (~10 ns each: 15 ms for one
    8 x 128 x 1536 input, more than the expert GEMMs it feeds). Here each random 64-bit word is
    split into four 16-bit lanes compared with round(p * 2**16): the drop rate is p to within
    2**-17, a quarter of the draws. Other devices keep ``bernoulli_`` (fast there)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    numel = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64)  # 4 lanes each
    lanes = words.view(torch.int16)[:numel]  # uniform over [-2**15, 2**15)
    threshold = round(p * 2**16) - 2**15  # P(lane < threshold) = round(p * 2**16) / 2**16
    return (lanes >= threshold).view(shape)


@dataclass
class Plan:
    """How one routed call mixes its experts: dense (``gates4``) or sparse (``experts``, ``weights4``)."""

    gates4: Tensor | None = None  # [T, 1, E, 1] gates, scaling folded in
    experts: Tensor | None = None  # [k] the experts chosen for the single token (sparse plan)
    weights4: Tensor | None = None  # [1, 1, k, 1] their gates


def make_plan(record: RouterRecord, dtype: torch.dtype, training: bool = False) -> Plan:
    """Sparse plan for one token in inference (KV-cache decoding), dense otherwise."""
    idx = record.topk_idx
    num_tokens, num_experts = record.logits.shape
    if idx is not None and num_tokens == 1 and not training and not torch.is_grad_enabled():
        weights = record.weights if record.weights.dtype == dtype else record.weights.to(dtype)
        return Plan(experts=idx.view(-1), weights4=weights.view(1, 1, -1, 1))  # [1, k] -> [1, 1, k, 1]
    gates = record.gates if record.gates.dtype == dtype else record.gates.to(dtype)
    return Plan(gates4=gates.view(num_tokens, 1, num_experts, 1))  # [T, E] -> [T, 1, E, 1]


class MoRALLinear(nn.Module):
    """A frozen linear plus E stacked LoRA experts mixed by a router's gates."""

    def __init__(self, base_layer: nn.Module, config: MoRALConfig, router: Router | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        self.base_layer = base_layer
        self.num_experts, self.rank, self.scaling = config.num_experts, config.rank, config.scaling
        self.top_k, self.dropout = config.top_k, config.dropout
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        stacked = config.num_experts * config.rank
        self.moral_A = nn.Parameter(torch.empty(stacked, self.in_features, dtype=dtype, device=weight.device))
        self.moral_B = nn.Parameter(
            torch.zeros(stacked, self.out_features, dtype=dtype, device=weight.device)
        )
        # Like peft: kaiming-uniform A (fan_in = d_in, the same bound as one [r, d_in] expert), zero B,
        # so a fresh adapter leaves the base model's outputs unchanged.
        nn.init.kaiming_uniform_(self.moral_A, a=math.sqrt(5))
        self.moral_router = router  # linear scope only; None when a BlockRouter feeds this layer
        self.enabled = True
        # Plain attributes (not submodules): the BlockRouter is already registered on the parent block.
        self.block: BlockRouter | None = None
        self.slot = -1  # index in the block's fused input-side product; -1 = computes its own

    def project(self, x2: Tensor, plan: Plan) -> Tensor:
        """Gated low-rank input: dense [T, E*r] (zeros off the top-k) or sparse [1, k*r]."""
        num_tokens, rank = x2.shape[0], self.rank
        if plan.experts is None:
            u = dropout_linear(x2, self.moral_A, self.dropout, self.training)  # drop(x2) @ A.T: [T, E*r]
            u = u.view(num_tokens, 1, self.num_experts, rank) * plan.gates4  # [T, 1, E, r]
            return u.view(num_tokens, -1)  # [T, E*r]
        a = self.moral_A.view(self.num_experts, rank, -1).index_select(0, plan.experts)  # [k, r, d_in]
        u = F.linear(x2, a.view(-1, self.in_features))  # [1, k*r]: only the chosen experts' rows are read
        return (u.view(1, 1, -1, rank) * plan.weights4).view(1, -1)  # [1, k*r]

    def add_delta(self, base2: Tensor, u: Tensor, plan: Plan) -> Tensor:
        """base2 [T, d_out] + u @ B in one kernel, over all experts or the chosen ones."""
        b = self.moral_B
        if plan.experts is not None:  # [k, r, d_out] rows of the chosen experts
            b = (
                b.view(self.num_experts, self.rank, -1)
                .index_select(0, plan.experts)
                .view(-1, self.out_features)
            )
        # In place: the frozen base output is fresh and saved by nobody (a linear saves its input and
        # weight), so adding into it skips addmm's copy of a [T, d_out] tensor. Autograd's version
        # check would raise, not miscompute, if a wrapped layer ever did save its output.
        return base2.addmm_(u, b)  # [T, d_out]

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer(x)
        if not self.enabled:
            return base  # bit-exact base output
        num_tokens = base.numel() // self.out_features
        block = self.block
        if block is not None:
            plan = block.plan
            if plan is None:
                raise RuntimeError(
                    "a block-scope MoRAL linear ran outside its block's forward (no router gates); "
                    "call the enclosing block, or use router_scope='linear'"
                )
            if self.slot >= 0 and x is block.block_input:  # gate/up: product precomputed by the block
                u = block.products[:, self.slot]  # [T, E*r] or [T, k*r], a strided view
            else:  # e.g. down_proj: its own input, the block's gates
                u = self.project(x.reshape(num_tokens, self.in_features), plan)
        else:
            assert self.moral_router is not None
            plan = make_plan(self.moral_router(x), x.dtype, self.training)
            u = self.project(x.reshape(num_tokens, self.in_features), plan)
        out = self.add_delta(base.reshape(num_tokens, self.out_features), u, plan)  # [T, d_out]
        return out.view(base.shape)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"
        )


class BlockRouter(Router):
    """One router per FFN block, computed from the block input in a forward pre-hook.

    Its gates (scaling folded in) are shared by every adapted linear of the block. The input-side
    linears (gate/up) also share one dropout of the block input and one GEMM over their
    concatenated A matrices; each then only adds ``u_i @ B_i`` to its base output.
    """

    def __init__(self, in_features: int, config: MoRALConfig, device: torch.device | None = None) -> None:
        super().__init__(in_features, **config.router_options(), device=device)
        self.rank, self.dropout = config.rank, config.dropout
        self.input_side: list[MoRALLinear] = []  # plain list: the linears are registered on the block
        # Per block call (cleared after it): its input, routing plan and input-side products [T, n, *].
        self.block_input: Tensor | None = None
        self.plan: Plan | None = None
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

    def _stacked_input_a(self) -> Tensor:
        """[n*E*r, d]: the input-side A matrices concatenated (cached while no gradient is recorded)."""
        weights = [layer.moral_A for layer in self.input_side]
        if len(weights) == 1:
            return weights[0]
        if torch.is_grad_enabled():
            return torch.cat(weights)  # autograd splits the gradient back to each A
        # Inference (e.g. token-by-token decoding): re-use the copy until a weight changes in place.
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if self._a_cache is None or self._a_cache[0] != key:
            self._a_cache = (key, torch.cat(weights))
        return self._a_cache[1]

    def _before_block(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not self.enabled or not isinstance(x, Tensor):
            self._clear()
            object.__setattr__(self, "last", None)
            return
        plan = make_plan(self.forward(x), x.dtype, self.training)
        # object.__setattr__: nn.Module.__setattr__ costs microseconds per call, per layer, per token.
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "block_input", x)
        if not self.input_side:
            return
        n, rank = len(self.input_side), self.rank
        x2 = x.reshape(-1, self.in_features)  # [T, d]
        num_tokens = x2.shape[0]
        a = self._stacked_input_a()  # [n*E*r, d]
        if plan.experts is None:
            # One dropout mask shared by gate and up, one GEMM for every input-side linear.
            u = dropout_linear(x2, a, self.dropout, self.training)  # drop(x2) @ A.T: [T, n*E*r]
            u = u.view(num_tokens, n, self.num_experts, rank) * plan.gates4  # [T, n, E, r]
            products = u.view(num_tokens, n, -1)  # [T, n, E*r]
        else:  # one token: gather the chosen experts' rows of every input-side A
            a = a.view(n, self.num_experts, rank, -1).index_select(1, plan.experts)  # [n, k, r, d]
            u = F.linear(x2, a.view(-1, self.in_features))  # [1, n*k*r]
            products = (u.view(1, n, -1, rank) * plan.weights4).view(1, n, -1)  # [1, n, k*r]
        object.__setattr__(self, "products", products)

    def _after_block(self, block: nn.Module, args: tuple, output: Any) -> None:
        self._clear()  # drop per-call references: no activation outlives the block in inference

    def _clear(self) -> None:
        for name in ("block_input", "plan", "products"):
            object.__setattr__(self, name, None)
