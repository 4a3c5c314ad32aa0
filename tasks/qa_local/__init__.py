"""The embedded, offline QA generator on the bundled SmolLM2-135M-Instruct (the default QA backend).

One concept a module: :mod:`.lexicon` (the English rules, word lists and patterns),
:mod:`.facts` (which spans of a chunk become questions), :mod:`.checks` (what a generated question
must pass, and the rule-based rewordings) and :mod:`.generator` (:class:`LocalQAGenerator`, its
prompts and its batched decoding loop).  The names below are the package's public surface.
"""

from tasks.qa_local.checks import (
    check_question,
    clean_question,
    framed,
    name_aliases,
    names_entity,
    renamed,
    reworded,
    situated,
    synonymed,
)
from tasks.qa_local.facts import Candidate, answer_candidates, select_candidates
from tasks.qa_local.generator import LOCAL_PROMPT_VERSION, SHOTS, SYSTEM, LocalQAGenerator, _buckets

__all__ = [
    "LOCAL_PROMPT_VERSION",
    "SHOTS",
    "SYSTEM",
    "Candidate",
    "LocalQAGenerator",
    "_buckets",
    "answer_candidates",
    "check_question",
    "clean_question",
    "framed",
    "name_aliases",
    "names_entity",
    "renamed",
    "reworded",
    "select_candidates",
    "situated",
    "synonymed",
]
