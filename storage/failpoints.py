"""Named crash points for the crash tests (failpoints, as in FoundationDB or TiKV's fail-rs).

``MORAL_CRASH_AT=name`` (or ``name:n``, the n-th time the point is reached) makes the process kill
itself with SIGKILL at that point: no ``finally``, no atexit, no flush, exactly like ``kill -9`` or
a power cut. Unset (always, outside tests and ``bench/crash.py``) a point costs one dict lookup.
The points sit at every stage boundary of a refresh and inside the stages where a crash could
leave the stores disagreeing (see ``POINTS``).
"""

from __future__ import annotations

import os
import signal

#: Every crash point, in the order a refresh reaches them.
POINTS = (
    "ingest.done",
    "qa.cached",  # a batch of LLM replies written to the reply cache, more to come
    "qa.done",
    "index.registry",  # duplicates and held-out wordings recorded in the registry, Chroma not yet written
    "index.done",
    "train.artifact",  # the adapter's files written, the version not yet registered
    "train.done",
    "evaluate.recorded",  # scores in the registry, the evaluation file not yet written
    "evaluate.done",
    "promote.done",
)
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here with SIGKILL when ``MORAL_CRASH_AT`` names this point (and its hit count)."""
    spec = os.environ.get("MORAL_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
