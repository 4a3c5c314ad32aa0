"""Thin Prefect wrappers over :mod:`tasks.stages`: names, retries and logging, no logic.

Idempotency lives in the registry (each stage acts only on what is still to do), not in Prefect's
result cache, so caching is off: inputs include the settings, and a cached result could hide a
registry change made between runs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from storage.settings import Settings
from tasks.stages.evaluate import EvaluateSummary, evaluate_stage
from tasks.stages.index import IndexSummary, index_stage
from tasks.stages.ingest import IngestSummary, ingest_stage
from tasks.stages.promote import PromoteSummary, promote_stage
from tasks.stages.qa import QASummary, qa_stage
from tasks.stages.train import TrainSummary, train_stage


def _logger_progress():
    logger = get_run_logger()
    return logger.info


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(settings: Settings, source: Path, run_id: str) -> IngestSummary:
    return ingest_stage(settings, source, run_id, progress=_logger_progress())


@task(name="generate-qa", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def generate_qa(settings: Settings, run_id: str, chunk_ids: list[str] | None = None) -> QASummary:
    # A retry is cheap: every response already paid for is in the registry's LLM cache.
    return qa_stage(settings, run_id, progress=_logger_progress(), chunk_ids=chunk_ids)


@task(name="dedup-and-index", cache_policy=NO_CACHE)
def dedup_and_index(settings: Settings, run_id: str) -> IndexSummary:
    return index_stage(settings, run_id, progress=_logger_progress())


@task(name="train", cache_policy=NO_CACHE)
def train(settings: Settings, run_id: str) -> TrainSummary:
    return train_stage(settings, run_id, progress=_logger_progress())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(settings: Settings, run_id: str, version: int) -> EvaluateSummary:
    return evaluate_stage(settings, run_id, version, progress=_logger_progress())


@task(name="promote", cache_policy=NO_CACHE)
def promote(settings: Settings, run_id: str, version: int) -> PromoteSummary:
    return promote_stage(settings, run_id, version, progress=_logger_progress())
