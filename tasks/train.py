"""Train stage: a MoRAL candidate adapter on the delta's train split (plus replayed earlier pairs).

The adapter directory is keyed by what determines its weights (training data, parameters, base
model, parent), so a run that crashed after training but before registering finds the finished
artifact and does not pay for training twice.  Files are written to a temporary directory and
renamed, so no half-written adapter is ever visible.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.artifacts import AdapterStore, ArtifactError
from storage.settings import Settings

if TYPE_CHECKING:
    from tasks.bank import BankSelection


@dataclass(frozen=True)
class TrainPair:
    qa_id: str
    question: str
    answer: str
    group: int = 0  # 0 = new knowledge (the delta), 1 = retained knowledge (replay)


#: What a training example is made of (``TrainExample.kind``), recorded with the version.
#: ``dev`` examples are not trained: the checkpoint kept is the one that answers them best.
EXAMPLE_KINDS = ("closed", "open_book", "distractors", "document", "general", "dev")


@dataclass(frozen=True)
class TrainExample:
    """One example the trainer sees: a QA pair closed-book, open-book (``context``: its chunk among
    distractors) or with distractors only; a document chunk's ``text``; or a general prompt answered
    by the base model itself.  ``ref`` names its source (qa_id, chunk_id or the prompt).
    ``distill`` and ``plain`` as in :class:`moe.train.Example` (a general prompt matched to the base
    model's distribution, in the chat or the plain format)."""

    kind: str
    ref: str
    question: str = ""
    answer: str = ""
    context: str | None = None
    text: str | None = None
    group: int = 0
    distill: bool = False
    plain: bool = False


@dataclass
class TrainOutcome:
    artifact_dir: Path
    sha256: str
    data_hash: str
    params: dict
    metrics: dict = field(default_factory=dict)
    reused: bool = False


def data_hash(pairs: Sequence[TrainPair]) -> str:
    """Order-independent hash of the training pairs (ids and texts)."""
    h = hashlib.sha256()
    for p in sorted(pairs, key=lambda p: p.qa_id):
        h.update(json.dumps([p.qa_id, p.question, p.answer, p.group]).encode())
    return h.hexdigest()


def examples_hash(examples: Sequence[TrainExample]) -> str | None:
    """Hash of the examples beyond the closed-book pairs, dev ones included (they choose the
    checkpoint); None when there are none: the pairs' own hash then stands alone, as it did before
    other kinds existed."""
    rest = [e for e in examples if e.kind != "closed"]
    if not rest:
        return None
    h = hashlib.sha256()
    for e in sorted(rest, key=lambda e: (e.kind, e.ref, e.plain)):
        row = [e.kind, e.ref, e.question, e.answer, e.context, e.text, e.group]
        row += [flag for flag, on in (("distill", e.distill), ("plain", e.plain)) if on]  # old rows unchanged
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def training_data_hash(pairs: Sequence[TrainPair], examples: Sequence[TrainExample]) -> str:
    """What the version records as its data: the pairs, and the other examples when there are any."""
    dhash, extra = data_hash(pairs), examples_hash(examples)
    return dhash if extra is None else hashlib.sha256(f"{dhash}:{extra}".encode()).hexdigest()


#: The settings that change the trained weights, recorded with the version (``train_params.json``,
#: the registry's params) and hashed into the artifact key.  Defined here once.
TRAINED_WITH = ("rank", "alpha", "epochs", "learning_rate", "batch_size", "seed", "warm_start")
TRAINED_WITH_MORAL = ("num_experts", "top_k")
#: Settings added after adapters were already trained, with the value every earlier adapter was
#: trained with: such a setting is recorded only when it differs, so earlier artifact keys stay valid.
ADDED_LATER = {
    "mix_passages": 2,
    "mix_open_book": 0.0,
    "mix_distractors_only": 0.0,
    "mix_document_text": False,
    "mix_general": 0.0,
    "replay_kl": False,
}
ADDED_LATER_MORAL = {"loramoe": False}
#: The open-book prompt format (``moe.infer.build_messages``): 2 = passages between <passages>
#: markers after an instruction that they are data. Recorded for adapters trained with open-book
#: or distractor examples, so one trained on another format is never reused as identical.
OPEN_BOOK_PROMPT_VERSION = 2


def train_params(settings: Settings, kind: str = "moral") -> dict:
    """Every setting that changes the trained weights, recorded with the version."""
    names = TRAINED_WITH + (TRAINED_WITH_MORAL if kind == "moral" else ())
    params: dict[str, Any] = {"kind": kind, **{name: getattr(settings, name) for name in names}}
    later = ADDED_LATER | (ADDED_LATER_MORAL if kind == "moral" else {})
    params |= {k: getattr(settings, k) for k, old in later.items() if getattr(settings, k) != old}
    if not settings.mix_general:
        params.pop("replay_kl", None)  # no general replay: the switch changes nothing trained
    if settings.mix_open_book or settings.mix_distractors_only:
        # The open-book prompt's wording is part of what such an adapter learned (moe.infer).
        params["open_book_prompt"] = OPEN_BOOK_PROMPT_VERSION
    return params


def _share(salt: str, ref: str) -> float:
    return int(hashlib.sha256(f"{salt}:{ref}".encode()).hexdigest()[:12], 16) / 16**12


def supporting_sentence(chunk_text: str, answer: str, max_words: int = 40) -> str | None:
    """The chunk's sentence that states ``answer`` (the quote an open-book answer gives on its second
    line), or None when no short sentence holds it."""
    from tasks.chunking import split_sentences
    from tasks.text import normalize_answer

    gold = normalize_answer(answer)
    for sentence in split_sentences(chunk_text):
        if gold and gold in normalize_answer(sentence) and len(sentence.split()) <= max_words:
            return sentence.strip()
    return None


def build_examples(
    settings: Settings,
    pairs: Sequence[TrainPair],
    *,
    chunk_of: dict[str, str] | None = None,
    chunk_text: dict[str, str] | None = None,
    distractors: dict[str, list[str]] | None = None,
    documents: Sequence[tuple[str, str]] = (),
    general: Sequence[tuple[str, str]] = (),
    dev: Sequence[tuple[str, str, str]] = (),
    k: int = 3,
) -> list[TrainExample]:
    """The run's training examples, mixed by the ``mix_*`` settings (pure; the train stage gathers
    the inputs).

    * every pair closed-book;
    * ``mix_open_book`` of the new pairs (chosen by a hash of the qa_id, so the same pairs every
      run) open-book: their chunk among ``k - 1`` retrieved distractor passages (``distractors``: the
      nearest other chunks' texts, nearest first) at a position fixed by the hash; the answer on the
      first line and the supporting sentence, if the chunk has a short one, on the next;
    * ``mix_distractors_only`` of the new pairs (another hash) with ``k`` distractors and no gold
      passage, answered as trained;
    * with ``mix_document_text``, ``documents`` — (chunk_id, text) of the new documents' chunks — as text;
    * ``mix_general`` × the new pairs of ``general`` — (prompt, the base model's own answer) — as
      retained knowledge (group 1), in the chat format on the answer's tokens; with ``replay_kl``
      each is also asked in the plain 'Question/Answer' format and matched there to the base
      model's whole next-token distribution along that answer (KL): the chat answers keep the
      chat format's general answers, the distribution keeps the plain format's knowledge;
    * ``dev`` — (qa_id, question, answer) of dev pairs, held-out wordings of trained facts that
      share no fact with eval — as ``dev`` examples: not trained, they choose the checkpoint
      (strict recall, closed-book).
    """
    chunk_of, chunk_text, distractors = chunk_of or {}, chunk_text or {}, distractors or {}
    out = [TrainExample("closed", p.qa_id, p.question, p.answer, group=p.group) for p in pairs]
    new = [p for p in pairs if p.group == 0]
    for p in new:
        others = distractors.get(p.qa_id, [])
        gold = chunk_text.get(chunk_of.get(p.qa_id, ""))
        if gold and _share("open-book", p.qa_id) < settings.mix_open_book:
            passages = others[: k - 1]
            at = int(_share("position", p.qa_id) * (len(passages) + 1))
            passages = [*passages[:at], gold, *passages[at:]]
            quote = supporting_sentence(gold, p.answer)
            answer = p.answer if quote is None else f"{p.answer}\n{quote}"
            out.append(TrainExample("open_book", p.qa_id, p.question, answer, "\n\n".join(passages)))
        if len(others) >= k and _share("distractors", p.qa_id) < settings.mix_distractors_only:
            out.append(TrainExample("distractors", p.qa_id, p.question, p.answer, "\n\n".join(others[:k])))
    if settings.mix_document_text:
        out += [TrainExample("document", cid, text=text) for cid, text in documents if text.strip()]
    n_general = min(len(general), round(settings.mix_general * len(new)))
    replayed = [(q, a) for q, a in general[:n_general] if a.strip()]
    out += [TrainExample("general", q, q, a, group=1) for q, a in replayed]
    if settings.replay_kl:
        out += [TrainExample("general", q, q, a, group=1, distill=True, plain=True) for q, a in replayed]
    out += [TrainExample("dev", qa_id, q, a) for qa_id, q, a in dev]
    return out


def example_counts(examples: Sequence[TrainExample]) -> dict[str, int]:
    return {kind: sum(e.kind == kind for e in examples) for kind in EXAMPLE_KINDS}


def train_config(settings: Settings):
    """The trainer's :class:`moe.train.TrainConfig`, from Settings (the one place it is built)."""
    from moe.train import TrainConfig

    return TrainConfig(
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
        max_length=768,  # an open-book example: mix_passages passages, the question and the answer
    )


def moral_config(settings: Settings, base_path: Path, base_sha256: str):
    """A fresh adapter's :class:`moe.config.MoRALConfig`, from Settings (the one place it is built)."""
    from moe.config import MoRALConfig

    return MoRALConfig(
        num_experts=settings.num_experts,
        top_k=settings.top_k,
        rank=settings.rank,
        alpha=settings.alpha,
        base_model_name_or_path=str(base_path),
        base_model_sha256=base_sha256,
        **loramoe_options(settings),
    )


def loramoe_options(settings: Settings) -> dict[str, Any]:
    """MoRALConfig fields of LoRAMoE mode: the localized balancing constraint over two contiguous
    expert groups, group 0 for new knowledge (delta pairs, ``TrainPair.group`` 0) and group 1 for
    retained knowledge (replay pairs, group 1).  Empty when the mode is off (switch balancing)."""
    if not settings.loramoe:
        return {}
    if settings.num_experts < 2:
        raise ValueError(
            "LoRAMoE mode needs at least 2 experts (one group each for new and retained knowledge)"
        )
    return {"balance_loss": "localized", "expert_groups": 2}


#: Checkpoints scored on dev per training run (the last step always among them).
CHECKPOINTS = 4


def artifact_key(dhash: str, params: dict, base_sha256: str, parent_key: str | None) -> str:
    blob = json.dumps(
        {"data": dhash, "params": params, "base": base_sha256, "parent": parent_key}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def train_candidate(
    settings: Settings,
    base_path: Path,
    base_sha256: str,
    pairs: Sequence[TrainPair],
    *,
    parent_dir: Path | None = None,
    kind: str = "moral",
    progress: Callable[[dict], None] | None = None,
    bank_init: BankSelection | None = None,
    examples: Sequence[TrainExample] | None = None,
) -> TrainOutcome:
    """Train (or find already trained) the candidate adapter; returns where it lies and its checksum.

    ``bank_init`` (a fresh MoRAL adapter only): experts 0..N-1 start from the chosen bank LoRAs, the
    rest fresh.  A warm start from ``parent_dir`` takes precedence and the train stage then passes
    no bank selection (the champion's experts already are the bank's most recent entries).
    ``examples`` (from :func:`build_examples`; default: the pairs closed-book) is what is trained.
    """
    if not pairs:
        raise ValueError("no training pairs: nothing to train")
    warm = parent_dir is not None and settings.warm_start
    if bank_init is not None and (kind != "moral" or warm):
        raise ValueError("bank initialisation applies to a fresh MoRAL adapter, not to LoRA or a warm start")
    if examples is None:  # the pairs closed-book only: the example mix was not applied, nor recorded
        examples = [TrainExample("closed", p.qa_id, p.question, p.answer, group=p.group) for p in pairs]
        settings = settings.model_copy(update=ADDED_LATER)
    params = train_params(settings, kind)
    if bank_init is not None:
        params["bank_init"] = bank_init.key()  # expert -> bank entry; a different choice, other weights
    dhash = training_data_hash(pairs, examples)
    parent_key = parent_dir.name if warm else None
    key = artifact_key(dhash, params, base_sha256, parent_key)
    store = AdapterStore(settings.adapters_dir)
    if store.exists(key):
        try:
            store.verify(key)
            metrics = json.loads((store.path(key) / "train_metrics.json").read_text())
            sha = AdapterStore.checksum(store.path(key))
            return TrainOutcome(store.path(key), sha, dhash, params, metrics, reused=True)
        except (ArtifactError, OSError, ValueError):
            store.delete(key)  # a corrupt leftover is never reused

    # Heavy imports only here: a run with nothing to train never loads torch.
    from moe.base_model import load_base_model
    from moe.lora import make_lora_model
    from moe.model import MoRALModel
    from moe.train import Example, train

    base, tokenizer = load_base_model(base_path)
    if kind == "moral":
        if warm:
            # Warm start: the champion's experts and routers, trainable; the base stays frozen.
            model = MoRALModel.from_pretrained(base, parent_dir, is_trainable=True)
            if settings.loramoe:  # the parent's saved balance loss gives way to this run's mode
                model.moral_config.balance_loss = "localized"
        else:
            model = MoRALModel(base, moral_config(settings, base_path, base_sha256))
            if bank_init is not None:
                from moe.bank import load_expert

                for expert, lora in enumerate(bank_init.loras):
                    load_expert(model, expert, lora)
    else:
        model = make_lora_model(base, rank=settings.rank, alpha=settings.alpha)

    trained = [
        Example(
            question=e.question,
            answer=e.answer,
            context=e.context,
            text=e.text,
            sample_group=e.group,
            distill=e.distill,
            plain=e.plain,
        )
        for e in examples
        if e.kind != "dev"
    ]
    dev = [e for e in examples if e.kind == "dev"]
    tcfg = train_config(settings)
    select, every = None, None
    if dev:
        from moe.infer import generate_answers
        from tasks.metrics import strict_recall

        def select(m) -> float:
            answers = generate_answers(
                m, tokenizer, [e.question for e in dev], max_new_tokens=24, first_line=True
            )
            return sum(strict_recall(a, e.answer) for a, e in zip(answers, dev, strict=True)) / len(dev)

        steps = tcfg.epochs * -(-len(trained) // tcfg.batch_size)
        every = max(1, -(-steps // CHECKPOINTS))
    started = time.perf_counter()
    result = train(model, tokenizer, trained, tcfg, callback=progress, select=select, select_every=every)
    seconds = time.perf_counter() - started
    metrics = {
        "train_pairs": len(pairs),
        "examples": example_counts(examples),
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        # trained tokens per second of training (checkpoint scoring left out; it is `select_seconds`)
        "tokens_per_second": round(result.tokens / max(result.seconds - result.select_seconds, 1e-9), 1),
        "select_seconds": round(result.select_seconds, 1),
        # Checkpoint choice on dev (strict recall): the curve and the step kept; without dev pairs
        # the last step is kept and the log says so.
        "dev_curve": [[s, round(v, 4)] for s, v in result.checkpoints],
        "best_step": result.best_step if dev else result.steps,
        "checkpoint": f"best dev recall of {len(dev)} dev questions"
        if dev
        else "last step (no dev questions)",
        "steps": result.steps,
        "seconds": round(seconds, 2),
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": [round(x, 5) for x in result.losses],
        "aux_losses": [round(x, 6) for x in getattr(result, "aux_losses", [])],
    }
    if hasattr(model, "expert_stats"):
        metrics["expert_stats"] = model.expert_stats()

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        (directory / "train_metrics.json").write_text(json.dumps(metrics))
        (directory / "train_params.json").write_text(json.dumps(params | {"data_hash": dhash}, indent=2))

    info = store.write(key, write)
    return TrainOutcome(Path(info.uri), info.sha256, dhash, params, metrics)
