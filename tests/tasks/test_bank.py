"""Bank selection: exact LoRA experts, |cosine| of weight deltas, the most diverse group, scoring on the
delta's dev split, the recorded artifact, the train stage's bank path, and LoRAMoE group ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe.bank import abs_cosine_matrix, load_expert, lora_inner, most_diverse_group, version_expert_loras
from moe.base_model import load_base_model, model_identity
from moe.config import MoRALConfig
from moe.model import MoRALModel, read_peft_lora
from storage.home import selection_path
from storage.records import Chunk, QAPair
from storage.registry import Registry
from tasks.bank import dev_examples, load_entry, record_selection, select_from_bank
from tasks.train import TrainPair, train_candidate
from tests.cli.test_cli_bank import save_peft_lora


def rand_lora(seed: int, modules=("m.a", "m.b"), r: int = 2, d_in: int = 6, d_out: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5) for m in modules}


def test_inner_product_and_cosine_are_those_of_the_full_deltas():
    x, y = rand_lora(0), rand_lora(1)
    dense = {m: s * b @ a for m, (a, b, s) in x.items()}  # [d_out, d_in] per module
    dense_y = {m: s * b @ a for m, (a, b, s) in y.items()}
    expect = sum(float((dense[m] * dense_y[m]).sum()) for m in dense)
    assert lora_inner(x, y) == pytest.approx(expect, rel=1e-5)
    # A different factorisation of the same adapter (A mixed, B unmixed) is the same LoRA: |cos| = 1.
    mix = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    x_mixed = {m: (mix @ a, b @ torch.linalg.inv(mix), s) for m, (a, b, s) in x.items()}
    negated = {m: (a, -b, s) for m, (a, b, s) in x.items()}
    cos = abs_cosine_matrix([x, y, x_mixed, negated])
    assert cos[0, 2] == pytest.approx(1.0, abs=1e-5) and cos[0, 3] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= float(cos[0, 1]) < 0.5 and torch.allclose(cos, cos.T)


def test_most_diverse_group_exact_and_greedy():
    # 0 and 1 are near-copies; 2 and 3 are each unlike everything.
    cos = torch.tensor(
        [[1.0, 0.95, 0.1, 0.2], [0.95, 1.0, 0.1, 0.2], [0.1, 0.1, 1.0, 0.05], [0.2, 0.2, 0.05, 1.0]]
    )
    group, cost, search = most_diverse_group(cos, 3)
    assert search == "exact" and group == [0, 2, 3] and cost == pytest.approx(0.1 + 0.2 + 0.05)
    group, _, search = most_diverse_group(cos, 3, max_exact=0)
    assert search == "greedy" and group == [0, 2, 3]
    assert most_diverse_group(cos, 9)[0] == [0, 1, 2, 3]  # capped at what there is


def test_a_loaded_expert_reproduces_the_peft_lora_exactly(tiny_model_dir, tmp_path):
    from peft import PeftModel

    lora_dir = save_peft_lora(tiny_model_dir, tmp_path / "lora", rank=2)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base, _ = load_base_model(tiny_model_dir)
    expected = PeftModel.from_pretrained(base, lora_dir).eval()(input_ids=ids).logits
    base2, _ = load_base_model(tiny_model_dir)
    probe = MoRALModel(
        base2, MoRALConfig(num_experts=1, top_k=1, rank=4, alpha=4.0, dropout=0.0, expert_groups=1)
    ).eval()
    covered = load_expert(probe, 0, read_peft_lora(lora_dir))
    assert len(covered) == 6  # 2 layers x gate/up/down
    torch.testing.assert_close(probe(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    # Slicing a saved MoRAL version gives the same LoRA back.
    tensors = {k: v.detach() for k, v in probe.adapter_state_dict().items()}
    back = version_expert_loras(tensors, 1, 4, 1.0)[0]
    assert abs_cosine_matrix([back, read_peft_lora(lora_dir)])[0, 1] == pytest.approx(1.0, abs=1e-5)


def _seed_registry(reg: Registry, dev_and_eval: bool = True) -> tuple[list[QAPair], list[QAPair]]:
    reg.upsert_document("doc-new", "/src/new.md", kind="md", size=1, run_id="r0")
    reg.add_chunks([Chunk("chunk-new", "doc-new", 0, "text")], run_id="r0")
    train = [QAPair.new("chunk-new", "doc-new", f"What is item {i} of the Zorbl list?", f"Item {i}.", "train") for i in range(4)]  # fmt: skip
    held = []
    if dev_and_eval:
        held = [QAPair.new("chunk-new", "doc-new", f"Which code does unit {i} use?", f"K{i}.", "dev") for i in range(3)]  # fmt: skip
        held += [QAPair.new("chunk-new", "doc-new", f"Which gate does unit {i} use?", f"G{i}.", "eval") for i in range(3)]  # fmt: skip
    reg.add_qa_pairs(train + held, run_id="r0")
    return train, held


def test_dev_examples_never_use_the_eval_split(settings):
    reg = Registry.from_settings(settings)
    train, held = _seed_registry(reg)
    chosen = dev_examples(reg, train, k=10, seed=0)
    assert {p.split for p in chosen} == {"dev"} and len(chosen) == 3
    assert dev_examples(reg, train, k=2, seed=0) == dev_examples(reg, train, k=2, seed=0)


def test_a_delta_without_dev_pairs_is_scored_on_its_train_pairs_never_eval(settings):
    reg = Registry.from_settings(settings)
    train, _ = _seed_registry(reg, dev_and_eval=False)
    reg.add_qa_pairs([QAPair.new("chunk-new", "doc-new", "Which gate does unit 9 use?", "G9.", "eval")])
    chosen = dev_examples(reg, train, k=3, seed=0)
    assert len(chosen) == 3 and {p.split for p in chosen} == {"train"}
    assert {p.qa_id for p in chosen} <= {p.qa_id for p in train}


@pytest.fixture
def tiny(settings, tiny_model_dir: Path):
    return settings.model_copy(
        update={
            "base_model": str(tiny_model_dir),
            "epochs": 1,
            "num_experts": 4,
            "rank": 2,
            "bank_experts": 2,
            "bank_k": 3,
            "eval_max_new_tokens": 4,
        }
    )


def _bank_of_five(tiny, tiny_model_dir, tmp_path):
    """A registry with a promoted 4-expert version and one registered LoRA: a bank of 5.
    Returns (registry, train pairs, base sha, the version's TrainOutcome)."""
    from tasks.bank import add_external

    reg = Registry.from_settings(tiny)
    train, _ = _seed_registry(reg)
    sha = model_identity(tiny_model_dir)["sha256"]
    out = train_candidate(
        tiny, tiny_model_dir, sha, [TrainPair(p.qa_id, p.question, p.answer) for p in train]
    )
    v1 = reg.create_version(run_id="r0", base_model_sha256=sha, artifact_uri=str(out.artifact_dir),
                            artifact_sha256=out.sha256, params=out.params)  # fmt: skip
    reg.decide_version(v1, "promoted", ["test"], actor="test")
    add_external(reg, tiny, save_peft_lora(tiny_model_dir, tmp_path / "ext", rank=2), name="ext")
    return reg, train, sha, out


def test_selection_scores_chooses_and_records(tiny, tiny_model_dir, tmp_path):
    reg, train, sha, out = _bank_of_five(tiny, tiny_model_dir, tmp_path)
    entries = reg.bank_entries(base_model_sha256=sha)
    assert [e.name for e in entries] == ["v1/e0", "v1/e1", "v1/e2", "v1/e3", "ext"]
    assert entries[0].targets == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert load_entry(entries[1])["model.layers.0.mlp.up_proj"][0].shape == (2, 32)

    examples = dev_examples(reg, train, tiny.bank_k, tiny.seed)
    selection, why = select_from_bank(tiny, entries, examples, tiny_model_dir, num_experts=4)
    assert selection is not None and why == "ok"
    assert len(selection.candidates) == 5 and [c.rank for c in selection.candidates] == [1, 2, 3, 4, 5]
    assert all(c.perplexity > 1.0 and 0.0 <= c.exact_match <= 1.0 for c in selection.candidates)
    assert len(selection.chosen) == 2 and set(selection.chosen) <= set(selection.pool)
    cos = torch.tensor(selection.pool_abs_cosine)
    names = selection.pool
    pick = tuple(names.index(n) for n in selection.chosen)
    best = min(
        float(cos[i, j]) for i in range(len(names)) for j in range(i + 1, len(names))
    )  # the chosen pair is the least similar pair of the pool
    assert (
        float(cos[pick[0], pick[1]]) == pytest.approx(best) == pytest.approx(selection.group_abs_cosine_sum)
    )
    assert selection.dev_ids == [p.qa_id for p in examples]

    path = record_selection(tiny, reg, 7, selection, why, "r1")
    assert path == selection_path(tiny, 7) and path.is_file()
    body = json.loads(path.read_text())
    assert (
        body["used"]
        and body["chosen"] == selection.chosen
        and "lowest summed |cosine|" in body["explanation"]
    )
    assert all(name in body["explanation"] for name in selection.chosen)
    event = reg.events(kind="bank.selected")[-1]
    assert event.version == 7 and event.detail["chosen"] == selection.chosen

    # Nothing to score on (no dev pairs) or nothing in the bank: a reason, no selection.
    assert select_from_bank(tiny, entries, [], tiny_model_dir, 4) == (
        None,
        "the delta has no dev pairs to score bank candidates on",
    )
    assert select_from_bank(tiny, [], examples, tiny_model_dir, 4)[0] is None


def test_a_promoted_versions_experts_are_verified_before_they_seed(tiny, tiny_model_dir, tmp_path):
    """Bank entries from promoted versions are checked against the version's recorded checksum, as
    external ones are against theirs: changed weights or a missing checksum skip the entry, with
    the reason, and the selection goes on with what verifies."""
    from tasks.bank import BankError

    reg, train, sha, out = _bank_of_five(tiny, tiny_model_dir, tmp_path)
    entries = reg.bank_entries(base_model_sha256=sha)
    assert entries[0].artifact_sha256 == out.sha256
    load_entry(entries[0])  # verifies

    weights = out.artifact_dir / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one byte of one tensor
    weights.write_bytes(bytes(blob))
    with pytest.raises(BankError, match="bank entry v1/e0"):
        load_entry(entries[0])
    examples = dev_examples(reg, train, tiny.bank_k, tiny.seed)
    selection, why = select_from_bank(tiny, entries, examples, tiny_model_dir, num_experts=4)
    assert selection is not None and why == "ok"
    assert [c.name for c in selection.candidates] == ["ext"]
    assert [s["name"] for s in selection.skipped] == ["v1/e0", "v1/e1", "v1/e2", "v1/e3"]
    assert all("bank entry" in s["reason"] for s in selection.skipped)
    # A version entry without a recorded checksum is never trusted either.
    from dataclasses import replace

    with pytest.raises(BankError, match="no checksum recorded"):
        load_entry(replace(entries[0], artifact_sha256=None))
    with pytest.raises(BankError, match="no weights checksum"):  # nor an external one
        load_entry(replace(entries[-1], weights_sha256=None))


def test_train_stage_initialises_from_the_bank(tiny, tiny_model_dir):
    from tasks.stages.train import train_stage

    reg = Registry.from_settings(tiny)
    first, _ = _seed_registry(reg)
    sha = model_identity(tiny_model_dir)["sha256"]
    out = train_candidate(
        tiny, tiny_model_dir, sha, [TrainPair(p.qa_id, p.question, p.answer) for p in first]
    )
    v1 = reg.create_version(run_id="r0", base_model_sha256=sha, artifact_uri=str(out.artifact_dir),
                            artifact_sha256=out.sha256, params=out.params,
                            trained_pairs={p.qa_id: "delta" for p in first})  # fmt: skip
    reg.decide_version(v1, "promoted", ["test"], actor="test")
    new = [QAPair.new("chunk-new", "doc-new", "Who keeps the Zorbl archive?", "Mira Holt.", "train")]
    reg.add_qa_pairs(new, run_id="r1")

    summary = train_stage(tiny.model_copy(update={"replay_budget": 0}), "r1")
    assert summary.version == 2 and summary.bank["used"] is True and len(summary.bank["chosen"]) == 2
    assert reg.get_version(2).params["bank_init"] == summary.bank["chosen"]
    body = json.loads(selection_path(tiny, 2).read_text())
    assert body["version"] == 2 and body["slots"] == {
        "0": summary.bank["chosen"][0],
        "1": summary.bank["chosen"][1],
    }

    # A warm start from the champion takes precedence: the bank is not consulted, and that is recorded.
    reg.decide_version(2, "rejected", ["test"], actor="test")
    reg.add_qa_pairs([QAPair.new("chunk-new", "doc-new", "Who audits the Zorbl archive?", "Ode Lin.", "train")], run_id="r2")  # fmt: skip
    warm = train_stage(tiny.model_copy(update={"replay_budget": 0, "warm_start": True}), "r2")
    assert warm.bank["used"] is False and "warm start" in warm.bank["reason"]
    assert json.loads(selection_path(tiny, 3).read_text())["used"] is False


def test_loramoe_group_ids_reach_the_localized_loss(tiny, tiny_model_dir):
    from moe.train import Example, TrainConfig, train

    base, tok = load_base_model(tiny_model_dir)
    model = MoRALModel(
        base, MoRALConfig(num_experts=4, top_k=2, rank=2, balance_loss="localized", expert_groups=2)
    )
    seen: list[list[int] | None] = []

    def record(_module, _args, _kwargs):  # the groups the routers see, per forward
        group = model._context.sample_group
        seen.append(None if group is None else group.tolist())

    model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    examples = [Example("Q one?", "A.", sample_group=0), Example("Q two?", "B.", sample_group=1)]
    train(model, tok, examples, TrainConfig(epochs=1, batch_size=2, seed=0))
    assert seen and sorted(seen[0]) == [0, 1]

    # The loss depends on the group ids: the same batch typed differently gives another loss.
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    model.train()
    model(input_ids=ids, sample_group=torch.tensor([0, 1]))
    mixed = float(model.aux_loss().detach())
    model(input_ids=ids, sample_group=torch.tensor([1, 1]))
    assert float(model.aux_loss().detach()) != pytest.approx(mixed)

    # The setting turns the mode on in the trained candidate's config and its recorded params.
    sha = model_identity(tiny_model_dir)["sha256"]
    pairs = [TrainPair("a", "Q one?", "A.", 0), TrainPair("b", "Q two?", "B.", 1)]
    out = train_candidate(tiny.model_copy(update={"loramoe": True}), tiny_model_dir, sha, pairs)
    saved = MoRALConfig.load(out.artifact_dir)
    assert saved.balance_loss == "localized" and saved.expert_groups == 2 and out.params["loramoe"] is True
    assert out.metrics["aux_losses"] and any(x > 0 for x in out.metrics["aux_losses"])
