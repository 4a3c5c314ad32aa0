"""kill -9 at every failpoint of a refresh, then a rerun: the crash contract checked at each point.

Each point (``storage.failpoints.POINTS``) gets a fresh data home: a real ``moral refresh`` process
with the tiny model and a loopback LLM endpoint is SIGKILLed there, run again, and the home checked
(``tests/crash.py``: no duplicated chunk, pair, document or vector; registry and Chroma agree; every
version verifies; counts equal a clean run's; at most the one in-flight LLM prompt paid twice).

    PYTHONPATH=. .venv/bin/python bench/crash.py [--points qa.cached:2,train.artifact] [--work DIR]

Prints one JSON object: per point, killed / rerun ok / problems / extra LLM calls / seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from storage.failpoints import POINTS
    from tests.corpus import copy_core
    from tests.crash import check_home, kill_and_rerun, refresh_env, run_refresh
    from tests.moe.tiny import save_tiny_base
    from tests.tasks.llm_server import LLMServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--points", help="comma-separated failpoints (name or name:n); default: all, qa.cached at its 2nd hit"
    )
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    points = (
        args.points.split(",") if args.points else [p + (":2" if p == "qa.cached" else "") for p in POINTS]
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="moral-crash-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / "tiny-base"
    base.mkdir()
    save_tiny_base(base)
    source = copy_core(work / "docs")  # the demo folder's four core documents, one per format
    llm = LLMServer().start()
    try:
        start = time.perf_counter()
        clean = run_refresh(source, refresh_env(work / "clean", base, llm.base_url))
        if clean.returncode != 0:
            print(clean.stderr[-3000:], file=sys.stderr)
            return 1
        reference_calls, reference = llm.calls, check_home(work / "clean")
        clean_s = time.perf_counter() - start
        results = [kill_and_rerun(p, work, source, base, llm, reference, reference_calls) for p in points]
    finally:
        llm.stop()
    print(
        json.dumps(
            {
                "command": "python bench/crash.py" + (f" --points {args.points}" if args.points else ""),
                "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
                "clean_run": {"seconds": round(clean_s, 1), "llm_calls": reference_calls, **reference.counts},
                "points_tried": len(results),
                "points_passed": sum(r.killed and not r.problems for r in results),
                "results": [
                    {
                        "point": r.point, "killed": r.killed, "rerun_ok": r.rerun_ok, "problems": r.problems,
                        "llm_calls": r.llm_calls, "extra_llm_calls": r.extra_llm_calls, "seconds": round(r.seconds, 1),
                    }
                    for r in results
                ],
            },
            indent=1,
        )
    )  # fmt: skip
    return 0 if all(r.killed and not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
