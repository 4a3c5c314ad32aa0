"""The train stage: the delta (new train pairs, plus replayed earlier ones) trained into a candidate
adapter and registered as a new version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from storage.failpoints import failpoint
from storage.files import write_json_atomic
from storage.home import training_log_path
from storage.registry import Registry
from storage.settings import Settings
from tasks.stages.progress import Progress, say


@dataclass
class TrainSummary:
    version: int | None = None
    reason: str | None = None  # why nothing was trained
    resumed: bool = False  # an existing candidate (from a stopped or crashed run) is taken up
    #: Said loudly in the summary: e.g. new pairs that wait because a candidate awaits approval.
    warning: str | None = None
    reused_artifact: bool = False
    delta_pairs: int = 0
    replay_pairs: int = 0
    metrics: dict = field(default_factory=dict)
    replay: dict = field(default_factory=dict)  # how the replay sample was chosen (tasks.replay)
    bank: dict = field(default_factory=dict)  # bank initialisation: used, chosen, why, artifact


def usable_champion(reg: Registry, base_sha256: str) -> tuple[object | None, str | None]:
    """The champion version if its adapter fits the current base model, else (None, why not)."""
    champion = reg.champion()
    if champion is None:
        return None, None
    version = reg.get_version(champion)
    if why := version.other_base(base_sha256):
        return None, f"champion {why}; it is not loaded and the base model is the reference"
    return version, None


def rejected_with_same_inputs(
    reg: Registry, pairs: list, settings: Settings, kind: str, base_sha256: str
) -> str | None:
    """The rejected or revoked version trained on exactly these pairs, parameters and base model, if
    any: training it again would rebuild the same adapter, rejected (or rolled back) again, night
    after night. Checked before any model is loaded: by the pairs' hash (recorded as ``pairs_hash``; a
    version from before it was recorded: its data hash, which then was the pairs' hash)."""
    from tasks.train import data_hash, train_params

    dhash, params = data_hash(pairs), train_params(settings, kind)
    for v in [*reg.list_versions(status="rejected"), *reg.list_versions(status="revoked")]:
        recorded = {k: val for k, val in (v.params or {}).items() if k not in ("bank_init", "pairs_hash")}
        same_pairs = (v.params or {}).get("pairs_hash", v.data_hash) == dhash
        if same_pairs and recorded == params and v.base_model_sha256 == base_sha256:
            return v.name
    return None


def train_stage(
    settings: Settings, run_id: str, progress: Progress | None = None, kind: str = "moral"
) -> TrainSummary:
    """Train a candidate on the train pairs no shipped version has learned (plus replay), and register it."""
    from tasks.bank import bank_for_delta, record_selection
    from tasks.replay import replay_for_delta
    from tasks.train import TrainPair, data_hash, train_candidate

    reg = Registry.from_settings(settings)
    pending = reg.list_versions(status="candidate")
    if pending:
        v = pending[-1]
        say(progress, f"train: taking up candidate {v.name} left by an earlier run (no retraining)")
        warning = None
        if v.decision_reasons and v.decision_reasons[0].startswith("awaiting approval"):
            mine, settled = set(reg.trained_pairs(v.version)), reg.settled_pairs()
            waiting = [p for p in reg.qa_pairs(split="train") if p.qa_id not in mine | settled]
            if waiting:
                warning = (
                    f"{len(waiting)} new train pairs are not trained: {v.name} awaits approval and no "
                    f"version trains until it is decided (`moral promote {v.name} --force --reason ...`, "
                    "or resume its run in the Prefect UI)"
                )
                say(progress, f"train: WARNING {warning}")
        return TrainSummary(version=v.version, resumed=True, warning=warning)

    # The delta: train pairs no promoted version has learned. A rejected or revoked version's pairs
    # come back (with whatever arrived since), so neither loses knowledge for good.
    settled = reg.settled_pairs()
    active_train = reg.qa_pairs(split="train")
    delta = [p for p in active_train if p.qa_id not in settled]
    if not delta:
        return TrainSummary(reason="no new training pairs since the last promoted version: nothing to train")
    # Replay: earlier train pairs nearest the delta, near-duplicates dropped (tasks.replay).
    replay, replay_choice = replay_for_delta(settings, delta, [p for p in active_train if p.qa_id in settled])

    pairs = [TrainPair(p.qa_id, p.question, p.answer, 0) for p in delta]
    pairs += [TrainPair(p.qa_id, p.question, p.answer, 1) for p in replay]

    from moe.base_model import base_model_identity

    base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
    same = rejected_with_same_inputs(reg, pairs, settings, kind, identity["sha256"])
    if same is not None:
        status = reg.get_version(same).status
        return TrainSummary(
            reason=(
                f"{same} was trained on exactly these pairs with these parameters and {status}: nothing "
                f"new to try (add documents, change a parameter, or `moral promote {same} --force`)"
            )
        )
    examples = gather_examples(settings, reg, pairs, delta, base_path, identity["sha256"], progress)
    champion, _why = usable_champion(reg, identity["sha256"])
    warm = settings.warm_start and champion is not None and bool(champion.artifact_uri)
    selection, bank_reason = bank_for_delta(settings, reg, delta, base_path, identity["sha256"], warm, kind)
    if selection is not None:
        say(
            progress,
            f"train: experts 0-{len(selection.chosen) - 1} from the bank: {', '.join(selection.chosen)}",
        )
    say(progress, f"train: {kind} adapter on {len(delta)} new and {len(replay)} replayed pairs")

    def on_step(info: dict) -> None:
        step = info.get("step", 0)
        if step == 1 or step % 10 == 0:
            say(
                progress,
                f"train: step {step} epoch {info.get('epoch')} loss {info.get('loss', float('nan')):.4f}",
            )

    parent_dir = Path(champion.artifact_uri) if champion is not None and champion.artifact_uri else None
    outcome = train_candidate(
        settings,
        base_path,
        identity["sha256"],
        pairs,
        parent_dir=parent_dir,
        kind=kind,
        progress=on_step,
        bank_init=selection,
        examples=examples,
    )
    failpoint("train.artifact")
    roles = {p.qa_id: "delta" for p in delta} | {p.qa_id: "replay" for p in replay}
    version = reg.create_version(
        run_id=run_id,
        base_model=identity.get("name") or str(base_path),
        base_model_sha256=identity["sha256"],
        data_hash=outcome.data_hash,
        params=outcome.params | {"pairs_hash": data_hash(pairs)},
        parent_version=champion.version if champion is not None else None,
        kind=kind,  # type: ignore[arg-type]
        artifact_uri=str(outcome.artifact_dir),
        artifact_sha256=outcome.sha256,
        actor="refresh",
        trained_pairs=roles,
    )
    save_training_log(settings, version, outcome.metrics)
    bank = {"used": selection is not None, "reason": bank_reason}
    if kind == "moral":
        bank["artifact"] = str(record_selection(settings, reg, version, selection, bank_reason, run_id))
        bank["chosen"] = selection.chosen if selection is not None else []
    say(progress, f"train: registered candidate v{version} ({outcome.metrics.get('seconds')} s)")
    return TrainSummary(
        version=version,
        reused_artifact=outcome.reused,
        delta_pairs=len(delta),
        replay_pairs=len(replay),
        metrics={k: v for k, v in outcome.metrics.items() if k not in ("losses", "aux_losses")},
        replay=replay_choice.summary(),
        bank=bank,
    )


#: Dev questions that choose the checkpoint (each check generates their answers: bounded time).
DEV_MAX = 40


def gather_examples(
    settings: Settings,
    reg: Registry,
    pairs: list,
    delta: list,
    base_path: Path,
    base_sha256: str,
    progress: Progress | None = None,
) -> list:
    """The inputs of :func:`tasks.train.build_examples` from the registry, the index and the base
    model: the delta pairs' chunks and the nearest other chunks (distractors) for the open-book
    kinds, the chunks of the delta's documents, and the base model's own answers to the replay
    prompts (computed once per base model, memoised with the evaluation's base outputs)."""
    from tasks.text import knowledge_text
    from tasks.train import build_examples, example_counts

    k = settings.mix_passages
    need_context = settings.mix_open_book > 0 or settings.mix_distractors_only > 0
    chunk_of = {p.qa_id: p.chunk_id for p in delta}
    docs = sorted({p.doc_id for p in delta})
    doc_chunks = [c for d in docs for c in reg.chunks(doc_id=d)]
    chunk_text = {c.chunk_id: c.text for c in doc_chunks}
    distractors: dict[str, list[str]] = {}
    if need_context and delta:
        distractors = nearest_other_chunks(settings, delta, k)
    general: list[tuple[str, str]] = []
    n_general = min(settings.replay_general_size, round(settings.mix_general * len(delta)))
    if n_general > 0:
        general = base_general_answers(settings, base_path, base_sha256, n_general)
    # Dev: held-out wordings of trained facts (tasks.splits.choose_dev) of the delta's documents.
    wanted = set(docs)
    dev = [p for p in reg.qa_pairs(split="dev") if p.doc_id in wanted]
    dev = sorted(dev, key=lambda p: p.qa_id)[:DEV_MAX]
    examples = build_examples(
        settings,
        pairs,
        dev=[(p.qa_id, p.question, p.answer) for p in dev],
        chunk_of=chunk_of,
        chunk_text=chunk_text,
        distractors=distractors,
        # The text without instruction-like sentences: a planted order is not learned as knowledge.
        documents=[(c.chunk_id, knowledge_text(c.text)) for c in doc_chunks]
        if settings.mix_document_text
        else (),
        general=general,
        k=k,
    )
    counts = ", ".join(f"{n} {kind}" for kind, n in example_counts(examples).items() if n)
    say(progress, f"train: examples: {counts}")
    return examples


def nearest_other_chunks(settings: Settings, delta: list, k: int) -> dict[str, list[str]]:
    """qa_id -> texts of the active chunks nearest its question, its own chunk left out (nearest first):
    the distractor passages retrieval would put beside (or instead of) the gold one."""
    from storage.vectors import CHUNKS, VectorStore

    store = VectorStore(settings)
    hits = store.query(CHUNKS, [p.question for p in delta], k=k + 1, where={"status": "active"})
    return {
        p.qa_id: [h.text for h in row if h.id != p.chunk_id][:k] for p, row in zip(delta, hits, strict=True)
    }


def base_general_answers(
    settings: Settings, base_path: Path, base_sha256: str, n: int
) -> list[tuple[str, str]]:
    """(prompt, the base model's greedy answer) for the first ``n`` replay prompts, memoised with the
    evaluation's base outputs (so generated once per base model; loading it for the memo's key takes
    a few seconds)."""
    from moe.base_model import load_base_model
    from moe.infer import generate_answers
    from tasks.evaluate import BaseMemo
    from tasks.holdout import replay_prompts

    prompts = replay_prompts(min(n, settings.replay_general_size), settings.seed)
    model, tokenizer = load_base_model(base_path)
    memo = BaseMemo.for_base(settings.model_cache, base_sha256)
    memo.bind(model, tokenizer)
    max_new = 96
    answers = memo.many(
        [memo.key("replay-gen", max_new, q) for q in prompts],
        lambda rows: generate_answers(model, tokenizer, [prompts[i] for i in rows], max_new_tokens=max_new),
    )
    memo.save()
    # Trained with an end-of-turn after it, a cut-off answer would teach stopping mid-sentence: an
    # answer is kept up to its last complete sentence, or left out.
    out = []
    for q, a in zip(prompts, answers, strict=True):
        whole = complete_sentences(a)
        if whole:
            out.append((q, whole))
    return out


def complete_sentences(text: str) -> str:
    """``text`` up to its last sentence end (``.``, ``!``, ``?``, possibly closed by a quote or a
    bracket); "" when it has none."""
    import re

    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s|$)", text)]
    return text[: ends[-1]].strip() if ends else ""


def save_training_log(settings: Settings, version: int, metrics: dict) -> Path:
    """Keep the loss curve and router statistics of a version's training (for its plots and report);
    the adapter directory itself is immutable and checksummed, so this lives beside it."""
    keep = (
        "dev_curve",
        "best_step",
        "checkpoint",
        "examples",
        "tokens_per_second",
        "losses",
        "aux_losses",
        "expert_stats",
        "steps",
        "seconds",
        "train_pairs",
        "first_loss",
        "final_loss",
    )
    path = training_log_path(settings, version)
    return write_json_atomic(path, {"version": version, **{k: metrics[k] for k in keep if k in metrics}})
