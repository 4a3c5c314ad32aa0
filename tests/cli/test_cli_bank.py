"""`moral bank add | list | why` through the CLI entry point, with real peft LoRAs of the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from storage.registry import Registry
from storage.settings import get_settings


def save_peft_lora(base_dir: Path, out: Path, rank: int = 2, targets: str | list[str] | None = None) -> Path:
    """A stock peft LoRA on the model in ``base_dir``, with non-zero B so it changes outputs."""
    from transformers import AutoModelForCausalLM

    from moe.lora import make_lora_model, save_lora

    torch.manual_seed(1)
    model = make_lora_model(
        AutoModelForCausalLM.from_pretrained(base_dir), rank=rank, alpha=rank, target_modules=targets
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_lora(model, out)
    return out


@pytest.fixture
def tiny_env(settings, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("MORAL_BASE_MODEL", str(tiny_model_dir))
    get_settings.cache_clear()
    return get_settings()


def test_add_then_list(tiny_env, tiny_model_dir, tmp_path, capsys):
    lora = save_peft_lora(tiny_model_dir, tmp_path / "legal-lora")
    assert main(["bank", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert main(["bank", "add", str(lora), "--name", "legal", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["name"] == "legal" and added["source"] == "external" and added["rank"] == 2
    assert added["targets"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]

    assert main(["bank", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["path"]) for r in rows] == [("legal", str(lora.resolve()))]
    assert main(["bank", "list"]) == 0
    assert "legal" in capsys.readouterr().out
    events = Registry(tiny_env.registry_path).events(kind="bank.added")
    assert len(events) == 1 and events[0].detail["name"] == "legal"

    # The same adapter (or name) twice is refused, and nothing else changes.
    assert main(["bank", "add", str(lora)]) == 1
    assert "already holds" in capsys.readouterr().err
    assert len(Registry(tiny_env.registry_path).bank_entries()) == 1


def test_add_refuses_other_base_shapes_targets_and_rank(tiny_env, tiny_model_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    def refused(path: Path, message: str) -> None:
        assert main(["bank", "add", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err, err

    refused(tmp_path / "missing", "is not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "adapter_config.json")

    other_base = save_peft_lora(tiny_model_dir, tmp_path / "other-base")
    cfg_path = other_base / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-1.7B"
    cfg_path.write_text(json.dumps(cfg))
    refused(other_base, "trained for base model 'HuggingFaceTB/SmolLM2-1.7B'")

    # Same recorded base, wider FFN: the shapes give it away.
    wide_dir = tmp_path / "wide-base"
    wide = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300)
    )  # fmt: skip
    wide.save_pretrained(wide_dir)
    wide_lora = save_peft_lora(wide_dir, tmp_path / "wide-lora")
    cfg = json.loads((wide_lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)
    (wide_lora / "adapter_config.json").write_text(json.dumps(cfg))
    refused(wide_lora, "do not fit the base weight")

    attn = save_peft_lora(tiny_model_dir, tmp_path / "attn-lora", targets=["q_proj", "v_proj"])
    refused(attn, "adapts none of the modules MoRAL experts live on")

    big = save_peft_lora(tiny_model_dir, tmp_path / "rank16", rank=16)
    refused(big, "exceeds the MoRAL expert rank 8")
    assert Registry(tiny_env.registry_path).bank_entries() == []


def test_why_explains_a_recorded_selection(tiny_env, capsys):
    from tasks.bank import record_selection

    reg = Registry(tiny_env.registry_path)
    v = reg.create_version(run_id="r1")
    record_selection(tiny_env, reg, v, None, "the bank is empty", "r1")
    assert main(["bank", "why", f"v{v}"]) == 0
    assert "No bank initialisation: the bank is empty." in capsys.readouterr().out
    assert main(["bank", "why", "v9"]) == 1
