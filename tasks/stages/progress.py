"""What every stage shares: the progress callback and its log line."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("moral.stages")
Progress = Callable[[str], None]


def say(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)
