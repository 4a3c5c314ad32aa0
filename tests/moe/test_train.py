"""The training loop: label masking, determinism, accumulation, schedules, the model protocol and LoRA."""

from __future__ import annotations

import pytest
import torch

from moe.infer import answer_nll, generate_answers
from moe.lora import ffn_target_modules, load_lora, make_lora_model, save_lora
from moe.train import Example, TrainConfig, evaluate_loss, format_example, train
from tests.moe.tiny import FACTS, tiny_llama, tiny_tokenizer

EXAMPLES = [Example(q, a) for q, a in FACTS]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _cfg(**kw) -> TrainConfig:
    base = dict(
        epochs=2, learning_rate=1e-2, batch_size=4, warmup_ratio=0.1, log_every=1, seed=0, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.0)
    assert TrainConfig().max_grad_norm == 1.0


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_cover_answer_and_end_of_turn_only(pad_is_eos):
    tok = tiny_tokenizer(pad_is_eos=pad_is_eos)
    enc = format_example(tok, Example("What colour is the Zorbl gem?", "Teal.", system="Be brief."), 512)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    targets = [t for t in labels if t != -100]
    assert tok.decode(targets) == "Teal.<|im_end|>"
    first = labels.index(targets[0])
    assert all(t == -100 for t in labels[:first])  # the whole prompt is masked
    assert tok.decode(ids[:first]).endswith(
        "Be brief.<|im_end|>\n<|im_start|>user\nWhat colour is the Zorbl gem?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert labels[first:] == ids[first:]  # nothing after the end-of-turn token


def test_truncation_keeps_the_answer(tok):
    long_q = "word " * 200
    enc = format_example(tok, Example(long_q, "Teal."), max_length=64)
    assert len(enc["input_ids"]) == 64
    assert tok.decode([t for t in enc["labels"] if t != -100]) == "Teal.<|im_end|>"
    assert tok.decode(enc["input_ids"]).endswith("<|im_start|>assistant\nTeal.<|im_end|>")


def test_memorisation_loss_falls_and_answers_are_learned(tok):
    model = tiny_llama(len(tok), seed=0)
    qs, ans = [e.question for e in EXAMPLES], [e.answer for e in EXAMPLES]
    nll_before = answer_nll(model, tok, qs, ans)
    seen = []
    result = train(
        model,
        tok,
        EXAMPLES,
        _cfg(epochs=60, batch_size=8, learning_rate=2e-2),
        callback=seen.append,
        dev_examples=EXAMPLES,
    )
    assert result.steps == 60 and len(result.losses) == 60 and len(seen) == 60
    assert sum(result.losses[-5:]) / 5 < 0.25 * sum(result.losses[:5]) / 5
    nll_after = answer_nll(model, tok, qs, ans)
    assert sum(nll_after) < 0.25 * sum(nll_before)
    assert result.dev_loss == pytest.approx(evaluate_loss(model, tok, EXAMPLES), rel=1e-5)
    assert not model.training
    # Trained on the end-of-turn token, the model stops by itself after the answer.
    out = generate_answers(model, tok, qs, max_new_tokens=20)
    assert sum(o == a for o, a in zip(out, ans, strict=True)) >= 6, out
    assert set(seen[0]) == {"step", "epoch", "loss", "aux_loss", "lr", "seconds"}
    assert result.target_tokens == 60 * sum(len(a) + 1 for a in ans)  # bytes + <|im_end|>, every epoch


def test_same_seed_same_losses_with_lora_dropout(tok):
    runs = []
    for _ in range(2):
        model = make_lora_model(tiny_llama(len(tok), seed=5), rank=4, alpha=8, dropout=0.1)
        runs.append(train(model, tok, EXAMPLES, _cfg(epochs=3, seed=7)).losses)
    assert runs[0] == runs[1]
    model = make_lora_model(tiny_llama(len(tok), seed=5), rank=4, alpha=8, dropout=0.1)
    assert train(model, tok, EXAMPLES, _cfg(epochs=3, seed=8)).losses != runs[0]


def test_grad_accumulation_matches_large_batch(tok):
    results = []
    for batch_size, accum in [(8, 1), (4, 2), (3, 3)]:
        model = tiny_llama(len(tok), seed=2)
        results.append(train(model, tok, EXAMPLES, _cfg(epochs=4, batch_size=batch_size, grad_accum=accum)))
    (big, small, odd) = results
    assert big.steps == small.steps == odd.steps == 4
    # Normalised by the step's total target tokens, accumulation reproduces the large batch.
    assert small.losses == pytest.approx(big.losses, rel=1e-4)
    assert odd.losses == pytest.approx(big.losses, rel=1e-4)


def test_schedule_warmup_then_decay(tok):
    model = tiny_llama(len(tok))
    lrs = train(model, tok, EXAMPLES, _cfg(epochs=10, batch_size=4, warmup_ratio=0.2, learning_rate=1e-3)).lrs
    assert len(lrs) == 20
    peak = lrs.index(max(lrs))
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1]) and lrs[peak] == pytest.approx(1e-3, rel=0.25)
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True) and lrs[-1] < 1e-4
    cos = train(tiny_llama(len(tok)), tok, EXAMPLES, _cfg(epochs=10, schedule="cosine", warmup_ratio=0.0)).lrs
    assert cos[0] == pytest.approx(1e-2) and cos[-1] < cos[10] < cos[0]


class AuxModel(torch.nn.Module):
    """The MoRALModel protocol in miniature: aux_loss(), expert_stats(), forward(..., sample_group)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.groups_seen: list[list[int]] = []
        self._aux = torch.zeros(())
        self.resets = 0

    def forward(self, input_ids, attention_mask=None, labels=None, sample_group=None, **kw):
        self.groups_seen.append(sample_group.tolist() if sample_group is not None else [])
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)
        self._aux = (self.scale - 3.0) ** 2  # pulls `scale` towards 3 only through the aux loss
        return out

    def aux_loss(self) -> torch.Tensor:
        return self._aux

    def expert_stats(self) -> dict:
        return {"forwards": len(self.groups_seen)}

    def reset_stats(self) -> None:
        self.resets += 1


def test_model_protocol_aux_loss_and_sample_group(tok):
    model = AuxModel(tiny_llama(len(tok)))
    examples = [Example(q, a, sample_group=i % 2) for i, (q, a) in enumerate(FACTS)]
    result = train(model, tok, examples, _cfg(epochs=3, batch_size=4, grad_accum=2, learning_rate=5e-2))
    assert model.resets == 1
    assert sorted(g for gs in model.groups_seen[:2] for g in gs) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert result.aux_losses[0] == pytest.approx(4.0)  # (1 - 3)^2, averaged over the 2 micro-batches
    assert result.aux_losses[-1] < result.aux_losses[0] and model.scale.item() > 1.0
    assert result.expert_stats == {"forwards": 6}
    # All groups zero: no sample_group is passed (a peft model would forward it to the HF model).
    model.groups_seen.clear()
    train(model, tok, EXAMPLES, _cfg(epochs=1))
    assert model.groups_seen == [[], []]


def test_example_weights(tok):
    heavy = [Example(q, a, weight=2.0) for q, a in FACTS]
    normal = train(tiny_llama(len(tok)), tok, EXAMPLES, _cfg(epochs=1, batch_size=8)).losses
    doubled = train(tiny_llama(len(tok)), tok, heavy, _cfg(epochs=1, batch_size=8)).losses
    assert doubled[0] == pytest.approx(2 * normal[0], rel=1e-5)


def test_lora_targets_train_save_load(tok, tmp_path):
    base = tiny_llama(len(tok), seed=9)
    targets = ffn_target_modules(base)
    assert len(targets) == 6 and all(".mlp." in t for t in targets)
    model = make_lora_model(base, rank=4, alpha=8, dropout=0.0)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert {m.removeprefix("base_model.model.") for m in lora_modules} == set(targets)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, tok, EXAMPLES, _cfg(epochs=2))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_lora(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_lora(tiny_llama(len(tok), seed=9), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_lora_targets_follow_the_shared_table():
    from tests.moe.conftest import tiny_gpt2

    gpt2 = tiny_gpt2()
    assert ffn_target_modules(gpt2) == [
        f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")
    ]
    model = make_lora_model(gpt2, rank=2)
    assert not any("attn" in n for n, _ in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------------------- MoRALModel
def _moral(tok, seed: int = 0, **kw):
    from moe.config import MoRALConfig
    from moe.model import MoRALModel

    base = tiny_llama(len(tok), seed=seed)
    torch.manual_seed(seed + 100)  # expert/router init
    return MoRALModel(base, MoRALConfig(num_experts=4, top_k=2, rank=4, alpha=8, **kw))


def test_moral_trains_with_localized_balance_and_groups(tok, tmp_path):
    model = _moral(tok, balance_loss="localized", balance_coef=0.01, expert_groups=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    examples = [Example(q, a, sample_group=i % 2) for i, (q, a) in enumerate(FACTS)]
    qs, ans = [e.question for e in examples], [e.answer for e in examples]
    before = sum(answer_nll(model, tok, qs, ans))
    result = train(model, tok, examples, _cfg(epochs=20, batch_size=8, learning_rate=2e-2))
    # Adapters on a frozen *random* tiny model learn slowly (plain LoRA alike): ask for a clear drop only.
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.3
    assert sum(answer_nll(model, tok, qs, ans)) / len(qs) < before / len(qs) - 0.3
    assert all(a > 0 for a in result.aux_losses)  # the localized constraint saw the sample groups
    assert result.expert_stats and all("load" in s for s in result.expert_stats.values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # The adapter round-trips through save/load.
    from moe.model import MoRALModel

    model.save_pretrained(tmp_path / "moral")
    reloaded = MoRALModel.from_pretrained(tiny_llama(len(tok), seed=0), tmp_path / "moral")
    assert answer_nll(reloaded, tok, qs, ans) == pytest.approx(answer_nll(model, tok, qs, ans), abs=1e-5)


def test_moral_same_seed_same_losses(tok):
    runs = [
        train(_moral(tok, seed=3, router_jitter=0.01), tok, EXAMPLES, _cfg(epochs=2, seed=11)).losses
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# --- example kinds, batching, logits kept, checkpoint choice ------------------------------------
def test_text_example_trains_every_token(tok):
    enc = format_example(tok, Example(text="The Zorbl gem is teal."), 512)
    assert enc["labels"] == enc["input_ids"] and enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][:-1]) == "The Zorbl gem is teal."
    assert "<|im_start|>" not in tok.decode(enc["input_ids"])  # no chat template around a passage


def test_length_batches_see_each_example_once_and_group_similar_lengths():
    from moe.train import length_batches

    lengths = [40] * 50 + [400] * 14
    gen = torch.Generator().manual_seed(0)
    batches = length_batches(lengths, 8, gen)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(64))
    mixed = [b for b in batches if len({lengths[i] for i in b}) > 1]
    assert len(mixed) <= 1  # one batch at most straddles the two lengths
    # the order still changes between epochs
    assert length_batches(lengths, 8, gen) != batches


def test_loss_on_kept_logits_equals_the_full_loss(tok):
    """The LM head runs only where a target is predicted; the loss is the same as on full logits."""
    from moe.train import _collate, _encode_all, _micro_loss

    model = tiny_llama(len(tok))
    examples = [Example("word " * 30 + "What colour is the gem?", "Teal."), Example("Short?", "Yes.")]
    items = _encode_all(tok, examples, 256)
    batch, weights, extra, _ = _collate(items, tok.pad_token_id, torch.device("cpu"), False)
    kept, _ = _micro_loss(model, batch, weights, extra)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    from moe.infer import token_nll

    full = (token_nll(out.logits, batch["labels"]).sum(1) * weights).sum()
    assert torch.allclose(kept, full, rtol=1e-5, atol=1e-5)


def test_select_keeps_the_best_checkpoint(tok):
    """Training runs past the best dev score; the model ends with the best step's weights."""
    model = tiny_llama(len(tok))
    scores = iter([0.2, 0.9, 0.1, 0.3, 0.0, 0.0])
    snapshots = {}

    def select(m) -> float:
        score = next(scores)
        snapshots[score] = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        return score

    result = train(model, tok, EXAMPLES, _cfg(epochs=2, batch_size=2), select=select, select_every=2)
    assert result.checkpoints[1][1] == 0.9 and result.best_step == result.checkpoints[1][0] == 4
    assert result.checkpoints[-1][0] == result.steps  # the last step is always scored
    now = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(now, snapshots[0.9], strict=True))
    # Equal scores (a dev set nothing answers yet): the last step is kept, not the least trained one.
    flat = train(tiny_llama(len(tok)), tok, EXAMPLES, _cfg(epochs=2, batch_size=2), select=lambda m: 0.0,
                 select_every=2)  # fmt: skip
    assert flat.best_step == flat.steps


def test_kept_logits_reach_the_hf_model_through_moral_and_peft(tok):
    from moe import MoRALConfig, MoRALModel
    from moe.train import _keeps_logits

    assert _keeps_logits(tiny_llama(len(tok)))
    assert _keeps_logits(MoRALModel(tiny_llama(len(tok)), MoRALConfig(num_experts=2, top_k=1, rank=2)))
    assert _keeps_logits(make_lora_model(tiny_llama(len(tok)), rank=2))


# --- distillation to the base model (replay that keeps general prompts where they were) -----------
def _nonzero_adapter(model, seed: int = 5, scale: float = 0.05) -> None:
    """Move every trainable tensor off its (output-preserving) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["moral", "lora"])
def test_distill_loss_is_the_kl_from_the_base_model(tok, kind):
    """A distill row's loss is KL(base || model) at its answer positions: 0 where the adapter changes
    nothing, the exact KL once it does, and plain rows are scored in the neutral format."""
    from moe.infer import encode_plain
    from moe.train import _collate, _encode_all, _kl_from_base, _micro_loss

    model = _moral(tok) if kind == "moral" else make_lora_model(tiny_llama(len(tok)), rank=4)
    model.eval()  # no LoRA dropout: the two computations below see the same function
    examples = [Example("What colour is the gem?", "Teal.", distill=True), Example("Short?", "Yes.")]
    plain = Example("Who wrote it?", "Mara Quill.", distill=True, plain=True)
    enc = format_example(tok, plain, 256)
    p_ids, c_ids, _ = encode_plain(tok, plain.question, plain.answer)
    assert enc["input_ids"] == p_ids + c_ids and [t for t in enc["labels"] if t != -100] == c_ids
    items = _encode_all(tok, [*examples, plain], 256)
    batch, weights, extra, distill = _collate(items, tok.pad_token_id, torch.device("cpu"), False)
    assert distill.tolist() == [True, False, True]
    # At initialisation the adapter's output is the base model's: the distill rows contribute 0.
    only = {k: v[[0, 2]] for k, v in batch.items()}
    zero, _ = _micro_loss(model, only, weights[[0, 2]], extra, distill[[0, 2]])
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    _nonzero_adapter(model)
    loss, _ = _micro_loss(model, batch, weights, extra, distill)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from moe.infer import token_nll

    mask = batch["labels"][:, 1:] != -100
    kl = _kl_from_base(base[:, :-1], logits[:, :-1]) * mask
    nll = token_nll(logits, batch["labels"])
    expected = kl[0].sum() + nll[1].sum() + kl[2].sum()
    assert kl[0].sum() > 1e-4 and torch.allclose(loss, expected, rtol=1e-4, atol=1e-6)


def test_distill_training_pulls_a_moved_adapter_back_to_the_base(tok):
    """The distill loss's gradient leads back to the base model's distribution on the prompts it
    sees: an adapter moved off its initialisation, trained on distill rows only, ends with a much
    smaller KL from the base there; trained on the same rows' answer tokens it does not."""
    from moe.train import _collate, _encode_all, _kl_from_base

    general = [(f"Name a colour number {i}.", "Blue.") for i in range(8)]
    items = _encode_all(tok, [Example(q, a) for q, a in general], 256)
    batch, _, _, _ = _collate(items, tok.pad_token_id, torch.device("cpu"), False)
    mask = batch["labels"][:, 1:] != -100

    def kl(model) -> float:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with model.disable_adapter():
                base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float((_kl_from_base(base[:, :-1], logits[:, :-1]) * mask).sum() / mask.sum())

    def run(distill: bool) -> tuple[float, float]:
        model = _moral(tok, seed=1)
        _nonzero_adapter(model, seed=2, scale=0.5)
        before = kl(model)
        examples = [Example(q, a, distill=distill) for q, a in general]
        train(model, tok, examples, _cfg(epochs=20, batch_size=4, learning_rate=2e-2, warmup_ratio=0.0))
        return before, kl(model)

    (before, distilled), (_, answered) = run(True), run(False)
    assert before > 1e-3
    assert distilled < 0.2 * before and answered > distilled * 5


def test_distill_needs_a_model_that_can_disable_its_adapter(tok):
    with pytest.raises(ValueError, match="disable_adapter"):
        train(tiny_llama(len(tok)), tok, [Example("Q?", "A.", distill=True)], _cfg(epochs=1))
