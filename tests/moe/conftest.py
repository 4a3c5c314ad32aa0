"""Tiny deterministic base models for the moe tests (no download, < 1 s to build)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 128


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer LlamaForCausalLM (hidden 32, FFN 64) with fixed-seed weights, in eval mode.

    Importable by other test files: ``from tests.moe.conftest import tiny_llama``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT2LMHeadModel (Conv1D linears) with fixed-seed weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def random_batch(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    """Random token ids [B, S] avoiding the special ids 0..2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def gpt2() -> torch.nn.Module:
    return tiny_gpt2()
