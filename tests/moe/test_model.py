"""MoRALModel behaviour: exactness, losses, save/load, training, generation, targets, LoRA import."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe import MoRALConfig, MoRALModel
from moe.losses import localized_balance_loss, router_z_loss, switch_balance_loss
from moe.model import WEIGHTS_NAME, resolve_target_modules
from tests.moe.conftest import random_batch, tiny_gpt2, tiny_llama

SMALL = {"num_experts": 4, "rank": 4, "alpha": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread hand-off overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model: MoRALModel, seed: int = 5) -> None:
    """Training-like perturbation of every adapter tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def test_zero_b_leaves_base_outputs_unchanged(llama):
    ids = random_batch()
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        model = MoRALModel(llama, MoRALConfig(**SMALL))
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_base_is_frozen_and_report_counts(llama):
    model = MoRALModel(llama, MoRALConfig(**SMALL))
    report = model.trainable_parameters_report()
    adapter = model.adapter_state_dict()
    assert report["trainable"] == sum(p.numel() for p in adapter.values())
    assert report["routers"] == 2 * 4 * 32  # one block router per layer, E x d
    assert report["experts"] == 2 * (2 * 4 * 4 * (32 + 64) + 4 * 4 * (64 + 32))
    assert 0 < report["percent"] < 100
    assert all(not p.requires_grad for n, p in model.named_parameters() if "moral_" not in n)


def test_disable_adapter_restores_base_exactly(llama):
    ids = random_batch()
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        model = MoRALModel(llama, MoRALConfig(**SMALL))
        _perturb(model)
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, expected)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, expected)
            assert model.aux_loss().item() == 0.0
        assert model.adapters_enabled
        assert torch.equal(model(input_ids=ids).logits, adapted)
        model.disable_adapter_layers()
        assert torch.equal(model(input_ids=ids).logits, expected)
        model.enable_adapter_layers()
        assert torch.equal(model(input_ids=ids).logits, adapted)


def test_aux_loss_combines_per_router_losses_and_masks_padding(llama):
    cfg = MoRALConfig(**SMALL, balance_coef=0.1, z_loss_coef=0.01)
    model = MoRALModel(llama, cfg)
    _perturb(model)
    ids = random_batch(batch=2, seq=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    model(input_ids=ids, attention_mask=mask)
    records = [r.last for r in model.routers.values()]
    assert all(r.mask.tolist() == mask.flatten().float().tolist() for r in records)
    switch = torch.stack([switch_balance_loss(r.probs, r.topk_idx, r.mask) for r in records]).mean()
    z = torch.stack([router_z_loss(r.logits, r.mask) for r in records]).mean()
    assert model.aux_loss().item() == pytest.approx((0.1 * switch + 0.01 * z).item(), rel=1e-6)
    # padded tokens change nothing in the loss or the stats
    before = model.aux_loss().item()
    stats = model.expert_stats()["model.layers.0.mlp"]
    assert stats["tokens"] == [9.0] and sum(stats["load"]) == pytest.approx(2.0)
    assert sum(stats["importance"]) == pytest.approx(1.0)
    ids2 = ids.clone()
    ids2[1, 3:] = 7  # different padding content
    model.reset_stats()
    model(input_ids=ids2, attention_mask=mask)
    assert model.aux_loss().item() == pytest.approx(before, rel=1e-6)
    assert model.expert_stats()["model.layers.0.mlp"] == stats


def test_localized_loss_uses_sample_groups(llama):
    cfg = MoRALConfig(**SMALL, top_k=4, balance_loss="localized", balance_coef=0.5, localized_delta=0.2)
    model = MoRALModel(llama, cfg)
    _perturb(model)
    ids = random_batch(batch=2, seq=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    groups = torch.tensor([0, 1])
    model(input_ids=ids, attention_mask=mask, sample_group=groups)
    expected = sum(
        0.5 * localized_balance_loss(r.last.gates.view(2, 5, 4) / r.last.scale, mask, groups, 2, 0.2)
        for r in model.routers.values()
    )
    assert model.aux_loss().item() == pytest.approx(expected.item(), rel=1e-6)
    model(input_ids=ids, attention_mask=mask)  # absent groups: all group 0
    assert model.aux_loss().item() != pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="sample_group"):
        model(input_ids=ids, sample_group=torch.tensor([0, 2]))


def test_collapsed_router_is_visible_in_expert_stats(llama):
    model = MoRALModel(llama, MoRALConfig(**SMALL, top_k=2))
    ids = random_batch(batch=2, seq=8)
    router = model.routers["model.layers.0.mlp"]
    x, _ = _block_input(model, ids)
    # Router rows 2 and 3 = a direction positive on every token of this batch: all tokens pick {2, 3}.
    w = torch.linalg.pinv(x.reshape(-1, 32)) @ torch.ones(16)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2:] = 20 * w
    model.reset_stats()
    with torch.no_grad():
        model(input_ids=ids)
    collapsed = model.expert_stats()["model.layers.0.mlp"]
    assert collapsed["load"] == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert collapsed["importance"][2] + collapsed["importance"][3] > 0.99
    healthy = model.expert_stats()["model.layers.1.mlp"]
    assert max(healthy["load"]) < 1.0
    assert switch_balance_loss(router.last.probs, router.last.topk_idx) > 1.9  # balanced ~ top_k * 1


def _block_input(model, ids):
    seen = {}
    mlp = model.base_model.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("scope", ["block", "linear"])
def test_save_load_gives_identical_logits(tmp_path, scope):
    cfg = MoRALConfig(**SMALL, router_scope=scope, base_model_name_or_path="tiny", base_model_sha256="a" * 64)
    model = MoRALModel(tiny_llama(), cfg)
    _perturb(model)
    ids = random_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(saved) == set(model.adapter_state_dict())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    ]
    loaded = MoRALModel.from_pretrained(tiny_llama(), tmp_path, expected_base_sha256="a" * 64)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert loaded.trainable_parameters_report()["trainable"] == 0
    trainable = MoRALModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters_report()["trainable"] > 0


def test_from_pretrained_clear_errors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = MoRALModel(tiny_llama(), MoRALConfig(**SMALL, base_model_sha256="a" * 64))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        MoRALModel.from_pretrained(tiny_llama(), tmp_path, expected_base_sha256="b" * 64)
    wider = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    with pytest.raises(ValueError, match="shapes do not match"):
        MoRALModel.from_pretrained(wider, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors.pop("model.layers.1.mlp.down_proj.moral_B")
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="1 missing"):
        MoRALModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError):
        MoRALModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")


def test_loss_falls_on_tiny_memorisation_task():
    torch.manual_seed(0)
    base = tiny_llama()
    with torch.no_grad():  # the tiny random head (std 0.02) caps logits near 0.6: widen it
        base.lm_head.weight.mul_(10)
    model = MoRALModel(base, MoRALConfig(**{**SMALL, "alpha": 16}, dropout=0.0)).train()
    ids = random_batch(batch=2, seq=8, seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_kv_cache_generation_matches_no_cache_greedy(llama):
    model = MoRALModel(llama, MoRALConfig(**SMALL)).eval()
    _perturb(model)
    prompt = random_batch(batch=2, seq=5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.reset_stats()
    cached = model.generate(input_ids=prompt, use_cache=True, **kw)
    stats = model.expert_stats()["model.layers.0.mlp"]
    uncached = model.generate(input_ids=prompt, use_cache=False, **kw)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    # prefill counts 8 real prompt tokens, then one token per sample per decoding step
    assert stats["tokens"][0] == 8 + 2 * 7
    assert model.generation_config is llama.generation_config and model.device.type == "cpu"
    assert model.config is llama.config


def test_target_resolution_by_architecture(llama, gpt2):
    assert resolve_target_modules(llama, None) == [
        f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")
    ]
    assert resolve_target_modules(gpt2, None) == [
        f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")
    ]  # attention's c_proj is not an FFN linear
    model = MoRALModel(tiny_gpt2(), MoRALConfig(**SMALL))
    assert model.moral_config.target_modules == ["mlp.c_fc", "mlp.c_proj"]


def test_unknown_architecture_and_unmatched_targets_raise(llama):
    odd = copy.deepcopy(llama)
    odd.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"mystery.*mlp\.gate_proj"):
        MoRALModel(odd, MoRALConfig())
    with pytest.raises(ValueError, match=r"match no module.*self_attn\.q_proj"):
        MoRALModel(llama, MoRALConfig(target_modules=["mlp.w1"]))
    with pytest.raises(TypeError, match="linear"):
        MoRALModel(tiny_llama(), MoRALConfig(target_modules=["mlp.act_fn"]))
    MoRALModel(llama, MoRALConfig(**SMALL))
    with pytest.raises(ValueError, match="already carries"):
        MoRALModel(llama, MoRALConfig(**SMALL))


def test_init_experts_from_peft_lora_reproduces_its_delta(tmp_path):
    from peft import LoraConfig, get_peft_model

    ids = random_batch()
    peft_model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=2, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
        ),
    ).eval()
    peft_model.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert not torch.allclose(expected, tiny_llama()(input_ids=ids).logits)

    model = MoRALModel(tiny_llama(), MoRALConfig(**SMALL, top_k=2)).eval()
    report = model.init_experts_from_lora([tmp_path / "lora"] * 4)  # every expert = the LoRA
    assert report[0]["missing"] == [] and len(report[0]["loaded"]) == 6
    with torch.no_grad():
        # gates of the chosen experts sum to 1, so any routing gives exactly the LoRA's delta
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
    layer = model.layers["model.layers.0.mlp.gate_proj"]
    lora_a = load_file(str(tmp_path / "lora" / WEIGHTS_NAME))[
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    ]
    assert torch.equal(layer.moral_A[4:6], lora_a)  # expert 1, first r_l rows
    assert torch.equal(layer.moral_B[6:8], torch.zeros(2, 64))  # padding rows of (transposed) B stay zero

    with pytest.raises(ValueError, match="exceeds the expert rank"):
        MoRALModel(tiny_llama(), MoRALConfig(**{**SMALL, "rank": 1})).init_experts_from_lora(
            [tmp_path / "lora"]
        )
    with pytest.raises(ValueError, match="distinct"):
        model.init_experts_from_lora([tmp_path / "lora"] * 2, expert_indices=[1, 1])
