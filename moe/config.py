"""MoRAL adapter configuration: a validated dataclass saved as ``adapter_config.json`` beside the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

CONFIG_NAME = "adapter_config.json"
ADAPTER_TYPE = "moral"
FORMAT_VERSION = 1

# FFN linears per architecture (``config.model_type``), used when ``target_modules`` is None.
# GPT-2's FFN is ``mlp.c_fc`` / ``mlp.c_proj``; attention also has a ``c_proj``, hence the ``mlp.`` prefix.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{
        t: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
    },
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "phi": ["mlp.fc1", "mlp.fc2"],
}

# Keys renamed since the first (unversioned) files; applied by ``from_dict`` before validation.
_RENAMED_KEYS = {
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "num_local_experts": "num_experts",
}


@dataclass
class MoRALConfig:
    """Hyper-parameters of a mixture of LoRA experts on the FFN linears of a frozen causal LM."""

    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module-name suffixes to adapt (e.g. 'mlp.gate_proj'); None resolves the FFN linears "
            "from the base model's architecture."
        },
    )
    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts E per adapted linear."})
    top_k: int = field(
        default=2,
        metadata={"help": "Experts used per token; top_k == num_experts is LoRAMoE's dense softmax."},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r of each expert."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; each expert's delta is scaled by alpha/r."}
    )
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the expert input (training only)."})
    router_scope: Literal["block", "linear"] = field(
        default="block",
        metadata={
            "help": "'block': one router per FFN block computed from the block input, its gates shared by "
            "every adapted linear of the block (fast); 'linear': one router per adapted linear (LoRAMoE)."
        },
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the N(0, std) router init."})
    router_jitter: float = field(
        default=0.0,
        metadata={"help": "Multiplicative U(1-eps, 1+eps) noise on the router input in training."},
    )
    balance_loss: Literal["switch", "localized", "none"] = field(
        default="switch",
        metadata={
            "help": "'switch': Mixtral load balancing E*sum(f*P); 'localized': LoRAMoE's localized balancing "
            "constraint over expert groups; 'none'."
        },
    )
    balance_coef: float = field(default=0.01, metadata={"help": "Weight of the balance loss (beta)."})
    localized_delta: float = field(
        default=0.1,
        metadata={"help": "delta of the localized constraint: I = 1+delta in-group, 1-delta out."},
    )
    expert_groups: int = field(
        default=2, metadata={"help": "Number of contiguous expert groups for the localized constraint."}
    )
    z_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the router z-loss mean(lse(logits)^2)."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model identity (recorded, not used to load)."}
    )
    base_model_sha256: str | None = field(
        default=None, metadata={"help": "sha256 of the base weights; checked by from_pretrained if asked."}
    )

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                raise ValueError("target_modules must be a list of module-name suffixes, not a string")
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules must be a non-empty list of names, got {self.target_modules!r}"
                )
        for name in ("num_experts", "top_k", "rank", "expert_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.router_scope not in ("block", "linear"):
            raise ValueError(f"router_scope must be 'block' or 'linear', got {self.router_scope!r}")
        if self.router_init_std < 0:
            raise ValueError(f"router_init_std must be >= 0, got {self.router_init_std}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.balance_loss not in ("switch", "localized", "none"):
            raise ValueError(
                f"balance_loss must be 'switch', 'localized' or 'none', got {self.balance_loss!r}"
            )
        if self.balance_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("balance_coef and z_loss_coef must be >= 0")
        if not 0.0 <= self.localized_delta < 1.0:
            raise ValueError(f"localized_delta must be in [0, 1), got {self.localized_delta}")
        if self.expert_groups > self.num_experts:
            raise ValueError(
                f"expert_groups ({self.expert_groups}) cannot exceed num_experts ({self.num_experts})"
            )

    @property
    def scaling(self) -> float:
        """Per-expert LoRA scaling alpha / r (folded into the gates at run time)."""
        return self.alpha / self.rank

    def router_options(self) -> dict[str, Any]:
        """The :class:`moe.router.Router` arguments this config implies (every router is built with them)."""
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "init_std": self.router_init_std,
            "jitter": self.router_jitter,
            "scale": self.scaling,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the adapter type and format version."""
        return {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoRALConfig:
        """Build from a dict; older files (no ``format_version``, old key names) are upgraded explicitly."""
        data = dict(data)
        adapter_type = data.pop("adapter_type", ADAPTER_TYPE)
        if adapter_type != ADAPTER_TYPE:
            raise ValueError(f"not a MoRAL adapter config: adapter_type={adapter_type!r}")
        if "peft_type" in data:
            raise ValueError(f"this is a peft {data['peft_type']} config, not a MoRAL one")
        version = data.pop("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"adapter_config.json has format_version {version!r}; this code reads up to {FORMAT_VERSION}"
            )
        if version == 0:  # pre-release files: old key names; missing keys take the defaults below
            for old, new in _RENAMED_KEYS.items():
                if old in data and new not in data:
                    data[new] = data.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys in MoRAL config: {unknown}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` into ``directory`` (created if needed); returns the file path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MoRALConfig:
        """Read ``adapter_config.json`` from ``directory``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))
