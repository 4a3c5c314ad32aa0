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


#: The settings that change the trained weights, recorded with the version (``train_params.json``,
#: the registry's params) and hashed into the artifact key.  Defined here once.
TRAINED_WITH = ("rank", "alpha", "epochs", "learning_rate", "batch_size", "seed", "warm_start")
TRAINED_WITH_MORAL = ("num_experts", "top_k")
#: Settings added after adapters were already trained, with the value every earlier adapter was
#: trained with: such a setting is recorded only when it differs, so earlier artifact keys stay valid.
ADDED_LATER = {"loramoe": False}


def train_params(settings: Settings, kind: str = "moral") -> dict:
    """Every setting that changes the trained weights, recorded with the version."""
    names = TRAINED_WITH + (TRAINED_WITH_MORAL if kind == "moral" else ())
    params: dict[str, Any] = {"kind": kind, **{name: getattr(settings, name) for name in names}}
    if kind == "moral":
        params |= {k: getattr(settings, k) for k, old in ADDED_LATER.items() if getattr(settings, k) != old}
    return params


def train_config(settings: Settings):
    """The trainer's :class:`moe.train.TrainConfig`, from Settings (the one place it is built)."""
    from moe.train import TrainConfig

    return TrainConfig(
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
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
) -> TrainOutcome:
    """Train (or find already trained) the candidate adapter; returns where it lies and its checksum.

    ``bank_init`` (a fresh MoRAL adapter only): experts 0..N-1 start from the chosen bank LoRAs, the
    rest fresh.  A warm start from ``parent_dir`` takes precedence and the train stage then passes
    no bank selection (the champion's experts already are the bank's most recent entries).
    """
    if not pairs:
        raise ValueError("no training pairs: nothing to train")
    warm = parent_dir is not None and settings.warm_start
    if bank_init is not None and (kind != "moral" or warm):
        raise ValueError("bank initialisation applies to a fresh MoRAL adapter, not to LoRA or a warm start")
    params = train_params(settings, kind)
    if bank_init is not None:
        params["bank_init"] = bank_init.key()  # expert -> bank entry; a different choice, other weights
    dhash = data_hash(pairs)
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

    examples = [Example(question=p.question, answer=p.answer, sample_group=p.group) for p in pairs]
    tcfg = train_config(settings)
    started = time.perf_counter()
    result = train(model, tokenizer, examples, tcfg, callback=progress)
    seconds = time.perf_counter() - started
    metrics = {
        "train_pairs": len(pairs),
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
