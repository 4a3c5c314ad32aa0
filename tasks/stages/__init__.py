"""The refresh stages as plain functions over the registry, the index and the adapter store.

The rule of ``tasks/``: a module at the top (``tasks/ingest.py``, ``tasks/qa.py``, ...) is pure code on
records, texts and files, and never opens the registry; ``tasks/stages/<stage>.py`` is that stage's
registry-facing function, which reads what it needs, drives the pure modules and writes the result
back in batched transactions.  Every stage is idempotent: it only acts on what the registry says is
still to do, so a rerun or a run resumed after a crash repeats nothing it already paid for.  Models
and the embedding model are loaded only when a stage has work.  The Prefect ``@task`` wrappers are
in :mod:`flows.prefect_tasks`; tests call these functions directly.

This package imports none of its modules, so importing one stage never loads the others.
"""
