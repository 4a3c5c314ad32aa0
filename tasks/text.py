"""Text helpers shared by ingest, QA generation, dedup and evaluation.

What counts as "the same answer" is defined once, in :mod:`storage.text` (`normalize_answer`,
`normalize_question`, `contains_span`, `numbers`); the helpers here build on it.  Hashes are sha256
over parts joined by a unit separator, so ("ab", "c") and ("a", "bc") differ.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

from storage.text import contains_span, normalize_answer, normalize_question, numbers

__all__ = [
    "STOPWORDS",
    "contains_span",
    "content_words",
    "normalize_answer",
    "normalize_question",
    "normalize_whitespace",
    "numbers",
    "qa_key",
    "sha256_text",
    "stable_hash",
    "token_f1",
]

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# Control characters other than \n and \t (which the whitespace normaliser handles).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")

#: Small English stopword list for "content word" checks (question/sentence overlap); no NLTK needed.
STOPWORDS = frozenset(
    """a an the and or but if of at by for with about against between into through during before after
    above below to from up down in out on off over under again further then once here there when where
    why how all any both each few more most other some such no nor not only own same so than too very
    can will just should now is are was were be been being have has had having do does did doing what
    which who whom whose this that these those am i me my we our you your he him his she her it its they
    them their as also per vs""".split()
)


def content_words(text: str) -> set[str]:
    """Normalised non-stopword tokens of `text`."""
    return {w for w in normalize_answer(text).split() if w not in STOPWORDS}


def token_f1(a: str, b: str) -> float:
    """Token-level F1 between two normalised strings (SQuAD style)."""
    ta, tb = normalize_answer(a).split(), normalize_answer(b).split()
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def stable_hash(*parts: object, length: int = 64) -> str:
    """Hex sha256 over `parts` (str() of each) joined by a unit separator; truncated to `length`."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:length]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def qa_key(question: str, answer: str) -> str:
    """Exact-duplicate key of a QA pair: hash of the normalised question and normalised answer."""
    return stable_hash(normalize_question(question), normalize_answer(answer), length=32)


def normalize_whitespace(text: str) -> str:
    """NFC, control characters dropped, runs of spaces collapsed, lines stripped, at most one blank
    line in a row (paragraph breaks survive: the sentence splitter uses them)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text).replace("\t", " ")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------------------------------
# Instructions planted in documents (prompt injection)
#: Sentences that address a language model rather than state a fact: override phrases, role or
#: prompt talk, chat-template markers, and sentences that open with an order to reply.
_INSTRUCTION = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}?\b(?:previous|prior|above|earlier|"
    r"preceding|all|any|your|the|these|those)\b[^.!?\n]{0,30}?\b(?:instructions?|prompts?|rules|"
    r"directions|guidelines|context|messages?)\b"
    r"|\b(?:system|developer)\s+(?:prompt|message|instructions?)\b"
    r"|\bnew\s+instructions?\b|\byou\s+are\s+now\b|\bas\s+an?\s+(?:ai|language\s+model|assistant)\b"
    r"|<\|[a-z_]+\|>|\[/?inst\]|^\s*(?:system|assistant|user)\s*:"
    r"|^\s*(?:please\s+)?(?:reply|respond|output|say)\b"
    r"|\b(?:reply|respond)\s+(?:only\s+)?with\s+(?:the\s+)?(?:word|text|phrase|string|answer)\b",
    re.I | re.M,
)


def instruction_sentences(text: str) -> list[str]:
    """The sentences of ``text`` that give orders to a language model (see ``_INSTRUCTION``)."""
    from tasks.chunking import split_sentences

    return [s for s in split_sentences(text) if _INSTRUCTION.search(s)]


def knowledge_text(text: str) -> str:
    """``text`` without its instruction-like sentences: what QA generation reads and grounds
    answers in, so an order planted in a document never reaches the LLM nor becomes a pair.
    Unchanged (the same string) when there are none."""
    planted = instruction_sentences(text)
    if not planted:
        return text
    out = text
    for sentence in planted:
        out = out.replace(sentence, " ")
    if any(s in out for s in planted):  # a sentence split differently from the raw text
        from tasks.chunking import split_sentences

        out = " ".join(s for s in split_sentences(text) if s not in planted)
    return out
