"""The plain LoRA baseline: stock peft on the same FFN linears MoRAL adapts, trained by the same `train()`.

Saved and loaded with stock peft, so a baseline adapter directory is an ordinary peft checkpoint.
"""

from __future__ import annotations

import os
import re

import torch

# Llama-family FFN (Llama, Mistral, Qwen2, SmolLM, Gemma); other architectures follow moe.config's table.
LLAMA_FFN = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def ffn_suffixes(model: torch.nn.Module) -> list[str]:
    """Module-name suffixes of the FFN linears, from the same table MoRAL uses (Llama-family default)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from moe.config import DEFAULT_TARGETS
    except ImportError:  # keep the baseline usable on its own
        DEFAULT_TARGETS = {}
    return list(DEFAULT_TARGETS.get(model_type, LLAMA_FFN))


def ffn_target_modules(model: torch.nn.Module) -> list[str]:
    """Full names of the FFN linears of `model` (e.g. `model.layers.0.mlp.gate_proj`)."""
    suffixes = tuple("." + s for s in ffn_suffixes(model))
    # Not only nn.Linear: GPT-2's FFN linears are transformers Conv1D modules, which peft also adapts.
    names = [n for n, m in model.named_modules() if n.endswith(suffixes) and hasattr(m, "weight")]
    if not names:
        raise ValueError(
            f"no FFN linears ({', '.join(suffixes)}) found in {type(model).__name__}; "
            "pass target_modules explicitly"
        )
    return names


def make_lora_model(
    base_model: torch.nn.Module,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
):
    """Wrap `base_model` in a peft LoRA (base frozen); default targets: every FFN gate/up/down linear.

    The default is written as a regex over module names rather than bare suffixes so that it cannot
    accidentally match a same-named linear outside the MLP blocks.
    """
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        ffn_target_modules(base_model)  # fail early, with a clear message, on unsupported architectures
        target_modules = r".*\.(" + "|".join(re.escape(s) for s in ffn_suffixes(base_model)) + r")"
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base_model, config)


def save_lora(model, out_dir: str | os.PathLike) -> None:
    """Save only the adapter weights and adapter_config.json (stock peft format, safetensors)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)


def load_lora(base_model: torch.nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False):
    """Attach a saved LoRA adapter to `base_model` (eval mode unless `trainable`)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
    if not trainable:
        model.eval()
    return model
