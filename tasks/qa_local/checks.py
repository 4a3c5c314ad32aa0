"""The checks a generated question must pass (grounded, on its fact, not giving the answer away) and
the rule-based rewordings that give a fact more distinct wordings (reopened, subject renamed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasks.qa import validate_pair
from tasks.qa_local.facts import Candidate, _bare, _name_tokens
from tasks.qa_local.lexicon import (
    _FRAME_MODIFIERS,
    _FRAMES,
    _LABEL_NOUNS,
    _META,
    _MONTHS,
    _NAME,
    _QUESTION_WORDS,
    _SYNONYMS,
    _WEEKDAYS,
    _WRONG_WORDS,
)
from tasks.text import content_words, normalize_question


def _stems(words: set[str]) -> set[str]:
    return {w[:5] for w in words}


def check_question(question: str, cand: Candidate, chunk_text: str, *, derived: bool = False) -> str | None:
    """Strict checks on a model-written question; the reason it fails, or None. A `derived` question
    (rebuilt by rule from one that passed, :func:`framed`, whose frame keeps the measure: its key noun
    with allowed modifiers only) keeps its source's subject, so only the checks on its form and on
    leaking or misreading the answer apply (its verb, "carry" for "payload", is rarely the text's)."""
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
    if derived:
        return None
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


_SYNONYM_OF = {a: b for pair in _SYNONYMS for a, b in (pair, pair[::-1])}
_SYNONYM_RE = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _SYNONYM_OF), key=len, reverse=True)) + r")\b", re.I
)


def synonymed(question: str) -> str | None:
    """The question with every word of the synonym list said the other way ('Who chaired the
    committee?' -> 'Who led the committee?'), or None when it has none. Capitalised words are part of
    a name ('Chief Harbour Office') and stay; so does the question's first word."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        if m.start() == 0 or word[:1].isupper():
            return word
        return _SYNONYM_OF.get(word, word)

    out = _SYNONYM_RE.sub(swap, question)
    return out if out != question else None


_FRAMED = re.compile(
    r"(?:What|Which) is (?:the|its) (?P<np>[a-z][a-z -]*?) (?:of|for) (?P<x>[^?]+)\?"
    r"|(?:What|Which) is (?P<owner>[^?]+?)['’]s (?P<np2>[a-z][a-z -]*?)\?"
)  # present tense only: the frames are written in it


def framed(question: str) -> list[str]:
    """The question rebuilt around the verb its measure implies ('What is the maximum payload of the
    Q7?' -> 'How much weight can the Q7 carry?', 'What is the default retention period for closed
    tickets?' -> 'How long are closed tickets kept?'), from `_FRAMES`; [] when none fits."""
    m = _FRAMED.fullmatch(question)
    if not m:
        return []
    if m.group("np"):
        words, x = m.group("np").split(), m.group("x")
    else:  # "What is the Q7's weight?": the owner is the thing measured
        words, x = m.group("np2").split(), m.group("owner")
    two = " ".join(words[-2:])
    key = two if len(words) >= 2 and two in _FRAMES else words[-1]
    frames = _FRAMES.get(key, ())
    if not frames or not set(words[: len(words) - len(key.split())]) <= _FRAME_MODIFIERS:
        return []  # "battery weight", "shipping cost": another measure than the frame asks for
    head = re.split(r" (?:in|of|for|at|on|from|with) ", x)[0].split()[-1]  # "closed tickets in X": tickets
    plural = head.islower() and head.endswith("s") and not head.endswith("ss")
    be, do = ("are", "do") if plural else ("is", "does")
    return [f.format(x=x, be=be, do=do) for f in frames]


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


_CALENDAR = re.compile(rf"(?:{_MONTHS}|{_WEEKDAYS})s?")


_LABELLED = re.compile(rf"\b(?:{'|'.join(sorted(_LABEL_NOUNS))})\s+[\w.-]*\d", re.I)


def names_entity(question: str) -> bool:
    """Whether the question names something of its own: a capitalised word after its first ("the
    Q7", "the Saltmarsh Pier", "Tamsin Vey"), months and weekdays aside ("on Sunday" names no one's
    Sunday), or a labelled number ("version 5.1", "model 3"). A number alone names nothing ("in 2024")."""
    words = [w.strip("\"'(),.:;?!") for w in question.split()[1:]]
    return any(w[:1].isupper() and not _CALENDAR.fullmatch(w) for w in words) or bool(
        _LABELLED.search(question)
    )


def situated(question: str, subject: str | None) -> str | None:
    """The question tied to the document's subject (``tasks.chunking.document_subject``) when it names
    nothing of its own, else None: "the <subject's head noun>" becomes the subject ("How many spaces
    does the car park have?" stays, "How many seed varieties does the library keep?" -> "... does the
    Orlith Valley Seed Library keep?"); otherwise the subject is added at the end, "in" a product or
    release (a name with a number: "... kept in Lumenvale Orbit 5.2?"), "at" an organisation or place
    ("... at the Sandrel Botanic Garden?")."""
    if not subject or not question.endswith("?") or names_entity(question):
        return None
    name = subject.split()[1:] if subject.startswith("the ") else subject.split()
    if re.search(rf"\b{re.escape(name[0])}\b", question, re.I):
        return None  # names it already, in lower case ("a carraway wheeler")
    head = name[-1]
    if head.isalpha() and not head.endswith("s"):  # "the ferries" are ships, not "Vellacourt Island Ferries"
        m = re.search(rf"\bthe {re.escape(head.lower())}\b", question)
        if m:
            return question[: m.start()] + subject + question[m.end() :]
    prep = "in" if any(c.isdigit() for c in subject) else "at"
    return f"{question[:-1].rstrip()} {prep} {subject}?"


def _adds_content(question: str, opener: str, cand: Candidate) -> bool:
    """Whether the model's part of a question names something from the sentence: "What is the name of
    the system?" or "Within how many hours?" do not say what they ask about."""
    opener_stems = _stems(content_words(opener))
    own = _stems(content_words(question)) - opener_stems - _stems(content_words(cand.answer))
    return bool(own & _stems(content_words(cand.sentence)))
