"""Router, aux losses and the stacked expert computation against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe import MoRALConfig, MoRALModel
from moe.layer import make_plan
from moe.losses import expert_group_ids, localized_balance_loss, router_z_loss, switch_balance_loss
from moe.router import ExpertStats, Router, RoutingContext, expert_statistics, token_mask, topk_gates
from tests.moe.conftest import random_batch, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread hand-off overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- gates
def test_topk_gates_renormalise_over_the_chosen_experts():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 2.0]])
    probs = logits.softmax(-1)
    weights, idx = topk_gates(logits, 2, scale=2.0)
    assert idx.tolist() == [[0, 1], [1, 3]]
    assert torch.allclose(weights.sum(-1), torch.full((2,), 2.0))  # renormalised, times the scale
    assert torch.allclose(weights[0, 0], 2 * probs[0, 0] / (probs[0, 0] + probs[0, 1]))


def test_topk_gates_dense_and_top1():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    weights, idx = topk_gates(logits, 4, scale=3.0)
    assert idx is None and torch.allclose(weights, 3 * probs)
    weights, idx = topk_gates(logits, 1)
    # top-1 keeps the raw probability (Switch) so the router still receives a gradient
    assert torch.allclose(weights[:, 0], probs.max(-1).values)


def test_router_records_and_stats_ignore_padding():
    router = Router(3, num_experts=2, top_k=1, init_std=0.0, scale=2.0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
    router.context = RoutingContext(attention_mask=torch.tensor([[1, 1, 0]]))
    x = torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0], [-1.0, 0, 0]]])  # [B=1, S=3, d=3]; last token is padding
    rec = router(x)
    assert rec is router.last
    p = 1 / (1 + math.exp(-2))  # softmax([1, -1])[0]
    # dense gates: zero off the top-k, scale folded in
    assert torch.allclose(rec.gates, torch.tensor([[2 * p, 0.0], [0.0, 2 * p], [0.0, 2 * p]]))
    assert rec.mask.tolist() == [1.0, 1.0, 0.0] and rec.topk_idx.flatten().tolist() == [0, 1, 1]
    stats = ExpertStats({"r": router})
    stats.update()
    report = stats.report()["r"]
    assert report["tokens"] == [2.0] and report["load"] == [0.5, 0.5]
    assert report["importance"] == pytest.approx([0.5, 0.5])
    stats.update()  # a record is counted once
    assert stats.report()["r"]["tokens"] == [2.0]
    # without a mask every token counts
    load, importance, tokens = expert_statistics(rec.logits[None], rec.topk_idx[None], None)
    assert tokens.item() == 3 and load.tolist() == [[1.0, 2.0]]
    assert importance[0].tolist() == pytest.approx([p + 2 * (1 - p), 1 - p + 2 * p])


def test_kv_decoding_mask_takes_the_last_positions():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert token_mask(mask, (2, 1)).tolist() == [1.0, 1.0]
    assert token_mask(mask, (2, 4)).tolist() == [0.0, 1, 1, 1, 1, 1, 1, 1]
    assert token_mask(mask, (3, 1)) is None  # batch mismatch: no masking rather than a wrong one


# ---------------------------------------------------------------------------------------- losses
def test_switch_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    idx = torch.tensor([[0], [1], [0]])
    # mask drops token 1: f = [1, 0], P = [(0.7+0.9)/2, (0.3+0.1)/2] -> L = 2 * (1 * 0.8) = 1.6
    assert switch_balance_loss(probs, idx, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(1.6)
    # no mask: f = [2/3, 1/3], P = [2/3, 1/3] -> 2 * (4/9 + 1/9) = 10/9
    assert switch_balance_loss(probs, idx).item() == pytest.approx(10 / 9)
    # uniform routing gives k
    uniform = torch.full((4, 4), 0.25)
    assert switch_balance_loss(
        uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    ).item() == pytest.approx(2)


def test_localized_loss_hand_computed_with_padding():
    gates = torch.tensor([[[0.6, 0.4], [0.5, 0.5]], [[0.2, 0.8], [0.3, 0.7]]])  # [B=2, S=2, E=2]
    mask = torch.tensor([[1, 1], [1, 0]])  # sample 1's second token is padding
    group = torch.tensor([0, 1])
    # Q = [[1.1, 0.9], [0.2, 0.8]]; I = [[1.1, 0.9], [0.9, 1.1]]; I*Q = [1.21, 0.81, 0.18, 0.88]
    values = torch.tensor([1.21, 0.81, 0.18, 0.88])
    mean = values.mean().item()  # 0.77
    expected = ((values - mean) ** 2).sum().item() / 3 / mean**2
    got = localized_balance_loss(gates, mask, group, num_groups=2, delta=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(0.5554 / 3 / 0.5929, rel=1e-4)
    # without sample groups every sample is group 0
    none_group = localized_balance_loss(gates, mask, None, 2, 0.1)
    same = localized_balance_loss(gates, mask, torch.tensor([0, 0]), 2, 0.1)
    assert none_group.item() == pytest.approx(same.item())
    with pytest.raises(ValueError, match="sample_group"):
        localized_balance_loss(gates, mask, torch.tensor([0, 1, 0]), 2, 0.1)


def test_expert_groups_are_contiguous():
    assert expert_group_ids(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expert_group_ids(5, 2).tolist() == [0, 0, 0, 1, 1]


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # lse = log 2, log 4
    full = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(full)
    assert router_z_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2) ** 2)


# ------------------------------------------------------------------- stacked == per-expert reference
def _reference_gates(router: Router, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-token loop: softmax, pick the k largest, renormalise (k > 1)."""
    probs = F.linear(x.reshape(-1, x.shape[-1]).float(), router.weight).softmax(-1)  # [T, E]
    gates = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        chosen = sorted(range(probs.shape[1]), key=lambda e: -probs[t, e].item())[:top_k]
        total = sum(probs[t, e] for e in chosen) if 1 < top_k else 1.0
        for e in chosen:
            gates[t, e] = probs[t, e] / total
    return gates


def _reference_linear(layer, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """base(x) + sum_e g_e * scaling * B_e A_e x, one expert at a time."""
    x2 = x.reshape(-1, layer.in_features)
    out = layer.base_layer(x).reshape(x2.shape[0], -1)
    r = layer.rank
    for e in range(layer.num_experts):
        a, b = layer.moral_A[e * r : (e + 1) * r], layer.moral_B[e * r : (e + 1) * r]  # [r, d_in], [r, d_out]
        out = out + gates[:, e : e + 1] * layer.scaling * (x2 @ a.t() @ b)
    return out.view(*x.shape[:-1], -1)


def _randomise_b(model: MoRALModel, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.moral_B.copy_(torch.randn(layer.moral_B.shape, generator=gen) * 0.1)
            layer.moral_A.copy_(torch.randn(layer.moral_A.shape, generator=gen) * 0.2)
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))


def _capture_mlp_io(model: MoRALModel, mlp: torch.nn.Module, ids: torch.Tensor):
    seen = {}
    handle = mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("scope", ["block", "linear"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_stacked_llama_mlp_equals_per_expert_sum(scope, top_k):
    cfg = MoRALConfig(num_experts=4, top_k=top_k, rank=4, alpha=8, router_scope=scope, dropout=0.1)
    model = MoRALModel(tiny_llama(), cfg).eval()  # eval: dropout off, so the reference is deterministic
    _randomise_b(model)
    mlp = model.base_model.model.layers[1].mlp
    x, y = _capture_mlp_io(model, mlp, random_batch())
    with torch.no_grad():
        if scope == "block":
            g = _reference_gates(mlp.moral_router, x, top_k)
            gate = _reference_linear(mlp.gate_proj, x, g)
            up = _reference_linear(mlp.up_proj, x, g)
            h = F.silu(gate) * up
            expected = _reference_linear(mlp.down_proj, h, g)
        else:
            gate = _reference_linear(mlp.gate_proj, x, _reference_gates(mlp.gate_proj.moral_router, x, top_k))
            up = _reference_linear(mlp.up_proj, x, _reference_gates(mlp.up_proj.moral_router, x, top_k))
            h = F.silu(gate) * up
            expected = _reference_linear(
                mlp.down_proj, h, _reference_gates(mlp.down_proj.moral_router, h, top_k)
            )
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        y, mlp.down_proj.base_layer(F.silu(mlp.gate_proj.base_layer(x)) * mlp.up_proj.base_layer(x))
    )


@pytest.mark.parametrize("scope", ["block", "linear"])
def test_stacked_gpt2_conv1d_mlp_equals_per_expert_sum(scope):
    model = MoRALModel(tiny_gpt2(), MoRALConfig(num_experts=4, top_k=2, rank=4, router_scope=scope)).eval()
    _randomise_b(model)
    mlp = model.base_model.transformer.h[0].mlp
    x, y = _capture_mlp_io(model, mlp, random_batch())
    with torch.no_grad():
        if scope == "block":
            g_fc = g_proj = _reference_gates(mlp.moral_router, x, 2)
        else:
            g_fc = _reference_gates(mlp.c_fc.moral_router, x, 2)
        h = mlp.act(_reference_linear(mlp.c_fc, x, g_fc))
        if scope == "linear":
            g_proj = _reference_gates(mlp.c_proj.moral_router, h, 2)
        expected = _reference_linear(mlp.c_proj, h, g_proj)
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_block_scope_fuses_gate_and_up_only():
    model = MoRALModel(tiny_llama(), MoRALConfig(num_experts=4, rank=4))
    mlp = model.base_model.model.layers[0].mlp
    assert [layer.slot for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [0, 1, -1]
    assert set(model.routers) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_training_step_sends_gradients_to_experts_and_router():
    model = MoRALModel(tiny_llama(), MoRALConfig(num_experts=4, rank=4, top_k=2)).train()
    _randomise_b(model)
    ids = random_batch()
    out = model(input_ids=ids, labels=ids)
    (out.loss + model.aux_loss()).backward()
    mlp = model.base_model.model.layers[0].mlp
    for p in (mlp.moral_router.weight, mlp.gate_proj.moral_A, mlp.up_proj.moral_A, mlp.down_proj.moral_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "moral_" not in n)


@pytest.mark.parametrize("scope", ["block", "linear"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_decoding_plan_equals_dense(scope, top_k):
    """One token without autograd gathers only the chosen experts; it must match the dense product."""
    model = MoRALModel(
        tiny_llama(), MoRALConfig(num_experts=8, top_k=top_k, rank=4, router_scope=scope)
    ).eval()
    _randomise_b(model)
    mlp = model.base_model.model.layers[0].mlp
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0))  # [B=1, S=1, d]
    record = (mlp.moral_router if scope == "block" else mlp.gate_proj.moral_router).forward(x)
    with torch.no_grad():
        plan = make_plan(record, x.dtype)
        sparse = mlp(x)
    assert plan.gates4 is None and plan.experts.tolist() == record.topk_idx.flatten().tolist()
    with torch.enable_grad():
        assert make_plan(record, x.dtype).experts is None  # autograd on: the dense plan
        dense = mlp(x).detach()
    assert torch.allclose(sparse, dense, atol=1e-6)
    with torch.no_grad():
        base = mlp.down_proj.base_layer(F.silu(mlp.gate_proj.base_layer(x)) * mlp.up_proj.base_layer(x))
    assert not torch.allclose(sparse, base)


def test_dropout_linear_matches_dropout_then_linear():
    from moe.layer import _DropoutLinear, dropout_linear, keep_mask

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.double, generator=gen, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.double, generator=gen, requires_grad=True)
    keep = torch.rand(6, 5, generator=gen) > 0.3
    out = _DropoutLinear.apply(x, w, keep, 1 / 0.7)
    assert torch.allclose(out, F.linear(x * keep / 0.7, w))
    assert torch.autograd.gradcheck(lambda a, b: _DropoutLinear.apply(a, b, keep, 1 / 0.7), (x, w))
    torch.manual_seed(1)
    dropped = dropout_linear(x.float(), w.float(), 0.3, training=True)
    torch.manual_seed(1)
    mask = keep_mask(torch.Size([6, 5]), 0.3, torch.device("cpu"))  # the same draw
    assert torch.allclose(dropped, F.linear(x.float() * mask / 0.7, w.float()), atol=1e-6)
    assert torch.equal(dropout_linear(x, w, 0.3, training=False), F.linear(x, w))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_drops_at_rate_p_independently(p):
    from moe.layer import keep_mask

    torch.manual_seed(0)
    mask = keep_mask(torch.Size([512, 1031]), p, torch.device("cpu"))  # odd size: a partial last word
    assert mask.dtype == torch.bool and mask.shape == (512, 1031)
    n = mask.numel()
    rate = 1.0 - mask.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5 + 2**-16  # within 4 standard errors
    # Neighbouring lanes (the four 16-bit parts of one random word) are uncorrelated.
    flat = (~mask).float().view(-1)[: n - n % 4].view(-1, 4)
    both = (flat[:, 0] * flat[:, 1]).mean().item()
    assert abs(both - p * p) < 4 * (p * p / (n / 4)) ** 0.5
    assert not torch.equal(mask, keep_mask(torch.Size([512, 1031]), p, torch.device("cpu")))  # fresh draws
