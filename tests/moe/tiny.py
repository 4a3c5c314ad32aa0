"""Tiny local stand-ins for unit tests: a byte-level tokenizer with a ChatML template and a 2-layer Llama.

Built in memory, no network; import them from any test (`from tests.moe.tiny import ...`).
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(pad_is_eos: bool = False):
    """Byte-level BPE with no merges (one token per byte, any text encodes) plus ChatML special tokens.

    eos is the end-of-turn token `<|im_end|>`, as in SmolLM2; `pad_is_eos=True` reproduces SmolLM2's
    pad == eos, the case where masking by pad id would wrongly hide the end-of-turn label.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, init_std: float = 0.02):
    """A randomly initialised 2-layer LlamaForCausalLM (hidden 32), eval mode, fp32, deterministic per seed.

    With the default init every prompt yields the same greedy output; `init_std=0.3` makes outputs depend
    on the prompt, which padding-correctness tests need.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=None,
        eos_token_id=None,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config).eval()


# A small fictional-fact memorisation set used by training/inference tests.
FACTS = [
    ("What colour is the Zorbl gem?", "Teal."),
    ("Who founded Quillfeather?", "Ada Voss."),
    ("Where is Mount Kelt?", "In Norvia."),
    ("How fast is the Q7 drone?", "90 km/h."),
    ("What does Brimlow sell?", "Lamps."),
    ("When did Orrin sail?", "In 1802."),
    ("Which river feeds Lake Ume?", "The Sel."),
    ("Who painted Grey Dawn?", "Ilse Marr."),
]


def save_tiny_base(path) -> None:
    """The tiny tokenizer and a seed-0 tiny Llama saved at ``path`` like any local causal-LM directory."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
