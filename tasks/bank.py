"""The adapter bank: registering external LoRAs, and choosing which bank LoRAs a new version's
experts start from (seed 002's selection, with our version history as the bank).

Selection, in order:
1. every bank entry (experts of promoted versions, registered peft LoRAs) for the current base model
   is loaded as a LoRA and scored on K examples of the delta's ``dev`` split (never ``eval``: that
   split stays the held-out test) by exact match of its greedy answer and by reasoning perplexity,
   exp(mean NLL over the answer tokens only);
2. candidates are ranked (exact match first, then perplexity) and the top ``bank_pool`` kept;
3. among them, the group of N = ``bank_experts`` with the lowest summed |cosine| between their
   flattened weight deltas is chosen (exact search when small, greedy otherwise);
4. experts 0..N-1 of the new version start from that group, the others fresh.

The scores and the choice, with a sentence explaining it, are written to
``$MORAL_HOME/bank/vN-selection.json`` and to the registry as a ``bank.selected`` event.

One file (~460 lines): scoring, choosing and initialising from the bank are one decision, recorded
with its reasons in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.bank import BankEntry
from storage.files import write_json_atomic
from storage.home import selection_path
from storage.records import sha256_file
from storage.registry import Registry
from storage.settings import Settings

if TYPE_CHECKING:
    from moe.bank import LoRA

WEIGHTS_NAME = "adapter_model.safetensors"


class BankError(ValueError):
    """An adapter cannot join the bank (wrong base model, targets, shapes, rank or format)."""


# --------------------------------------------------------------------------------------------------
# registering external adapters


def base_weight_shapes(base_path: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of the base model's safetensors files, read from their headers only."""
    from safetensors import safe_open

    files = sorted(Path(base_path).glob("*.safetensors"))
    if not files:
        raise BankError(f"the base model in {base_path} has no safetensors weights to check shapes against")
    shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = list(fh.get_slice(key).get_shape())
    return shapes


def base_targets(base_path: Path) -> list[str]:
    """The FFN module suffixes MoRAL adapts on this base model (from its ``config.json``)."""
    from moe.config import DEFAULT_TARGETS

    try:
        model_type = json.loads((Path(base_path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise BankError(f"cannot read the base model's config.json in {base_path}: {exc}") from exc
    if model_type not in DEFAULT_TARGETS:
        raise BankError(f"no MoRAL targets known for base architecture {model_type!r}")
    return DEFAULT_TARGETS[model_type]


def _same_base(recorded: str | None, base_path: Path, base_sha256: str) -> bool:
    """Whether an adapter's recorded ``base_model_name_or_path`` names the current base model."""
    if not recorded:
        return True  # nothing recorded: the shape check below is the only evidence
    if recorded == str(base_path) or Path(recorded).name == base_path.name:
        return True
    candidate = Path(recorded).expanduser()
    if candidate.is_dir():
        from moe.base_model import model_identity

        try:
            return model_identity(candidate)["sha256"] == base_sha256
        except (OSError, ValueError):
            return False
    return False


def validate_external(path: Path, base_path: Path, base_sha256: str, expert_rank: int) -> dict[str, Any]:
    """Check a peft LoRA directory against the current base model; returns what was checked.

    Refused, with the reason: not a peft LoRA (or DoRA); trained for another base model (recorded
    name/path differs); a module the base model lacks or whose shapes differ; no module among the
    FFN linears MoRAL adapts; a rank above the expert rank (the expert could not hold it exactly).
    """
    from moe.model import read_peft_lora

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise BankError(f"{path} is not a directory")
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
        lora = read_peft_lora(path)
    except (OSError, ValueError) as exc:
        raise BankError(f"{path}: {exc}") from exc
    recorded = cfg.get("base_model_name_or_path")
    if not _same_base(recorded, base_path, base_sha256):
        raise BankError(
            f"{path} was trained for base model {recorded!r}, but the current base model is "
            f"{base_path.name} ({base_path}); bank entries must share the base model"
        )
    shapes = base_weight_shapes(base_path)
    targets = base_targets(base_path)
    used, ignored, ranks = [], [], set()
    for module, (a, b, _scale) in sorted(lora.items()):
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            raise BankError(f"{path}: the base model has no module {module} (another architecture?)")
        d_out, d_in = weight[0], weight[1]
        if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise BankError(
                f"{path}: shapes at {module} (A {list(a.shape)}, B {list(b.shape)}) do not fit the base "
                f"weight [{d_out}, {d_in}]"
            )
        suffix = next((t for t in targets if module.endswith("." + t)), None)
        if suffix is None:
            ignored.append(module)
            continue
        used.append(suffix)
        ranks.add(int(a.shape[0]))
    if not used:
        raise BankError(
            f"{path}: adapts none of the modules MoRAL experts live on ({', '.join(targets)}); "
            f"it adapts {', '.join(sorted(lora))[:200]}"
        )
    rank = max(ranks)
    if rank > expert_rank:
        raise BankError(
            f"{path}: LoRA rank {rank} exceeds the MoRAL expert rank {expert_rank} (MORAL_RANK); "
            "an expert could not reproduce it exactly"
        )
    return {
        "path": str(path),
        "targets": sorted(set(used)),
        "rank": rank,
        "ignored_modules": len(ignored),
        "weights_sha256": sha256_file(path / WEIGHTS_NAME),
        "base_model": recorded,
    }


def add_external(
    reg: Registry, settings: Settings, path: Path, name: str | None = None, actor: str | None = "cli"
) -> BankEntry:
    """Validate and register a peft LoRA adapter directory in the bank."""
    from moe.base_model import base_model_identity

    base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
    facts = validate_external(Path(path), base_path, identity["sha256"], settings.rank)
    return reg.add_bank_entry(
        name=name or Path(facts["path"]).name,
        path=facts["path"],
        base_model_sha256=identity["sha256"],
        targets=facts["targets"],
        rank=facts["rank"],
        weights_sha256=facts["weights_sha256"],
        actor=actor,
    )


# --------------------------------------------------------------------------------------------------
# loading entries as LoRAs


def _verify_version_files(entry: BankEntry, verified: set[tuple[str, str | None]]) -> None:
    """A version entry's files against the version's recorded checksum (the check every loader of a
    version runs: ``storage.artifacts.verify_uri``); ``verified`` holds the directories already
    checked by this caller, so a version's experts cost one check, not one each."""
    from storage.artifacts import ArtifactError, verify_uri

    if (entry.path, entry.artifact_sha256) in verified:
        return
    try:
        verify_uri(entry.path, entry.artifact_sha256, label=f"bank entry {entry.name}")
    except ArtifactError as exc:
        raise BankError(str(exc)) from exc
    verified.add((entry.path, entry.artifact_sha256))


def load_entry(entry: BankEntry, verified: set[tuple[str, str | None]] | None = None) -> LoRA:
    """The entry's LoRA tensors: an expert sliced out of a MoRAL version, or a peft adapter as saved.
    Both are checksum-verified first (the version's recorded artifact checksum, the external
    adapter's weights as registered): unverified weights never seed a new adapter.  ``verified``
    (the caller's, across entries) spares re-checking a version's files for each of its experts."""
    from safetensors.torch import load_file

    from moe.bank import version_expert_loras
    from moe.config import MoRALConfig
    from moe.model import read_peft_lora

    directory = Path(entry.path)
    if entry.source == "external":
        if not entry.weights_sha256:
            raise BankError(f"bank entry {entry.name}: no weights checksum recorded; register it again")
        if sha256_file(directory / WEIGHTS_NAME) != entry.weights_sha256:
            raise BankError(f"{directory}: the adapter's weights changed since it was registered")
        return read_peft_lora(directory)
    _verify_version_files(entry, set() if verified is None else verified)
    cfg = MoRALConfig.load(directory)
    experts = version_expert_loras(
        load_file(str(directory / WEIGHTS_NAME)), cfg.num_experts, cfg.rank, cfg.scaling
    )
    assert entry.expert is not None
    return experts[entry.expert]


# --------------------------------------------------------------------------------------------------
# selection


@dataclass
class CandidateScore:
    name: str
    source: str
    exact_match: float
    answer_nll: float
    perplexity: float
    rank: int = 0  # 1 = best


@dataclass
class BankSelection:
    """What the selection saw and chose; ``loras`` (the chosen tensors) are not serialised."""

    k: int
    dev_ids: list[str]
    base_exact_match: float
    base_perplexity: float
    candidates: list[CandidateScore]
    skipped: list[dict[str, str]]
    pool: list[str]
    pool_abs_cosine: list[list[float]]
    chosen: list[str]
    group_abs_cosine_sum: float
    search: str
    slots: dict[int, str]  # expert index -> bank entry name
    num_experts: int
    explanation: str = ""
    loras: list[Any] = field(default_factory=list, repr=False)

    def key(self) -> list[str]:
        """What identifies this initialisation in the artifact key (names; weights are immutable)."""
        return [self.slots[i] for i in sorted(self.slots)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("loras")
        d["slots"] = {str(k): v for k, v in self.slots.items()}
        return d


def dev_examples(reg: Registry, delta: list, k: int, seed: int) -> list:
    """Up to ``k`` active ``dev`` pairs of the delta's documents (never ``eval``), in a seeded order.

    A small delta often has no ``dev`` pair at all (a quarter of the facts with three or more
    wordings give one, ``tasks.splits.choose_dev``): its own
    ``train`` pairs then stand in. They passed generation's validation and are trained on anyway;
    the held-out ``eval`` pairs, which measure the result, are never used.
    """
    import random

    docs = {p.doc_id for p in delta}
    dev = sorted((p for p in reg.qa_pairs(split="dev") if p.doc_id in docs), key=lambda p: p.qa_id)
    if not dev:
        dev = sorted(delta, key=lambda p: p.qa_id)
    random.Random(seed).shuffle(dev)
    return dev[:k]


def _score(
    model, tokenizer, questions: list[str], answers: list[str], max_new_tokens: int
) -> tuple[float, float]:
    """(exact match, mean answer NLL) of the model's greedy answers on the examples."""
    from moe.infer import answer_nll, generate_answers
    from tasks.metrics import exact_match

    preds = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens)
    em = sum(exact_match(p, g) for p, g in zip(preds, answers, strict=True)) / len(answers)
    nll = answer_nll(model, tokenizer, questions, answers)
    return em, sum(nll) / len(nll)


def select_from_bank(
    settings: Settings,
    entries: list[BankEntry],
    examples: list,
    base_path: Path,
    num_experts: int,
) -> tuple[BankSelection | None, str]:
    """Score ``entries`` on ``examples`` and choose the most diverse top group; (None, why) when not possible."""
    if not entries:
        return None, "the bank is empty"
    if not examples:
        return None, "the delta has no dev pairs to score bank candidates on"
    from moe.bank import abs_cosine_matrix, load_expert, most_diverse_group
    from moe.base_model import load_base_model
    from moe.config import MoRALConfig
    from moe.model import MoRALModel

    loras, usable, skipped = [], [], []
    verified: set[tuple[str, str | None]] = set()
    for entry in entries:
        try:
            lora = load_entry(entry, verified)
        except (OSError, ValueError) as exc:  # a moved or changed adapter is skipped, with the reason
            skipped.append({"name": entry.name, "reason": str(exc)})
            continue
        loras.append(lora)
        usable.append(entry)
    if not usable:
        return None, "no bank entry could be loaded: " + "; ".join(
            f"{s['name']}: {s['reason']}" for s in skipped
        )

    base, tokenizer = load_base_model(base_path)
    max_rank = max(a.shape[0] for lora in loras for a, _, _ in lora.values())
    # A one-expert probe: top-1 of one expert has gate 1, so the probe computes base + the LoRA exactly.
    probe = MoRALModel(
        base,
        MoRALConfig(
            num_experts=1, top_k=1, rank=max_rank, alpha=float(max_rank), dropout=0.0, expert_groups=1
        ),
    ).eval()
    questions, answers = [p.question for p in examples], [p.answer for p in examples]
    with probe.disable_adapter():
        base_em, base_nll = _score(probe, tokenizer, questions, answers, settings.eval_max_new_tokens)
    scores, kept_loras, kept_entries = [], [], []
    for entry, lora in zip(usable, loras, strict=True):
        try:
            covered = load_expert(probe, 0, lora)
        except ValueError as exc:
            skipped.append({"name": entry.name, "reason": str(exc)})
            continue
        if not covered:
            skipped.append({"name": entry.name, "reason": "adapts none of the MoRAL target modules"})
            continue
        em, nll = _score(probe, tokenizer, questions, answers, settings.eval_max_new_tokens)
        scores.append(CandidateScore(entry.name, entry.source, em, nll, math.exp(min(nll, 50.0))))
        kept_loras.append(lora)
        kept_entries.append(entry)
    if not scores:
        return None, "no bank entry fits the current model: " + "; ".join(s["reason"] for s in skipped)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].exact_match, scores[i].answer_nll, i))
    for position, i in enumerate(order, start=1):
        scores[i].rank = position
    pool = order[: settings.bank_pool]
    n = min(settings.bank_experts, num_experts, len(pool))
    cos = abs_cosine_matrix([kept_loras[i] for i in pool])
    group, cost, search = most_diverse_group(cos, n)
    chosen = [pool[g] for g in group]
    chosen.sort(key=lambda i: scores[i].rank)  # best-scoring candidate in expert 0
    slots = {e: scores[i].name for e, i in enumerate(chosen)}
    selection = BankSelection(
        k=len(examples),
        dev_ids=[p.qa_id for p in examples],
        base_exact_match=base_em,
        base_perplexity=math.exp(min(base_nll, 50.0)),
        candidates=sorted(scores, key=lambda s: s.rank),
        skipped=skipped,
        pool=[scores[i].name for i in pool],
        pool_abs_cosine=[[round(float(v), 6) for v in row] for row in cos.tolist()],
        chosen=[scores[i].name for i in chosen],
        group_abs_cosine_sum=round(cost, 6),
        search=search,
        slots=slots,
        num_experts=num_experts,
        loras=[kept_loras[i] for i in chosen],
    )
    selection.explanation = explain(selection)
    return selection, "ok"


def explain(sel: BankSelection) -> str:
    """A human-readable account of the choice."""
    best = sel.candidates[0]
    chosen = ", ".join(
        f"{name} (rank {next(c.rank for c in sel.candidates if c.name == name)})" for name in sel.chosen
    )
    fresh = sel.num_experts - len(sel.chosen)
    return (
        f"Scored {len(sel.candidates)} bank LoRAs on {sel.k} dev examples of this delta (the eval split "
        f"stays held out): the base model answers {sel.base_exact_match:.0%} exactly with answer perplexity "
        f"{sel.base_perplexity:.2f}; the best candidate, {best.name}, {best.exact_match:.0%} with perplexity "
        f"{best.perplexity:.2f}. Candidates were ranked by exact match, then perplexity; among the top "
        f"{len(sel.pool)} the group of {len(sel.chosen)} with the lowest summed |cosine| between flattened "
        f"weight deltas ({sel.group_abs_cosine_sum:.4f}, {sel.search} search) was chosen: {chosen}. "
        f"Experts 0-{len(sel.chosen) - 1} start from it"
        + (f"; experts {len(sel.chosen)}-{sel.num_experts - 1} start fresh." if fresh else ".")
        + (f" Skipped {len(sel.skipped)} entries that could not be used." if sel.skipped else "")
    )


def record_selection(
    settings: Settings,
    reg: Registry,
    version: int,
    selection: BankSelection | None,
    reason: str,
    run_id: str | None,
) -> Path:
    """Write the selection artifact beside the version (atomically) and a ``bank.selected`` event."""
    path = selection_path(settings, version)
    body = {"version": version, "used": selection is not None, "reason": reason}
    if selection is not None:
        body |= selection.to_dict()
    else:
        body["explanation"] = f"No bank initialisation: {reason}."
    write_json_atomic(path, body, indent=2)
    detail = {"path": str(path), "used": selection is not None, "reason": reason}
    if selection is not None:
        detail |= {
            "chosen": selection.chosen,
            "slots": {str(k): v for k, v in selection.slots.items()},
            "scores": {
                c.name: {"exact_match": c.exact_match, "perplexity": c.perplexity}
                for c in selection.candidates
            },
            "group_abs_cosine_sum": selection.group_abs_cosine_sum,
        }
    reg.log_event("bank.selected", version=version, run_id=run_id, actor="refresh", detail=detail)
    return path


def bank_for_delta(
    settings: Settings, reg: Registry, delta: list, base_path: Path, base_sha256: str, warm: bool, kind: str
) -> tuple[BankSelection | None, str]:
    """The train stage's bank step: a selection for a fresh MoRAL adapter, or (None, why not).

    How it combines with the warm start: when a warm start from the champion happens, it wins and
    the bank is not consulted (the champion's experts are the bank's newest entries, and a warm start
    also keeps its routers); otherwise, with ``bank_init`` on and a non-empty bank, experts
    0..N-1 start from the selected group and the rest fresh.
    """
    if kind != "moral":
        return None, "plain LoRA versions have no experts to initialise"
    if not settings.bank_init:
        return None, "bank initialisation is off (MORAL_BANK_INIT=false)"
    if warm:
        return None, "warm start from the champion takes precedence over bank initialisation"
    entries = reg.bank_entries(base_model_sha256=base_sha256)
    examples = dev_examples(reg, delta, settings.bank_k, settings.seed)
    return select_from_bank(settings, entries, examples, base_path, settings.num_experts)
