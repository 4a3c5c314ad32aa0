"""kill -9 during a refresh, then a rerun (issue: nothing lost to a crash). A bounded set of kill
points here; every point, with timings, in ``bench/crash.py``."""

from __future__ import annotations

import pytest

from tests.crash import check_home, kill_and_rerun, refresh_env, run_refresh

pytestmark = pytest.mark.integration

#: Mid-QA (replies cached, more to come), mid-index (registry written, Chroma not), and the adapter
#: written but not registered: the three places where two stores can disagree.
POINTS = ("qa.cached:2", "index.registry", "train.artifact")


def test_a_refresh_killed_anywhere_resumes_without_duplicates_or_paying_twice(
    settings, tmp_path, tiny_model_dir, llm_endpoint, source_dir
):
    reference_home = tmp_path / "clean"
    clean = run_refresh(source_dir, refresh_env(reference_home, tiny_model_dir, llm_endpoint.base_url))
    assert clean.returncode == 0, clean.stderr[-2000:]
    reference_calls = llm_endpoint.calls
    reference = check_home(reference_home)
    assert reference.problems == [] and reference.counts["versions"] == 1 and reference.counts["pairs"] > 0
    results = [
        kill_and_rerun(p, tmp_path, source_dir, tiny_model_dir, llm_endpoint, reference, reference_calls)
        for p in POINTS
    ]
    assert all(r.killed for r in results), [(r.point, r.problems) for r in results]
    assert [(r.point, r.problems) for r in results] == [(p, []) for p in POINTS]
