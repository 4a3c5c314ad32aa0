"""The four-document core of the demo corpus (one document per format), shared by the tests and the
benchmarks that must keep their counts and costs when the demo folder grows."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "docs"
#: Named, so that the other documents of the demo folder (13 in all) leave the tests' counts of
#: chunks and pairs, and the ablation and crash benchmarks' sizes, alone.
EXAMPLE_FILES = (
    "harrowgate-remote-work-policy-2026.md",
    "lumenvale-release-notes.txt",
    "quillfeather-q7-spec.pdf",
    "tidewell-harbour-bulletin.html",
)


def copy_core(dest: Path) -> Path:
    """``dest`` holding the four core documents and nothing else (emptied first: a reused working
    folder must not ingest strays); returns ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in EXAMPLE_FILES:
        shutil.copy2(EXAMPLES / name, dest / name)
    return dest
