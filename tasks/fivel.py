"""5L-bench suites with deterministic items: Faith, Filter and RR (refusal rate).

MoRAL's 5L-bench judged answers with an LLM and published no formulas; these are deterministic
equivalents built from our own QA pairs and the chunks they were generated from:

* **Faith** — the question with its source passage in which every mention of the gold answer is
  replaced by another pair's answer (a counterfactual).  A faithful model answers with the
  substitute, not with what it memorised (:func:`tasks.metrics.faithful`).
* **Filter** — the source passage mixed, at a seeded position, with distractor passages from other
  documents that do not contain the answer; scored as RA (gold contained).
* **RR** — distractor passages only; the context lacks the answer, so the right response is a
  refusal (:func:`tasks.metrics.is_refusal`).

QR (question–answer embedding similarity) and FL (perplexity of the answer under the base model)
are per-answer metrics computed in :mod:`tasks.evaluate` on the ordinary suites.  Every choice here
is drawn from a ``random.Random(seed)``, so the same corpus yields byte-identical items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.evaluate import EvalItem, Suite
from tasks.text import normalize_answer

#: Asked of the model on every 5L suite: without it a small chat model rarely declines, and RR would
#: measure the prompt rather than the model.
FIVEL_SYSTEM = (
    "Answer the question briefly using only the passages. "
    "If the passages do not contain the answer, reply: I don't know."
)


@dataclass(frozen=True)
class SourcedPair:
    """A held-out QA pair with the passage it was generated from."""

    question: str
    answer: str
    passage: str
    doc_id: str


def _mentions(passage: str, answer: str) -> re.Pattern[str] | None:
    """A case-insensitive pattern for ``answer`` as a whole word/number span in ``passage`` (or None)."""
    answer = answer.strip()
    if not answer:
        return None
    # \b only where the answer starts/ends with a word character ("2.4 kg" vs "(2.4 kg)").
    left = r"\b" if re.match(r"\w", answer) else ""
    right = r"\b" if re.search(r"\w$", answer) else ""
    pattern = re.compile(left + re.escape(answer) + right, re.IGNORECASE)
    return pattern if pattern.search(passage) else None


def faith_items(pairs: Sequence[SourcedPair], size: int, seed: int = 0) -> list[EvalItem]:
    """Counterfactual items: the passage with the gold answer swapped for another pair's answer.

    The item's ``answer`` is the substitute (what a faithful model says) and ``original`` the gold
    answer it replaced.  Pairs whose answer does not appear verbatim in their passage are skipped:
    there is nothing to swap.
    """
    usable = [(p, pat) for p in pairs if (pat := _mentions(p.passage, p.answer)) is not None]
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    items: list[EvalItem] = []
    for i in order:
        if len(items) >= size:
            break
        pair, pattern = usable[i]
        gold = normalize_answer(pair.answer)
        # The substitute: the first other answer, in a seeded order, that differs from the gold and
        # appears nowhere in the passage (else the counterfactual would be ambiguous).
        candidates = [usable[j][0].answer for j in order if j != i]
        substitute = next(
            (
                a
                for a in candidates
                if normalize_answer(a)
                and normalize_answer(a) != gold
                and gold not in normalize_answer(a)
                and normalize_answer(a) not in gold
                and _mentions(pair.passage, a) is None
            ),
            None,
        )
        if substitute is None:
            continue
        context = pattern.sub(lambda _m, s=substitute: s, pair.passage)
        items.append(EvalItem(pair.question, substitute, (context,), original=pair.answer))
    return items


def _distractors(pair: SourcedPair, pool: Sequence[tuple[str, str]], k: int, rng: random.Random) -> list[str]:
    """``k`` passages from other documents that do not mention the pair's answer."""
    eligible = [
        text for doc_id, text in pool if doc_id != pair.doc_id and _mentions(text, pair.answer) is None
    ]
    return rng.sample(eligible, min(k, len(eligible)))


def filter_items(
    pairs: Sequence[SourcedPair], pool: Sequence[tuple[str, str]], size: int, k: int = 2, seed: int = 0
) -> list[EvalItem]:
    """The source passage among ``k`` distractors (at a seeded position); scored as RA."""
    rng = random.Random(seed)
    items: list[EvalItem] = []
    for pair in pairs[:size]:
        passages = _distractors(pair, pool, k, rng)
        if not passages:
            continue  # a one-document corpus has no distractors: the item would be plain open-book
        passages.insert(rng.randrange(len(passages) + 1), pair.passage)
        items.append(EvalItem(pair.question, pair.answer, tuple(passages)))
    return items


def refusal_items(
    pairs: Sequence[SourcedPair], pool: Sequence[tuple[str, str]], size: int, k: int = 2, seed: int = 0
) -> list[EvalItem]:
    """Distractor passages only: the answer is not in the context, so refusing is right."""
    rng = random.Random(seed + 1)  # not the filter suite's draws
    items: list[EvalItem] = []
    for pair in pairs[:size]:
        passages = _distractors(pair, pool, k, rng)
        if passages:
            items.append(EvalItem(pair.question, pair.answer, tuple(passages)))
    return items


def fivel_suites(
    pairs: Sequence[SourcedPair], pool: Sequence[tuple[str, str]], size: int, k: int = 2, seed: int = 0
) -> list[Suite]:
    """The Faith, Filter and RR suites (open-book; empty ones left out)."""
    if size <= 0:
        return []
    suites = [
        Suite("faith", faith_items(pairs, size, seed), "open", kind="faith", system=FIVEL_SYSTEM),
        Suite("filter", filter_items(pairs, pool, size, k, seed), "open", kind="filter", system=FIVEL_SYSTEM),
        Suite(
            "refusal", refusal_items(pairs, pool, size, k, seed), "open", kind="refusal", system=FIVEL_SYSTEM
        ),
    ]
    return [s for s in suites if s.items]
