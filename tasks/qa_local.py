"""The embedded, offline QA generator on the bundled SmolLM2-135M-Instruct.

A 135M model cannot be trusted to pick answers or emit JSON, so it is asked for far less: the
*answer* is chosen by rules (a number with its unit, money, a percentage, a date, a time, a name) and
is therefore grounded by construction; the opening of the question is chosen by rules too (from the
answer's type, or "What is the <noun phrase>" for "<noun phrase> of <answer>"); the model only
completes the question, greedily, all prompts of a batch of chunks in one batched model call. Every
question is then checked strictly and dropped when it fails.

Each fact (sentence, answer span) is asked `variants` times in different wording, with the same
answer: a rule-only template where the sentence allows one ("<the subject> is <answer>" -> "What is
<the subject>?", "<X>, chaired by <person>" -> "Who chaired <X>?"), and model completions of different
openers ("What is the maximum payload ..." / "How much ..."); only when those do not give enough
distinct valid questions, a valid one is reopened by rule ("Who ..." / "Which person ...", "When ..." /
"On what date ...") or its subject named the other way ("the Quillfeather Q7" / "the Q7"). The training
data then holds several wordings of a fact and the question-hash split puts some in train and some in
the held-out eval: an eval question asks about a fact the adapter was trained on, in words it was not
trained on. `pairs_per_chunk` caps the facts per chunk; the pairs are up to pairs_per_chunk * variants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.chunking import split_sentences
from tasks.qa import Budget, GenerationResult, validate_pair
from tasks.text import STOPWORDS, content_words, normalize_answer, normalize_question

#: Part of the cache key of local generations: bump when prompts, rules or checks change.
LOCAL_PROMPT_VERSION = "local-qg-v2"

SYSTEM = "You turn a fact into a quiz question. Reply with the question only."
SHOTS = (
    (
        "The Eiffel Tower is 330 metres tall and was completed in 1889.",
        "330 metres",
        "How tall is the Eiffel Tower?",
    ),
    (
        "Marie Curie won the Nobel Prize in Chemistry in 1911.",
        "Marie Curie",
        "Who won the Nobel Prize in Chemistry in 1911?",
    ),
)

_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
)
_WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
# Not in the middle of another number or a name: the "1" of "2.1" or the "7" of "Q7" is no answer.
_NUM = r"(?<![\w.,])\d[\d,]*(?:\.\d+)?"
_INT = r"(?<![\w.,])\d[\d,]*(?![.,]?\d)"
_UNITS = {
    "weight": "kg|g|mg|t|tonnes?|tons?|kilograms?|grams?|lb|lbs|oz|ounces",
    "length": (
        "km|m|cm|mm|nm|mi|miles?|ft|feet|inch(?:es)?|metres?|meters?|kilometres?|kilometers?|"
        "centimetres?|centimeters?|millimetres?|millimeters?"
    ),
    "speed": "km/h|kph|mph|m/s|knots",
    "duration": (
        "hours?|hrs?|h|minutes?|mins?|min|seconds?|secs?|s|milliseconds?|ms|days?|weeks?|months?|years?"
    ),
    "power": "W|kW|MW|GW|watts?|kilowatts?|megawatts?|hp|horsepower",
    "battery": "mAh|Ah|Wh|kWh",
    "energy": "MWh|GWh|TWh",
    "temperature": "°C|°F|degrees(?: Celsius| Fahrenheit)?",
    "size": "KB|MB|GB|TB|kilobytes?|megabytes?|gigabytes?|terabytes?",
    "resolution": "megapixels?|MP",
    "other": "L|l|ml|mL|litres?|liters?|gallons?|V|A|Hz|kHz|MHz|GHz|dB|px|fps",
}
_CURRENCY_WORDS = "USD|EUR|GBP|NOK|SEK|DKK|CHF|dollars|euros|pounds|kroner|francs|yen"
_MONEY = (
    rf"[$€£¥]\s?{_NUM}(?:\s?(?:million|billion|thousand|bn|k)\b)?"
    rf"|{_NUM}\s?(?:million |billion )?(?:{_CURRENCY_WORDS})\b"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = (
    rf"\b(?:(?:{_MONTHS})\.?\s+{_DAY},?\s+\d{{4}}"  # March 5, 2024
    rf"|{_DAY}\s+(?:{_MONTHS})\s+\d{{4}}"  # 5 March 2024
    rf"|(?:{_MONTHS})\s+\d{{4}}"  # March 2024
    r"|\d{4}-\d{2}-\d{2})\b"  # 2024-03-05
)
_CLOCK = r"(?<![\d:])\d{1,2}:\d{2}(?![\d:])(?:\s?[ap]\.?m\.?)?"
_SPELLED = "two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
# Words ending in "s" that are no plural nouns: "412 staff across the campuses" is not a count of "across".
_NOT_PLURALS = "across|always|perhaps|towards|afterwards|besides|unless|whereas|plus|less|thus|as|is|was|has|does|its|this|his"
# "240 engineers", "20 new branches": an optional modifier (not itself a plural) and a plural noun.
_COUNT = (
    rf"(?:(?!(?:1[5-9]|20)\d\d\b){_INT}|\b(?:{_SPELLED}))(?:\s+[a-z-]*[a-rt-z])?"
    rf"\s+(?!(?:{_NOT_PLURALS})\b)(?:[a-z][a-z-]*s|people|children|staff|personnel|men|women)\b"
)
# Capitalised words, digits ("Q7", "5.2") and name particles between them ("Pieter de Vries").
_NAME = (
    r"\b[A-Z][\w'’-]*"
    r"(?:\s+(?:(?:de|van|von|der|den|da|di|du|la|le|bin|al)\s+)?(?:[A-Z][\w'’-]*|\d[\w-]*(?:\.\d+)*))*"
)
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("money", re.compile(_MONEY)),
    ("percent", re.compile(rf"{_NUM}\s?(?:%|percent\b|per cent\b)")),
    ("date", re.compile(_DATE)),
    (
        "time",
        re.compile(rf"{_CLOCK}\s?(?:to|-|–|until)\s?{_CLOCK}|(?<=between ){_CLOCK} and {_CLOCK}|{_CLOCK}"),
    ),
    *[(f"quantity:{k}", re.compile(rf"{_NUM}\s?(?:{v})(?![\w/])")) for k, v in _UNITS.items()],
    ("year", re.compile(r"\b(?:1[5-9]\d\d|20\d\d)\b")),
    ("weekday", re.compile(rf"\b(?:{_WEEKDAYS})s?\b")),
    ("count", re.compile(_COUNT)),
    ("name", re.compile(_NAME)),
    ("number", re.compile(rf"{_NUM}(?![\w%])")),  # a bare number: only with a template ("... is 32")
]
# Priority of answer kinds: facts with numbers make the most checkable questions.
_SCORE = {
    "money": 5,
    "percent": 5,
    "date": 5,
    "quantity": 5,
    "time": 4,
    "year": 4,
    "count": 4,
    "person": 4,
    "org": 4,
    "weekday": 3,
    "place": 3,
    "name": 2,
    "number": 4,
}
_DURATION_NOUNS = {"hours", "minutes", "seconds", "days", "weeks", "months", "years"}
_PLACE_PREP = {"in", "at", "from", "near", "to", "into", "between"}
_TITLES = {"dr", "mr", "mrs", "ms", "prof", "professor", "captain", "capt", "sir", "dame"}
_ROLES = {
    "ceo", "founder", "engineer", "director", "manager", "officer", "master", "chief", "executive",
    "president", "chair", "chairman", "chairwoman", "head", "minister", "mayor", "editor", "author",
    "architect", "designer", "inventor", "leader", "secretary", "treasurer", "chancellor", "dean",
}  # fmt: skip
_PERSON_CUES = {"by"} | _TITLES | _ROLES
_ORG_WORDS = {
    "labs", "works", "inc", "ltd", "llc", "gmbh", "plc", "bank", "group", "company", "corporation", "corp",
    "logistics", "authority", "institute", "university", "systems", "technologies", "industries",
    "association", "council", "agency", "ministry", "department", "foundation", "society", "studio", "studios",
}  # fmt: skip
# A capitalised word after one of these nouns is a label: "code name Kestrel", "priority P1".
_LABEL_NOUNS = {"name", "codename", "priority", "model", "type", "class", "grade", "level", "version", "tier"}
_NOT_NAMES = (
    set(_MONTHS.lower().split("|"))
    | set(_WEEKDAYS.lower().split("|"))
    | STOPWORDS
    | {"its", "their", "field"}
)
_CHANGE_VERBS = {"reduced", "raised", "increased", "lowered", "cut", "set", "limited", "capped", "extended"}
_CLAUSE_BREAKS = {"that", "which", "who", "and", "but", "while", "because", "where", "when", "whereas", "if"}
_PRONOUN_DETS = {"its", "their", "his", "her", "our"}
# Words a question may use that its source sentence need not contain.
_QUESTION_WORDS = frozenset(
    "much many long far fast tall big high old large percentage percent year years total number amount "
    "name named called kind type date day time does did often frequently heavy weight speed size "
    "capacity resolution place person hours".split()
)
_META = re.compile(
    r"\b(the (text|passage|sentence|fact|answer|document|following)|this (sentence|fact|text)"
    r"|which (one )?of (these|them)|true or false|a lie|(correct|valid|right) answer)\b",
    re.I,
)
# Words that give a question away as asking for another kind of answer: "How much does a yacht weigh?"
# for "3.20 pounds" (a fee), "How long ... cost?" for a duration.
_WRONG_WORDS = {
    "money": {"weigh", "weighs", "weight", "heavy", "far", "fast", "tall", "long", "old"},
    "quantity:weight": {"cost", "costs", "price", "pay", "paid", "fee", "far", "fast", "long", "tall", "old"},
    "quantity:length": {"weigh", "weighs", "heavy", "cost", "costs", "price", "fast", "old"},
    "quantity:duration": {"weigh", "weighs", "heavy", "cost", "costs", "price", "far", "tall"},
    "quantity:speed": {"weigh", "weighs", "heavy", "cost", "costs", "price", "old"},
}


@dataclass(frozen=True)
class Candidate:
    """One fact to ask about: a sentence, an answer span of it and the ways to open its question."""

    sentence: str
    answer: str
    kind: str
    opener: str  # the question's first words, given to the model (variant 1)
    score: float
    alt_openers: tuple[str, ...] = ()  # other first words for the other variants, best first
    template: str | None = None  # a whole question from rules alone, when the sentence allows one
    context: str | None = None  # the sentence as shown to the model: 'It' replaced by its subject

    @property
    def fact(self) -> str:
        return self.context or self.sentence

    @property
    def openers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.opener, *self.alt_openers)))


def _bare(word: str) -> str:
    return word.strip(",;:()\"'").lower()


def _noun_phrase_before_of(words: list[str]) -> str | None:
    """For '... a maximum payload of <answer>' return 'maximum payload' (up to 3 words back)."""
    if not words or words[-1].lower() != "of":
        return None
    phrase: list[str] = []
    for w in reversed(words[:-1]):
        bare = _bare(w)
        if not bare or bare in STOPWORDS or not bare.isalpha() or len(phrase) == 3 or w[-1] in ",;:":
            break
        phrase.insert(0, bare)
    return " ".join(phrase) or None


def _subject(words: list[str], *, anchored: bool = True) -> list[str] | None:
    """The noun phrase a clause ends with, from its determiner: 'Fees The mooring fee for visiting
    yachts' -> 'The mooring fee for visiting yachts'; None without a determiner or with punctuation.
    `anchored`: the phrase is the clause's subject (only a glued heading may precede it); otherwise
    it is the phrase after the clause's last determiner ('join the quarterly planning day')."""
    start = 0
    for j, w in enumerate(words):
        if w[-1] in ",;:(" or w.lower() in _CLAUSE_BREAKS:
            start = j + 1
    words = words[start:]
    dets = [j for j, w in enumerate(words) if w.lower() in {"the"} | _PRONOUN_DETS]
    det = (dets[0] if anchored else dets[-1]) if dets else None
    if det is None and anchored:
        # "Core hours and meetings Core collaboration hours": a heading glued to a plain noun phrase
        heads = [j for j, w in enumerate(words) if w[:1].isupper() and (j == 0 or words[j - 1].islower())]
        tail = words[heads[-1] :] if heads else []
        if 2 <= len(tail) <= 5 and all(w.islower() and w.isalpha() for w in tail[1:]) and tail[0].isalpha():
            return ["the", tail[0].lower(), *tail[1:]]
        return None
    if det is None or (anchored and not all(w[:1].isupper() for w in words[:det])):
        return None  # "camera of the Q7 is ...": a cut-off clause; "Fees The mooring fee": a glued heading
    words = words[det:]
    if not 2 <= len(words) <= 12 or not all(re.fullmatch(r"[\w'’-]+", w) for w in words):
        return None
    return words


def _template(words: list[str], kind: str, count_noun: str | None) -> tuple[str | None, str | None, bool]:
    """A rule-only question for '<the subject> is [now] [raised to] [the] <answer>', '<the subject> has
    <count>' and '<the thing>, called <name>'; returns (question, head noun phrase, subject is a role)."""
    i = len(words)
    low = [_bare(w) for w in words]
    if kind in {"person", "org"}:
        who = _passive_who(words, low)
        if who:
            return who, None, True
    called = i >= 1 and low[i - 1] in {"called", "named"}
    if called:
        i -= 1
    while i and low[i - 1].rstrip(".") in _TITLES | {"the", "a", "an"} and not called:
        i -= 1  # "is the Auk-48", "is Dr. Ilse Varnholt"
    changed = False
    if i >= 2 and low[i - 1] == "to" and low[i - 2] in _CHANGE_VERBS:
        i, changed = i - 2, True  # "is reduced to 5 knots"
    elif i >= 4 and low[i - 1] == "to" and low[i - 3] == "from" and low[i - 4] in _CHANGE_VERBS:
        i, changed = i - 4, True  # "was raised from 25 to 32"
    if i and low[i - 1] in {"now", "currently", "still"}:
        i -= 1
    if called and i and words[i - 1].endswith(","):  # "the quarterly planning day, called Fen Day"
        subj = _subject([*words[: i - 1], words[i - 1].rstrip(",")], anchored=False)
        verb = "is"
    elif i and low[i - 1] in {"is", "are", "was", "were"} and words[i - 1][-1].isalpha():
        subj, verb = _subject(words[: i - 1]), low[i - 1]
        if changed:  # "was raised to 32": 32 is what it is now
            verb = "are" if verb in {"are", "were"} else "is"
    elif i and low[i - 1] in {"has", "have"} and count_noun and words[i - 1][-1].isalpha() and not called:
        subj = _subject(words[: i - 1])
        if subj is None or subj[0].lower() in _PRONOUN_DETS:
            return None, None, False
        aux = "does" if low[i - 1] == "has" else "do"
        return f"How many {count_noun} {aux} {' '.join(['the', *subj[1:]])} have?", None, False
    else:
        return None, None, False
    if subj is None:
        return None, None, False
    role = any(_bare(w) in _ROLES for w in subj)
    rest = subj[1:]
    head_words: list[str] = []
    for w in rest:
        if _bare(w) in STOPWORDS or not w.isalpha():
            break
        head_words.append(w.lower())
    head = " ".join(head_words) if head_words and not called else None
    if subj[0].lower() in _PRONOUN_DETS:  # "its maximum service ceiling": no subject to name
        return None, head, role
    np_ = " ".join(["the", *rest])
    if called:
        return f"What {verb} {np_} {low[len(words) - 1]}?", None, False
    wh = "Who" if kind == "person" or (kind == "name" and role) else "What"
    return f"{wh} {verb} {np_}?", head, role


def _passive_who(words: list[str], low: list[str]) -> str | None:
    """'<the subject> was led by [engineering manager] <person>' -> 'Who led the subject?';
    '<The subject>, chaired by [Professor] <person>' -> 'Who chaired the subject?'."""
    i = len(words)
    while i and low[i - 1].rstrip(".") in _TITLES:
        i -= 1
    if i and words[i - 1].endswith(",") and low[i - 1] in _ROLES:  # "The harbour master, Captain <person>"
        subj = _subject([*words[: i - 1], words[i - 1].rstrip(",")])
        return f"Who is {' '.join(['the', *subj[1:]])}?" if subj and subj[0].lower() == "the" else None
    if i and low[i - 1] in _ROLES:  # "engineering manager"
        i -= 1
        if i and low[i - 1].isalpha() and low[i - 1] not in STOPWORDS and words[i - 1].islower():
            i -= 1
    if i < 3 or low[i - 1] != "by" or not re.fullmatch(r"[a-z]+", words[i - 2]):
        return None
    verb = words[i - 2]
    if not (
        verb.endswith("ed") or verb in {"made", "led", "built", "run", "won", "written", "held", "given"}
    ):
        return None
    if low[i - 3] in {"is", "are", "was", "were"} and words[i - 3].isalpha():
        subj = _subject(words[: i - 3])
    elif words[i - 3].endswith(","):
        subj = _subject([*words[: i - 3], words[i - 3].rstrip(",")])
    else:
        return None
    if subj is None or subj[0].lower() in _PRONOUN_DETS:
        return None
    return f"Who {verb} {' '.join(['the', *subj[1:]])}?"


def _plural_unit(answer: str) -> str | None:
    """'47 minutes' -> 'minutes' (a spelled-out plural unit makes a 'How many <unit>' opener)."""
    last = answer.split()[-1] if len(answer.split()) > 1 else ""
    return last if len(last) >= 4 and last.isalpha() and last.islower() and last.endswith("s") else None


def _kind_openers(kind: str, answer: str, prev: str, nouns: list[str], after: list[str]) -> list[str]:
    """Question openers for an answer of `kind`, best first (two or more where the kind allows)."""
    unit = _plural_unit(answer)
    how_many = [f"How many {unit}"] if unit else []
    family, _, sub = kind.partition(":")
    if family == "money":
        return ["How much", *(how_many or ["What amount"])]
    if family == "percent":
        return ["By what percentage", "By how much"] if prev == "by" else ["What percentage", "How much"]
    if family == "date":
        if re.fullmatch(rf"(?:{_MONTHS})\.?\s+\d{{4}}", answer):
            return ["When", "In which month"]
        return ["When", "On what date"]
    if family == "year":
        return ["In what year", "When"]
    if family == "time":
        return ["When", "Between which times"] if " " in answer else ["At what time", "When"]
    if family == "weekday":
        return ["On which day", "When"]
    if family == "count":
        noun = answer.split()[-1]
        return [f"How many {noun}", f"What number of {noun}"]
    if family == "quantity":
        if sub == "duration":
            if prev == "every":
                return ["How often", "How frequently"]
            if prev in {"within", "after", "in", "for", "under"} and unit:
                return ["How long", f"{prev.capitalize()} how many {unit}"]
            return ["How long", *(how_many or ["For how long"])]
        if sub == "length" and after and _bare(after[0]) in {"above", "high", "tall", "below", "deep"}:
            return ["How high", *how_many]
        first = {
            "weight": ["How much", "How heavy"],
            "length": ["How far", "How long"],
            "speed": ["How fast", "What speed"],
            "power": ["How powerful", "What power"],
            "battery": ["What is the capacity", "How big"],
            "energy": ["How much energy", "What amount of energy"],
            "temperature": ["What temperature", "At what temperature"],
            "size": ["What size", "How large"],
            "resolution": ["What resolution", "How many megapixels"],
        }.get(sub, ["What"])
        return [*first, *how_many]
    if family == "person":
        return ["Who", "Which person"]
    if family == "org":
        return ["Who", "Which organisation"]
    if family == "number":
        return ["How many", "What number"]
    if family == "place":
        alt = (
            f"{prev.capitalize()} which place" if prev in _PLACE_PREP and prev != "between" else "Which place"
        )
        return ["Where", alt]
    # A name: "the Tallyhome system" -> "Which system"; "code name Kestrel" -> "What code name".
    if prev in _LABEL_NOUNS:
        return [f"What {prev}", f"Which {prev}"]
    if nouns:
        noun = nouns[0]
        return [f"Which {noun}", f"What is the name of the {noun}"]
    return ["What", "Which"]


def _noun_after(sentence: str, end: int, prev: str) -> list[str]:
    """For 'the Skarv charging dock.' after the name 'Skarv' return ['charging dock'] (the thing the
    name names), for 'the Stillwater archive instead of' ['archive']; [] when no noun follows."""
    if prev != "the":
        return []
    words = sentence[end:].split()[:3]
    run: list[str] = []
    for w in words[:2]:
        bare = w.strip(",.;:")
        if not (bare.isalpha() and (bare.islower() or bare.isupper())) or bare.lower() in STOPWORDS:
            break
        if bare.islower() and (re.search(r"[^s]s$|ed$", bare)):
            break  # "the Institute lends", "the Q7 weighs": a verb, not the thing named
        run.append(bare)
        if w != bare:  # punctuation ends the noun phrase
            return [" ".join(run)]
    return run[:1]


def _name_tokens(m: re.Match[str]) -> tuple[list[tuple[int, int, str]], bool]:
    """(start, end, text) of the tokens of a name match that are the name, and whether a title led it:
    glued headings and possessives are cut off ("Policy 2026 The Harrowgate Fen Institute",
    "Institute's Gannet VPN"), so are leading articles, titles and months, and trailing stopwords."""
    toks = [(t.start() + m.start(), t.end() + m.start(), t.group(0)) for t in re.finditer(r"\S+", m.group(0))]
    cut = [k for k, t in enumerate(toks) if t[2].lower() in _NOT_NAMES or re.search(r"['’]s$", t[2])]
    if cut and cut[-1] < len(toks) - 1:
        toks = toks[cut[-1] + 1 :]
    titled = False
    while toks and (toks[0][2].lower() in _NOT_NAMES or toks[0][2].lower().rstrip(".") in _TITLES):
        titled = titled or toks[0][2].lower().rstrip(".") in _TITLES
        toks.pop(0)
    while toks and toks[-1][2].lower() in _NOT_NAMES:  # "Fees The" -> "Fees"
        toks.pop()
    return toks, titled


def answer_candidates(sentence: str) -> list[Candidate]:
    """Answer spans of one sentence with the question openers each suggests, best first."""
    found: list[Candidate] = []
    taken: list[tuple[int, int]] = []
    for pattern_kind, pattern in _PATTERNS:
        for m in pattern.finditer(sentence):
            start, end = m.span()
            if any(start < e and s < end for s, e in taken):
                continue  # inside a better span ("$1,299" is not also a count)
            kind = pattern_kind
            if kind == "name":
                toks, titled = _name_tokens(m)
                if not toks or re.search(r"-[a-z]", toks[-1][2]):
                    continue  # "Aurora-class": an adjective, not a name
                if start == 0 and toks[0][0] == 0 and len(toks) == 1:
                    continue  # a single capitalised sentence opener is usually just a word
                start, end = toks[0][0], toks[-1][1]
                if titled:
                    kind = "person"  # "Captain Renske Aalderink"
            answer = sentence[start:end].strip().rstrip(".,;:")
            before = sentence[:start].split()
            prev = _bare(before[-1]).rstrip(".") if before else ""
            if prev == "than":  # "larger than 20 megabytes": a threshold, its questions come out wrong
                taken.append((start, end))
                continue
            if kind == "name":
                if prev in _PERSON_CUES:  # "made by Harbor Labs" is an organisation, "by Karin Lund" a person
                    kind = "org" if answer.split()[-1].lower() in _ORG_WORDS else "person"
                elif prev in _PLACE_PREP and all(t.isalpha() for t in answer.split()):
                    kind = "place"
            elif kind == "year" and prev not in {"in", "since", "until", "by", "from", "of"}:
                continue
            elif kind == "count" and answer.split()[-1] in _DURATION_NOUNS:
                kind = "quantity:duration"  # "every four years"
            if normalize_answer(sentence).count(normalize_answer(answer)) > 1 or len(answer) < 2:
                continue  # ambiguous: the answer occurs twice
            taken.append((start, end))
            family = kind.split(":")[0]
            count_noun = answer.split()[-1] if family == "count" else None
            template, head, role = _template(before, kind, count_noun)
            if kind == "number" and not template:
                continue
            if kind == "name" and role and template and template.startswith("Who"):
                kind, family = "person", "person"
            np_ = _noun_phrase_before_of(before)
            nouns = _noun_after(sentence, end, prev) if family == "name" else []
            openers = _kind_openers(kind, answer, prev, nouns, sentence[end:].split()[:1])
            if np_ and family in {"money", "percent", "quantity"}:
                openers.insert(
                    0, f"What is the {np_}"
                )  # "payload of 2.4 kg" -> "What is the maximum payload"
            if head and not template and family in {"money", "percent", "quantity", "date", "name"}:
                openers.insert(0, f"What is the {head}")  # "its maximum service ceiling is ..."
            openers = list(dict.fromkeys(openers))
            score = _SCORE[family] + (1 if np_ or template or nouns else 0) - (1 if start == 0 else 0)
            if openers[0] == "What" and not template:
                score -= 1  # a bare name: the model mostly asks "What is <the answer>?"
            found.append(Candidate(sentence, answer, kind, openers[0], score, tuple(openers[1:]), template))
    return sorted(found, key=lambda c: -c.score)


def _resolve_it(sentence: str, previous: str) -> str | None:
    """'It was launched on 21 April 2026.' after 'The Quillfeather Q7 is a survey drone ...' ->
    'The Quillfeather Q7 was launched on 21 April 2026.': the model is shown who 'it' is."""
    m = re.match(r"(It|Its|She|Her|He|His)\s", sentence)
    if not m:
        return None
    for n in re.finditer(_NAME, previous):
        toks, _ = _name_tokens(n)
        if not toks or not re.match(r"\s+[a-z]", previous[toks[-1][1] :]):
            continue  # a name followed by a verb-like word: the subject
        name = previous[toks[0][0] : toks[-1][1]]
        if previous[: toks[0][0]].rstrip().endswith(("The", "the")):
            name = f"The {name}"
        return (name if m.group(1) in {"It", "She", "He"} else f"{name}'s") + sentence[m.end(1) :]
    return None


def select_candidates(text: str, k: int) -> list[Candidate]:
    """Up to `k` candidates from a chunk with distinct answers, spread over its sentences."""
    per_sentence = []
    previous = ""
    for sentence in split_sentences(text):
        n = len(sentence.split())
        if 5 <= n <= 60 and not sentence.endswith("?"):
            context = _resolve_it(sentence, previous)
            per_sentence.append([replace(c, context=context) for c in answer_candidates(sentence)])
        previous = sentence
    # Best score first; each fact already taken from a sentence costs its next ones 1.5 points, so
    # the facts spread over the sentences unless one sentence is much richer.
    pool = [(s, r, c) for s, cands in enumerate(per_sentence) for r, c in enumerate(cands)]
    taken = [0] * len(per_sentence)
    chosen: list[Candidate] = []
    seen: set[str] = set()
    while pool and len(chosen) < k:
        best = max(range(len(pool)), key=lambda n: (pool[n][2].score - 1.5 * taken[pool[n][0]], -n))
        s, _, cand = pool.pop(best)
        key = normalize_answer(cand.answer)
        if key not in seen:
            seen.add(key)
            taken[s] += 1
            chosen.append(cand)
    return chosen


def _stems(words: set[str]) -> set[str]:
    return {w[:5] for w in words}


def check_question(question: str, cand: Candidate, chunk_text: str) -> str | None:
    """Strict checks on a model-written question; the reason it fails, or None."""
    n = len(question.split())
    if not 4 <= n <= 30:
        return f"question has {n} words"
    if _META.search(question):
        return "question talks about the text, not the facts"
    wrong = _WRONG_WORDS.get(cand.kind, set()) & set(normalize_question(question).split())
    if wrong:
        return f"question asks for another kind of answer: {sorted(wrong)}"
    reason = validate_pair(question, cand.answer, chunk_text)
    if reason:
        return reason
    q_numbers = set(re.findall(r"\b\d+", question))  # \b: the 7 of "Q7" is a name, not a number
    if q_numbers & set(re.findall(r"\b\d+", cand.answer)):
        return "question leaks a number of the answer"  # "How many branches ... in 20 months?"
    if q_numbers - set(re.findall(r"\b\d+", chunk_text)):
        return "question invents a number"  # "How many plants does the 4th plant produce?"
    answer_words = content_words(cand.answer)
    q_words = content_words(question) - answer_words
    if not _stems(q_words) & _stems(content_words(cand.sentence)):
        return "question shares no content word with its sentence"
    # Hallucinated detail: more than one content word (by 5-letter stem) that the chunk never uses.
    novel = _stems(q_words - _QUESTION_WORDS) - _stems(content_words(chunk_text))
    if len(novel) > 1:
        return f"question adds words not in the text: {sorted(novel)}"
    # The question must be about the answer's neighbourhood: "How much does the Q7 weigh?" is wrong
    # for "... weighs 1.8 kg and carries a payload of 2.4 kg" when the answer is 2.4 kg.
    words = cand.sentence.split()
    a_len = len(cand.answer.split())
    pos = next(
        (i for i in range(len(words)) if " ".join(words[i : i + a_len]).rstrip(".,;:") == cand.answer), None
    )
    if pos is not None and cand.kind == "count" and pos:
        prep = _bare(words[pos - 1])
        if (
            prep in {"in", "across", "at", "from", "on", "over"}
            and prep not in normalize_question(question).split()
        ):
            return f"question drops the '{prep}' of its count"  # "employs 5,300 people in 14 countries"
    if pos is not None:
        window = " ".join(words[max(0, pos - 6) : pos] + words[pos + a_len : pos + a_len + 6])
        if not _stems(q_words) & _stems(content_words(window) - answer_words):
            return "question is not about the answer's context"
    return None


def clean_question(opener: str, completion: str) -> str:
    """Opener + completion, cut after the first '?', on one line, without stray quotes."""
    text = f"{opener}{completion}" if completion[:1] in (" ", "'", "?", ",") else f"{opener} {completion}"
    text = text.split("\n", 1)[0]
    if "?" in text:
        text = text[: text.index("?") + 1]
    return " ".join(text.replace('"', "").split())


def name_aliases(chunk_text: str) -> list[tuple[str, str]]:
    """(long, short) names the chunk uses for one thing: ('Quillfeather Q7', 'Q7') when it says both
    'the Quillfeather Q7' and 'the Q7'. The short form is a trailing part of the long one."""
    names = set()
    for m in re.finditer(_NAME, chunk_text):
        toks, _ = _name_tokens(m)
        if toks:
            names.add(" ".join(t[2] for t in toks))
    pairs = []
    for long in sorted(names, key=lambda n: (-len(n), n)):
        toks = long.split()
        for k in range(1, len(toks)):
            short = " ".join(toks[k:])
            if (
                short in names
                and any(c.isalpha() for c in short)
                and (len(short) > 2 or any(c.isdigit() for c in short))
            ):
                pairs.append((long, short))
                break
    return pairs


# Question openings that ask the same thing, for the kinds where they do: (kind family or "*", opening, other).
_REWORDINGS: tuple[tuple[str, str, str], ...] = (
    ("person", "Who ", "Which person "),
    ("org", "Who ", "Which organisation "),
    ("*", "How often ", "How frequently "),
    ("count", "How many ", "What number of "),
    ("date", "When ", "On what date "),
    ("year", "When ", "In what year "),
    ("time", "When ", "At what time "),
    ("weekday", "When ", "On which day "),
    ("quantity:duration", "How long ", "For how long "),
)


def reworded(question: str, kind: str, answer: str) -> str | None:
    """The question opened the other way ('Who chaired ...' <-> 'Which person chaired ...'), or None."""
    for family, a, b in _REWORDINGS:
        if family not in ("*", kind, kind.split(":")[0]):
            continue
        if family == "date" and re.fullmatch(rf"(?:{_MONTHS})\.?\s+\d{{4}}", answer):
            b = "In which month "
        for x, y in ((a, b), (b, a)):
            if question.startswith(x):
                return y + question[len(x) :]
    m = re.fullmatch(r"How much (does|do|did) (.+) cost\?", question)
    if m:
        return f"What {m.group(1)} {m.group(2)} cost?"
    return None


def renamed(question: str, aliases: Sequence[tuple[str, str]]) -> str | None:
    """The question with its subject named the other way ('the Quillfeather Q7' <-> 'the Q7')."""
    for long, short in aliases:
        if re.search(rf"\b{re.escape(long)}\b", question):
            return re.sub(rf"\b{re.escape(long)}\b", short, question, count=1)
    for long, short in aliases:
        for m in re.finditer(rf"\b{re.escape(short)}\b", question):
            head = question[: m.start()].split()
            if head and head[-1][:1].isupper() and len(head) > 1:
                continue  # the end of another name ("Harbor Labs" for "Labs")
            return question[: m.start()] + long + question[m.end() :]
    return None


def _adds_content(question: str, opener: str, cand: Candidate) -> bool:
    """Whether the model's part of a question names something from the sentence: "What is the name of
    the system?" or "Within how many hours?" do not say what they ask about."""
    opener_stems = _stems(content_words(opener))
    own = _stems(content_words(question)) - opener_stems - _stems(content_words(cand.answer))
    return bool(own & _stems(content_words(cand.sentence)))


def _buckets(lengths: Sequence[int], overhead: int = 32) -> list[list[int]]:
    """Indices grouped into runs of similar length, minimising padded tokens plus `overhead` tokens
    per run (a forward pass has a fixed cost): an exact partition of the sorted lengths."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.insert(0, order[cut[j] : j])
        j = cut[j]
    return runs


class LocalQAGenerator:
    """Answer-aware question generation on a small local chat model (default: the bundled SmolLM2).

    `pairs_per_chunk` caps the *facts* (distinct answers) kept per chunk; each fact is asked up to
    `variants` times in different wording, so a chunk yields up to pairs_per_chunk * variants pairs.
    """

    max_concurrency = 1  # one model, batched instead of threaded
    prompt_version = LOCAL_PROMPT_VERSION

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str | None = None,
        pairs_per_chunk: int = 3,
        variants: int = 2,
        candidates_per_chunk: int | None = None,
        batch_size: int = 4,
        max_new_tokens: int = 18,
        max_prompts_per_call: int = 64,
        shots: Sequence[tuple[str, str, str]] = SHOTS,
        num_threads: int | None = None,
    ):
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        self.model, self.tokenizer = model, tokenizer
        name = model_name or Path(str(getattr(model.config, "_name_or_path", "") or "local")).name
        self.model_id = f"local:{name}"
        self.name = self.model_id
        self.pairs_per_chunk = pairs_per_chunk
        self.variants = variants
        # Some facts give no valid question: ask about a few more than are kept.
        self.candidates_per_chunk = candidates_per_chunk or pairs_per_chunk + 3
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.max_prompts_per_call = max_prompts_per_call
        self.shots = tuple(shots)
        # torch intra-op threads while generating (None: leave the process setting alone). On a
        # shared 2-core box, 2 OpenMP threads competing with another busy process ran 6x slower than 1.
        self.num_threads = num_threads
        self._stop_ids = self._stop_token_ids()
        self._prefix: tuple[str, Any, Any] | None = None

    @classmethod
    def load(cls, cache_dir: Path, base_model: str | None = None, **kwargs: Any) -> LocalQAGenerator:
        """The bundled (or a local) base model via `moe.base_model` (converted once, then cached)."""
        from moe.base_model import load_base_model, resolve_base_model

        path = resolve_base_model(base_model, cache_dir)
        model, tokenizer = load_base_model(path, device="cpu")
        return cls(model, tokenizer, model_name=path.name, **kwargs)

    def _stop_token_ids(self) -> list[int]:
        """End of turn plus every token that contains '?' or a newline: a question is complete there.
        (Cheaper than `stop_strings`, which re-scans decoded text at every step.)"""
        tok = self.tokenizer
        ids = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            ids.add(im_end)
        for token, idx in tok.get_vocab().items():
            piece = tok.convert_tokens_to_string([token])
            if "?" in piece or "\n" in piece:
                ids.add(idx)
        return sorted(ids)

    def _messages(self, cand: Candidate | None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": SYSTEM}]
        for fact, answer, question in self.shots:
            messages += [
                {"role": "user", "content": f"Fact: {fact}\nAnswer: {answer}"},
                {"role": "assistant", "content": question},
            ]
        if cand is not None:
            messages.append({"role": "user", "content": f"Fact: {cand.fact}\nAnswer: {cand.answer}"})
        return messages

    def _stem(self, cand: Candidate) -> str:
        """The prompt up to the assistant's turn; every variant of the fact continues it with its opener."""
        return self.tokenizer.apply_chat_template(
            self._messages(cand), tokenize=False, add_generation_prompt=True
        )

    def _segments(self, cand: Candidate) -> tuple[str, str]:
        """The stem cut into (up to the fact's sentence, the rest: its answer and the assistant's turn):
        facts from one sentence share the first segment's KV cache, a fact's variants the whole stem."""
        stem = self._stem(cand)
        fact = f"Fact: {cand.fact}\n"
        a = stem.find(fact)
        if a < 0:  # an unusual chat template: no sharing below the prefix
            return stem, ""
        return stem[: a + len(fact)], stem[a + len(fact) :]

    def _shared_prefix(self) -> tuple[str, Any, Any]:
        """(text, token ids, KV cache) of the part every prompt shares: system message and examples.
        Computed once; each batch reuses it, so only the per-fact suffix is prefilled (~3x fewer tokens)."""
        if self._prefix is None:
            import torch

            text = self.tokenizer.apply_chat_template(self._messages(None), tokenize=False)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                cache = self.model(input_ids=ids.to(self.model.device), use_cache=True).past_key_values
            self._prefix = (text, ids[0], cache)
        return self._prefix

    def _plan(self, requests: Sequence[Sequence[str]]) -> list[list[int]]:
        """The batched model calls for `requests` (indices into it): a call takes all the rows that share
        a first segment (one sentence) until `max_prompts_per_call` rows; sentences of similar length go
        together (less padding)."""
        rows: dict[str, list[int]] = {}
        for idx, segments in enumerate(requests):
            rows.setdefault(segments[0], []).append(idx)
        calls: list[list[int]] = []
        for first in sorted(rows, key=len):
            if not calls or len(calls[-1]) + len(rows[first]) > self.max_prompts_per_call:
                calls.append([])
            calls[-1].extend(rows[first])
        return calls

    def _complete(self, requests: Sequence[Sequence[str]]) -> tuple[list[str], list[int], list[int]]:
        """Greedy completions of prompts given as segments ("".join(segments) is the prompt, which starts
        with the shared prefix; every request has the same number of segments, the last not empty), one
        batched call per `_plan` group; returns (texts, prompt tokens, generated tokens) per request.

        KV caches are shared like a trie: the prefix (system message and examples) is computed once for
        good; in a call each distinct first segment (a fact's sentence) is prefilled once, then each
        distinct second segment (its answer) once on top of it, and so on; the rows (one per opener) only
        prefill their last segment and decode. A row is [prefix][pad][seg 1][pad][seg 2]...[last seg]: the
        attention mask hides the padding and positions come from the mask (cumsum), so every row sees
        exactly its unpadded prompt. Decoding is greedy and drops the rows that have stopped.
        """
        import torch
        from transformers import DynamicCache

        tok = self.tokenizer
        prefix_text, prefix_ids, prefix_cache = self._shared_prefix()
        if not all(segs and segs[0].startswith(prefix_text) for segs in requests):
            raise RuntimeError("chat template does not render the shared prefix verbatim")
        depth = len(requests[0]) if requests else 0
        if any(len(segs) != depth for segs in requests):
            raise ValueError("every request needs the same number of segments")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = self.model.device
        stop = torch.tensor(self._stop_ids, device=device)
        encode = lru_cache(maxsize=None)(lambda text: tuple(tok(text, add_special_tokens=False)["input_ids"]))
        texts: list[str] = [""] * len(requests)
        t_in: list[int] = [0] * len(requests)
        t_out: list[int] = [0] * len(requests)
        for call in self._plan(requests):
            keys: list[tuple[str, ...]] = [()]  # the trie level above: one row per distinct key
            ids = prefix_ids.to(device)[None]
            mask = torch.ones_like(ids)
            kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
            with torch.inference_mode():
                for level in range(depth):
                    level_keys = list(dict.fromkeys(tuple(requests[i][: level + 1]) for i in call))
                    parent = {k: n for n, k in enumerate(keys)}
                    parents = [parent[k[:-1]] for k in level_keys]
                    pieces = [encode(k[-1][len(prefix_text) :] if level == 0 else k[-1]) for k in level_keys]
                    if level == depth - 1 and min(len(p) for p in pieces) == 0:
                        raise ValueError("the last segment of a request must not be empty")
                    order, kv, ids, mask, logits = self._extend(kv, ids, mask, parents, pieces, pad)
                    keys = [level_keys[r] for r in order]
                cache = DynamicCache(kv)
                # Greedy decoding; a row is done at a stop token, and done rows leave the batch.
                mask_in = mask
                generated: list[list[int]] = [[] for _ in keys]
                active = torch.arange(len(keys), device=device)
                last_pos = mask.sum(-1) - 1
                for step in range(self.max_new_tokens):
                    nxt = logits.argmax(-1)
                    for r, t in zip(active.tolist(), nxt.tolist(), strict=True):
                        generated[r].append(t)
                    live = ~torch.isin(nxt, stop)
                    if step == self.max_new_tokens - 1 or not bool(live.any()):
                        break
                    if not bool(live.all()):
                        keep = live.nonzero().squeeze(1)
                        cache.batch_select_indices(keep)
                        active, nxt, mask, last_pos = active[keep], nxt[keep], mask[keep], last_pos[keep]
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    last_pos = last_pos + 1
                    logits = self.model(
                        input_ids=nxt[:, None],
                        attention_mask=mask,
                        position_ids=last_pos[:, None],
                        past_key_values=cache,
                        use_cache=True,
                    ).logits[:, -1]
            row = {k: r for r, k in enumerate(keys)}  # identical requests (overlapping chunks) share a row
            for i in call:
                r = row[tuple(requests[i])]
                keep_ids = [t for t in generated[r] if t != pad]
                texts[i] = tok.decode(keep_ids, skip_special_tokens=True)
                t_in[i] = int(mask_in[r].sum())
                t_out[i] = len(keep_ids)
        return texts, t_in, t_out

    def _extend(
        self, kv: list[tuple[Any, Any]], ids: Any, mask: Any, parents: list[int], pieces: list[Any], pad: int
    ):
        """Prefill one trie level: row r continues row `parents[r]` of (kv, ids, mask) with the tokens
        `pieces[r]`. Rows of similar length are run together (`_buckets`) and the results are aligned
        by padding each bucket's new part on the left (masked, zero KV). Returns (order: the new rows'
        indices into `pieces`, kv, ids, mask, last-position logits or None when nothing was run)."""
        import torch
        from transformers import DynamicCache

        device = ids.device
        width = max(len(p) for p in pieces)
        n_old = ids.shape[1]
        order: list[int] = []
        parts: list[tuple[list[tuple[Any, Any]], Any, Any, Any]] = []
        for bucket in _buckets([len(p) for p in pieces]):
            w = max(len(pieces[r]) for r in bucket)
            index = torch.tensor([parents[r] for r in bucket], device=device)
            seg_ids = torch.full((len(bucket), width), pad, dtype=torch.long)
            seg_mask = torch.zeros_like(seg_ids)
            for row, r in enumerate(bucket):
                if pieces[r]:
                    seg_ids[row, width - len(pieces[r]) :] = torch.tensor(pieces[r])
                    seg_mask[row, width - len(pieces[r]) :] = 1
            b_ids = torch.cat([ids[index], seg_ids.to(device)], dim=1)
            b_mask = torch.cat([mask[index], seg_mask.to(device)], dim=1)
            b_kv = [(k[index], v[index]) for k, v in kv]
            logits = None
            if w:
                cache = DynamicCache(b_kv)
                run_mask = torch.cat([b_mask[:, :n_old], b_mask[:, n_old + width - w :]], dim=1)
                positions = (run_mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(
                    input_ids=b_ids[:, -w:],
                    attention_mask=run_mask,
                    position_ids=positions[:, -w:],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                b_kv = [(layer.keys, layer.values) for layer in cache.layers]
            gap = width - w  # this bucket's pieces are narrower: masked zero KV in front of them
            if gap:
                b_kv = [
                    (
                        torch.cat(
                            [k[:, :, :n_old], k.new_zeros((*k.shape[:2], gap, k.shape[3])), k[:, :, n_old:]],
                            2,
                        ),
                        torch.cat(
                            [v[:, :, :n_old], v.new_zeros((*v.shape[:2], gap, v.shape[3])), v[:, :, n_old:]],
                            2,
                        ),
                    )
                    for k, v in b_kv
                ]
            order += bucket
            parts.append((b_kv, b_ids, b_mask, logits))
        kv = [
            (torch.cat([p[0][n][0] for p in parts]), torch.cat([p[0][n][1] for p in parts]))
            for n in range(len(kv))
        ]
        logits = None if any(p[3] is None for p in parts) else torch.cat([p[3] for p in parts])
        return order, kv, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), logits

    def _with_threads(self, fn: Any, *args: Any) -> Any:
        import torch

        if self.num_threads is None:
            return fn(*args)
        before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(before)

    def _requests(
        self, texts: Sequence[str]
    ) -> tuple[list[list[tuple[Candidate, list[str]]]], list[tuple[int, int, str]]]:
        """Per chunk: its candidates with their rule-made questions (valid templates); and the model
        requests (chunk, candidate, opener) for the variants the rules do not cover."""
        plans: list[list[tuple[Candidate, list[str]]]] = []
        requests: list[tuple[int, int, str]] = []
        for i, text in enumerate(texts):
            plan = []
            for j, cand in enumerate(select_candidates(text, self.candidates_per_chunk)):
                fixed = (
                    [cand.template]
                    if cand.template and check_question(cand.template, cand, text) is None
                    else []
                )
                fixed_norm = {normalize_question(q) for q in fixed}
                openers = [  # an opener the template starts with would only repeat the template
                    o
                    for o in cand.openers
                    if len(o.split()) < 3 or not any(f.startswith(normalize_question(o)) for f in fixed_norm)
                ]
                requests += [(i, j, op) for op in openers[: max(0, self.variants - len(fixed))]]
                plan.append((cand, fixed))
            plans.append(plan)
        return plans, requests

    def generate_many(self, texts: Sequence[str], budget: Budget | None = None) -> list[GenerationResult]:
        """QA pairs for several chunks with one batched model call (per `max_prompts_per_call` rows)."""
        plans, requests = self._requests(texts)
        results = [GenerationResult([]) for _ in texts]
        stems: dict[tuple[int, int], tuple[str, str]] = {}
        for i, j, _ in requests:
            if (i, j) not in stems:
                stems[i, j] = self._segments(plans[i][j][0])
        prompts = [(*stems[i, j], op) for i, j, op in requests]
        calls = len(self._plan(prompts)) if prompts else 0
        for _ in range(calls):
            if budget is not None and not budget.acquire():
                for r in results:
                    r.error, r.capped = "spend cap reached", True
                return results
        questions: dict[tuple[int, int], list[str]] = {}
        if prompts:
            completions, t_in, t_out = self._with_threads(self._complete, prompts)
            results[0].calls = calls  # the batch's calls are booked once, on its first chunk
            for (i, j, op), completion, n_in, n_out in zip(requests, completions, t_in, t_out, strict=True):
                results[i].tokens_in += n_in
                results[i].tokens_out += n_out
                question = clean_question(op, completion)
                if _adds_content(question, op, plans[i][j][0]):
                    questions.setdefault((i, j), []).append(question)
            if budget is not None:
                budget.add_tokens(sum(t_in) + sum(t_out))
        for i, (text, plan) in enumerate(zip(texts, plans, strict=True)):
            results[i].pairs = self._pick(
                text, [(c, fixed + questions.get((i, j), [])) for j, (c, fixed) in enumerate(plan)]
            )
        return results

    def _pick(self, text: str, asked: list[tuple[Candidate, list[str]]]) -> list[dict[str, str]]:
        """Up to `variants` distinct valid questions per fact, facts with more variants first, at most
        `pairs_per_chunk` facts. A question already kept (normalised) is not kept again, for any answer."""
        askers: dict[str, set[str]] = {}
        for cand, qs in asked:
            for q in qs:
                askers.setdefault(normalize_question(q), set()).add(normalize_answer(cand.answer))
        # A question written for two answers is ambiguous: it is kept for neither.
        seen = {q for q, answers in askers.items() if len(answers) > 1}
        aliases: list[tuple[str, str]] | None = None
        facts: list[tuple[Candidate, list[str]]] = []
        for cand, qs in asked:
            valid: list[str] = []

            def take(q: str, cand: Candidate = cand, valid: list[str] = valid) -> bool:
                key = normalize_question(q)
                if len(valid) < self.variants and key not in seen and check_question(q, cand, text) is None:
                    seen.add(key)
                    valid.append(q)
                    return True
                return False

            for q in qs:
                take(q)
            if valid and len(valid) < self.variants:  # open the question the other way
                for q in list(valid):
                    alt = reworded(q, cand.kind, cand.answer)
                    if alt:
                        take(alt)
            if valid and len(valid) < self.variants:  # name the subject the other way
                aliases = name_aliases(text) if aliases is None else aliases
                for q in list(valid):
                    alt = renamed(q, aliases)
                    if alt:
                        take(alt)
            if valid:
                facts.append((cand, valid))
        facts.sort(key=lambda f: -len(f[1]))  # stable: by score within the same number of variants
        return [{"question": q, "answer": c.answer} for c, qs in facts[: self.pairs_per_chunk] for q in qs]
