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
    # "ignore / disregard ... previous instructions" (the object must be the prompt's own rules)
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}?\b(?:previous|prior|above|earlier|"
    r"preceding|all|any|your|these|those)\s+(?:\w+\s+){0,2}?(?:instructions?|prompts?|rules|"
    r"directions|guidelines)\b"
    r"|\b(?:system|developer)\s+(?:prompt|message)\b"
    r"|\bnew\s+instructions?\s*:"
    r"|\byou\s+are\s+now\s+(?:a|an|in)\s+(?:\w+\s+){0,2}?(?:mode|assistant|ai|bot|model|persona)\b"
    r"|\bas\s+an?\s+(?:ai|large\s+language\s+model|language\s+model)\b"
    r"|<\|[a-z_]+\|>|\[/?inst\]"
    # a chat-role line: "system:" / "assistant:" followed by an order, not "System: 4-core ARM"
    r"|^\s*(?:system|assistant)\s*:\s*(?:you|ignore|always|never|reply|respond|answer)\b"
    # an order to reply that opens the sentence: "Reply with X", "Respond only with ..."
    r"|^\s*(?:please\s+)?(?:reply|respond|answer|output|say)\s+(?:only\s+|always\s+)?(?:with|that|:|\")"
    r"|\b(?:reply|respond)\s+(?:only\s+)?with\s+(?:the\s+)?(?:word|text|phrase|string)\b",
    re.I | re.M,
)


#: A segment for the instruction check: up to a sentence end followed by space, or a line break
#: (finer than tasks.chunking.split_sentences, so only the offending words are dropped).
_SEGMENT = re.compile(r"[^\n]*?(?:[.!?](?=\s)|(?=\n)|$)", re.S)


def _segments(text: str) -> list[tuple[int, int]]:
    spans, at = [], 0
    while at < len(text):
        m = _SEGMENT.match(text, at)
        end = m.end() if m and m.end() > at else len(text)
        spans.append((at, end))
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return [(a, b) for a, b in spans if text[a:b].strip()]


def instruction_sentences(text: str) -> list[str]:
    """The sentences (or lines) of ``text`` that give orders to a language model (``_INSTRUCTION``)."""
    return [text[a:b].strip() for a, b in _segments(text) if _INSTRUCTION.search(text[a:b])]


def knowledge_text(text: str) -> str:
    """``text`` without its instruction-like sentences: what QA generation reads and grounds
    answers in, so an order planted in a document never reaches the LLM nor becomes a pair.
    The same string when there are none (so its cache key is unchanged)."""
    drop = [(a, b) for a, b in _segments(text) if _INSTRUCTION.search(text[a:b])]
    if not drop:
        return text
    out, at = [], 0
    for a, b in drop:
        out.append(text[at:a])
        at = b
    out.append(text[at:])
    return "".join(out)
