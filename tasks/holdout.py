"""The world-knowledge holdout: FanOutQA's dev single-hop question/answer pairs.

The data ships inside the ``fanoutqa`` wheel (installed with ``--no-deps``; importing the package
fails for a missing dependency, so the JSON is read from the package folder directly).  The sample
is fixed by a seed, so every version is measured on the same questions; it is never trained on.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEV_FILE = "data/fanout-final-dev.json"


@dataclass(frozen=True)
class HoldoutPair:
    id: str
    question: str
    answer: str


def fanoutqa_path() -> Path:
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fanoutqa data package is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / DEV_FILE


def _single_hops(node: dict, out: list[HoldoutPair]) -> None:
    for sub in node.get("decomposition") or []:
        answer = sub.get("answer")
        # Keep scalar answers only: list or dict answers have no single gold string to score against.
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if isinstance(answer, str) and answer.strip() and not sub.get("decomposition"):
            out.append(HoldoutPair(id=sub["id"], question=sub["question"].strip(), answer=answer.strip()))
        _single_hops(sub, out)


@lru_cache(maxsize=1)
def all_single_hop_pairs() -> tuple[HoldoutPair, ...]:
    data = json.loads(fanoutqa_path().read_text(encoding="utf-8"))
    out: list[HoldoutPair] = []
    for item in data:
        _single_hops(item, out)
    # The same sub-question can appear under several top-level questions.
    unique = {pair.id: pair for pair in out}
    return tuple(sorted(unique.values(), key=lambda p: p.id))


def _shuffled(seed: int) -> list[HoldoutPair]:
    pairs = list(all_single_hop_pairs())
    random.Random(seed).shuffle(pairs)
    return pairs


def holdout_sample(size: int, seed: int = 0) -> list[HoldoutPair]:
    """A fixed, seeded sample of ``size`` single-hop pairs (the same for every version): the front
    of one seeded shuffle; the drift prompts come from its back, so the two never overlap."""
    return _shuffled(seed)[: max(0, size)]


DRIFT_FILE = Path(__file__).parent / "data" / "drift_prompts.txt"


def general_prompts(path: Path = DRIFT_FILE) -> list[str]:
    """The shipped general instructions (comments and blank lines skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def drift_prompts(size: int, seed: int = 0) -> list[str]:
    """``size`` fixed general prompts for the drift check: the shipped instructions first (up to half),
    then FanOutQA questions from the back of the holdout's shuffle (never in the holdout)."""
    if size <= 0:
        return []
    general = general_prompts()[: (size + 1) // 2]
    questions = [p.question for p in reversed(_shuffled(seed))][: size - len(general)]
    return general + questions


REPLAY_FILE = Path(__file__).parent / "data" / "replay_prompts.txt"
#: The largest holdout and drift sizes the settings allow: replay never takes from either end.
REPLAY_GUARD = 600


def replay_prompts(size: int, seed: int = 0) -> list[str]:
    """``size`` fixed general prompts for self-distillation replay (the base model's own answers are
    trained beside the new knowledge): the shipped replay instructions first (up to half), then
    FanOutQA questions from the middle of the holdout's shuffle, so they are neither holdout questions
    (its front) nor drift prompts (its back) — compared normalised — for any holdout and drift size
    up to ``REPLAY_GUARD`` (the settings' maximum)."""
    if size <= 0:
        return []
    general = general_prompts(REPLAY_FILE)[: (size + 1) // 2]
    pairs = _shuffled(seed)
    # FanOutQA repeats a question text under several ids: a text the holdout or drift could take at
    # their largest allowed sizes is never replayed.
    from tasks.text import normalize_question

    ends = pairs[:REPLAY_GUARD] + pairs[-REPLAY_GUARD:]
    measured = {normalize_question(p.question) for p in ends}
    middle = pairs[REPLAY_GUARD:-REPLAY_GUARD]
    start = len(middle) // 4
    picked: dict[str, str] = {}  # normalised -> as written: one of each, none the holdout or drift may ask
    for p in middle[start:] + middle[:start]:
        key = normalize_question(p.question)
        if key not in measured:
            picked.setdefault(key, p.question)
    return general + list(picked.values())[: size - len(general)]
