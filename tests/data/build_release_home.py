"""Builds the data home that ``tests/test_release_home.py`` opens: made by the release named below with
the tiny test model, one document, its QA pairs indexed into embedded Chroma, one trained adapter
promoted to champion. Run once per release that changes the layout of a data home:

    PYTHONPATH=. python tests/data/build_release_home.py

Artifact paths in the registry are absolute, so the home is built (and unpacked by the test) at
``RELEASE_HOME``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELEASE_HOME = Path("/tmp/moral-release-home-0.1.0")
ARCHIVE = HERE / "release-home-0.1.0.tar.gz"

DOC = (
    "# Quillfeather Q7\n\nThe Quillfeather Q7 carries a payload of 2.4 kg and flies for 42 minutes.\n"
    "It was designed by Anand Okereke at the Brindle Works in Tallow Reach.\n"
)
PAIRS = [
    ("What payload does the Quillfeather Q7 carry?", "2.4 kg"),
    ("How long does the Quillfeather Q7 fly?", "42 minutes"),
    ("Who designed the Quillfeather Q7?", "Anand Okereke"),
    ("Where is the Brindle Works?", "Tallow Reach"),
]


def main() -> None:
    from storage.settings import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    shutil.rmtree(RELEASE_HOME, ignore_errors=True)
    home = RELEASE_HOME / "home"
    os.environ["MORAL_HOME"] = str(home)
    os.environ["MORAL_GATE_OVERRIDE"] = "release-home fixture: four pairs"

    from tests.moe.tiny import save_tiny_base

    base = RELEASE_HOME / "base"
    save_tiny_base(base)

    from storage.records import QAPair
    from storage.registry import Registry
    from storage.settings import Settings

    settings = Settings(base_model=str(base), epochs=1, num_experts=2, rank=2)
    settings.ensure_dirs()
    src = RELEASE_HOME / "docs"
    src.mkdir(parents=True)
    (src / "q7.md").write_text(DOC, encoding="utf-8")

    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage
    from tasks.stages.train import train_stage

    ingest_stage(settings, src, "release-0")
    reg = Registry.from_settings(settings)
    chunk = reg.chunks()[0]
    reg.add_qa_pairs([QAPair.new(chunk.chunk_id, chunk.doc_id, q, a, "train") for q, a in PAIRS])
    index_stage(settings, "release-1")
    trained = train_stage(settings, "release-2")
    assert trained.version == 1, trained
    from tasks.stages.promote import promote_version

    promote_version(settings, 1, reason="release-home fixture", force=True, actor="fixture")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (RELEASE_HOME / "BUILT_BY").write_text(f"moral-refresh 0.1.0 at {commit}\n", encoding="utf-8")
    with tarfile.open(ARCHIVE, "w:gz") as tar:
        tar.add(RELEASE_HOME, arcname=RELEASE_HOME.name)
    print(ARCHIVE, ARCHIVE.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
