"""MoRAL: a mixture of LoRA experts on the FFN linears of a frozen transformers causal LM."""

from .config import MoRALConfig
from .model import MoRALModel

__all__ = ["MoRALConfig", "MoRALModel"]
