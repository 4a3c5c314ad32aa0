"""The knowledge benchmark's corpus is fixed: its files are pinned by sha256 (later work never edits
them; choices are made on `tune`, targets read on `report`), and its static checks pass."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "bench" / "knowledge"

PINNED = {
    "docs/edited/ardwyn-seed-vault-report.md": "2bd98c7b80b743724177dddebda38178f7d0f60ee0ee92b0d518c2eae5cfb968",
    "docs/edited/quenby-robotics-profile.pdf": "9cb74c5f0d99192f8ddb4d196120a62798db5b850b1a156e13ab58949aab2d48",
    "docs/part1/ardwyn-seed-vault-report.md": "18d72fcfecbcfdaa58ea1876a76a76ae3c4c47e330cb04ec160590deeed09cc8",
    "docs/part1/ebbrick-ferry-line-2025.pdf": "fdb1813182f7c468b0e73834c03c42486993d4d73a085f71d5c497ba6915536b",
    "docs/part1/museum-of-tin-and-salt.html": "53c7a85509f6f0b93c08ab3df641f25b9f5ad3eef7d62489b7b0030fec186b3c",
    "docs/part1/vellmarch-chess-club.txt": "7b6aa9ea70d487a1205a3f9848449d65eac6b07ca82ad3e8e3909fbf39849883",
    "docs/part2/drennick-budget-2026.txt": "1307596597da42c75294e14225484810c4dca943ece2d14e839c6d34902e85ef",
    "docs/part2/hollin-brook-brewery.md": "a9e4cd59a96a73e1e2b86033675ebdff39ec0e71048030d0869369c9789d5bb8",
    "docs/part2/quenby-robotics-profile.pdf": "f4ff7badc67b6add081b29c76d32ae4d4cdb3e27f5b9b68490a461665ab74ace",
    "docs/part2/rv-ostrel-dawn.html": "c0851e142f115f710f9b77bc24c50642b91ae2788427ed74053b6749aa8a1acd",
    "docs/part3/fennimore-lane-clinic.md": "3424f46492546a7524d45b56b2dbd2c1fa7a9e595e4bf574f80f04135109e792",
    "docs/part3/saddlecombe-textile-mill.pdf": "13e74df05c2675e760f23c834564844baf9e020e78368a2b352eaa22b2577361",
    "docs/part3/skarnal-hut-association.html": "4475a707c10817667a3a43e0fb541e6b511e99f0497148943468b2b6854d516d",
    "docs/part3/tallith-ledger-4-2-release.txt": "c97daf3430da3fc74f287a2079d1a5375057476c3cbfeef2574d804b752dd088",
    "edit_questions.jsonl": "c31aaab2cd50f5312c21b1c4a2c5d99022820af99a5c15f5ac86f0374c9825da",
    "facts.jsonl": "bab59d359ae3dcdae42c415244ab79200a8c55a6e4bf5c80453a5b73b6e29a0b",
    "questions.jsonl": "cd80b706cf26983a42ac744430d3772be60b5f7be639683283667572850f0bad",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corpus_files_are_pinned():
    files = {
        str(p.relative_to(CORPUS)): _sha(p)
        for p in sorted(CORPUS.rglob("*"))
        if p.is_file() and (p.suffix in {".jsonl", ".pdf", ".md", ".txt", ".html"}) and p.name != "README.md"
    }
    assert files == PINNED


def test_questions_are_split_and_grouped_as_documented():
    questions = [json.loads(x) for x in (CORPUS / "questions.jsonl").read_text().splitlines() if x.strip()]
    groups = {
        g: [q for q in questions if q["group"] == g] for g in ("trained", "document_only", "unanswerable")
    }
    assert len(groups["trained"]) + len(groups["document_only"]) >= 150
    assert (
        len(groups["document_only"]) >= 50
        and len(groups["trained"]) >= 50
        and len(groups["unanswerable"]) >= 20
    )
    for qs in groups.values():  # a third tune, two thirds report, in every group
        tune = sum(q["split"] == "tune" for q in qs)
        assert abs(tune - len(qs) / 3) <= 1
    assert all(q["answers"] for q in groups["trained"] + groups["document_only"])
    assert all(not q["answers"] for q in groups["unanswerable"])


def test_static_corpus_checks_pass():
    proc = subprocess.run(
        [sys.executable, str(CORPUS / "check_corpus.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
