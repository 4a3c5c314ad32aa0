"""MoRALConfig: validation, JSON round trip, explicit upgrade of older files."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from moe.config import CONFIG_NAME, FORMAT_VERSION, MoRALConfig


def test_defaults_follow_the_paper_recipe():
    cfg = MoRALConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.rank, cfg.alpha) == (8, 2, 8, 16.0)
    assert cfg.router_scope == "block" and cfg.balance_loss == "switch"
    assert cfg.scaling == 2.0


def test_every_field_has_help_text():
    assert all(f.metadata.get("help") for f in fields(MoRALConfig))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 9}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"rank": 0}, "rank"),
        ({"rank": True}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"router_scope": "layer"}, "router_scope"),
        ({"balance_loss": "aux"}, "balance_loss"),
        ({"balance_coef": -1.0}, "balance_coef"),
        ({"expert_groups": 9}, "expert_groups"),
        ({"localized_delta": 1.5}, "localized_delta"),
        ({"router_jitter": -0.1}, "router_jitter"),
        ({"target_modules": "mlp.gate_proj"}, "list"),
        ({"target_modules": []}, "non-empty"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoRALConfig(**kwargs)


def test_save_load_round_trip(tmp_path):
    cfg = MoRALConfig(target_modules=["mlp.up_proj"], num_experts=4, top_k=4, base_model_sha256="ab" * 32)
    path = cfg.save(tmp_path)
    assert path.name == CONFIG_NAME
    raw = json.loads(path.read_text())
    assert raw["adapter_type"] == "moral" and raw["format_version"] == FORMAT_VERSION
    assert MoRALConfig.load(tmp_path) == cfg


def test_older_file_gets_defaults_and_renamed_keys(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"r": 4, "lora_alpha": 8, "num_experts": 4}))
    cfg = MoRALConfig.load(tmp_path)
    assert (cfg.rank, cfg.alpha, cfg.num_experts, cfg.top_k, cfg.router_scope) == (4, 8, 4, 2, "block")


def test_loader_rejects_foreign_or_newer_files(tmp_path):
    with pytest.raises(ValueError, match="peft LORA"):
        MoRALConfig.from_dict({"peft_type": "LORA", "r": 8})
    with pytest.raises(ValueError, match="adapter_type"):
        MoRALConfig.from_dict({"adapter_type": "lora"})
    with pytest.raises(ValueError, match="format_version"):
        MoRALConfig.from_dict({"adapter_type": "moral", "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="unknown keys"):
        MoRALConfig.from_dict({"format_version": 1, "num_expert": 4})
    with pytest.raises(FileNotFoundError):
        MoRALConfig.load(tmp_path)
