"""The one answer normalisation: what scoring, QA grounding, dedup and the stored keys call "the same".

It keeps what changes a fact and unifies what does not:

* kept: decimal points and colons between digits ("2.4" ≠ "24", "3.6 m" ≠ "36 m"), a minus sign in
  front of a number ("−3" ≠ "3"), every digit;
* unified: case, articles (answers only), Unicode forms (NFKC, accents), punctuation, whitespace,
  thousands separators (a comma followed by exactly three digits: "1,150" = "1150"), leading zeros
  of a number ("06:15" = "6:15"), a bare decimal (".5" = "0.5"), "%" = "percent", a unit glued to
  its number ("2.4kg" = "2.4 kg"); currency symbols stay tokens ("$1,150" ≠ "€1,150").

Text becomes tokens: numbers (``-?\\d+`` with ``.``/``:`` groups), codes that start with a letter
("q7", "ip54" stay whole, so the 7 of "Q7" is not a number of the answer), and words.  Storage
(question keys, the dedup key in Chroma, fact ids) and the tasks (metrics, grounding, dedup) all use
these functions; a stored key is re-derived by a migration when they change (``KEY_VERSION``).
"""

from __future__ import annotations

import re
import unicodedata

#: Bumped whenever the functions below would map some text to a different key.
KEY_VERSION = 2

_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BARE_DECIMAL = re.compile(r"(?<![\w.])(-?)\.(?=\d)")  # ".5" is "0.5"
# Tokens: a signed number (a '-' that does not follow a word character or a '.', directly before a
# digit); a run ending in a digit with '.'/':' digit groups ("2.4", "6:15", "v2.4.1"); a word or code;
# a currency symbol (a different currency is a different fact).
_TOKEN = re.compile(r"(?<![\w.])-\d+(?:[.:]\d+)*|[^\W_]*\d(?:[.:]\d+)+|[^\W_]+|[$\u00a2-\u00a5\u20a0-\u20c0]")
_NUMBER = re.compile(r"-?\d+(?:[.:]\d+)*")
_NUMBER_UNIT = re.compile(r"(-?\d+(?:[.:]\d+)*)([^\W\d_]+)")
_LEADING_ZEROS = re.compile(r"^(-?)0+(?=\d)")
ARTICLES = frozenset({"a", "an", "the"})


def _fold(text: str) -> str:
    """NFKC, case-folded, accents removed, minus signs unified, thousands separators dropped."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_MINUS)
    decomposed = unicodedata.normalize("NFKD", text)
    text = unicodedata.normalize("NFC", "".join(ch for ch in decomposed if not unicodedata.combining(ch)))
    text = _BARE_DECIMAL.sub(r"\g<1>0.", _THOUSANDS.sub("", text))
    return text.replace("%", " percent ")


def tokens(text: str) -> list[str]:
    """The normalised tokens of ``text`` (articles kept)."""
    out: list[str] = []
    for tok in _TOKEN.findall(_fold(text)):
        glued = _NUMBER_UNIT.fullmatch(tok)
        parts = [glued.group(1), glued.group(2)] if glued else [tok]
        for part in parts:
            out.append(_LEADING_ZEROS.sub(r"\1", part) if _NUMBER.fullmatch(part) else part)
    return out


def is_number(token: str) -> bool:
    return _NUMBER.fullmatch(token) is not None


def numbers(text: str) -> list[str]:
    """The number tokens of ``text``, normalised ("1,150" → "1150"; the 7 of "Q7" is not one)."""
    return [t for t in tokens(text) if is_number(t)]


def normalize_answer(text: str) -> str:
    """Answer form for every comparison: normalised tokens, articles dropped, single spaces."""
    return " ".join(t for t in tokens(text) if t not in ARTICLES)


def normalize_question(text: str) -> str:
    """Question form (articles kept: "a" vs "the" changes a question's wording more than its meaning
    less often than it changes what it asks)."""
    return " ".join(tokens(text))


def contains_span(haystack: str, needle: str) -> bool:
    """True when normalised ``needle`` occurs as a whole-token span of normalised ``haystack``."""
    n = normalize_answer(needle)
    return bool(n) and f" {n} " in f" {normalize_answer(haystack)} "


def fact_key(answer: str) -> str:
    """The value an answer states: its numbers in order, each with the first letters of the word
    after it (its unit: "2.4 kg" = "2.4 kilograms" ≠ "2.4 m"), when it has any; else its normalised
    words.  Two answers with one key in one document are one fact (see ``fact_id_for``)."""
    toks = [t for t in tokens(answer) if t not in ARTICLES]
    if not any(is_number(t) for t in toks):
        return " ".join(toks)
    parts = []
    for i, t in enumerate(toks):
        if is_number(t):
            unit = toks[i + 1] if i + 1 < len(toks) and not is_number(toks[i + 1]) else ""
            parts.append(f"{t}{unit[:1]}")
    return "#" + " ".join(parts)
