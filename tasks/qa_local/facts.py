"""Fact selection: which spans of a chunk become questions (:class:`Candidate`: a sentence, an answer
span, its kind and the question openers that fit it) and how the candidates of a chunk are chosen.

One file (~560 lines): the span patterns, the rule-only templates and the openers read one sentence
together (a template decides the score and the openers), so they stay beside each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from tasks.chunking import split_sentences
from tasks.qa_local.lexicon import (
    _CHANGE_VERBS,
    _CLAUSE_BREAKS,
    _DURATION_NOUNS,
    _LABEL_NOUNS,
    _MONTHS,
    _NAME,
    _NOT_NAMES,
    _ORG_WORDS,
    _PATTERNS,
    _PERSON_CUES,
    _PLACE_PREP,
    _PRONOUN_DETS,
    _ROLES,
    _SCORE,
    _TITLES,
)
from tasks.text import STOPWORDS, normalize_answer


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
    more_templates: tuple[str, ...] = ()  # other rule-made wordings of the same fact
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


def _template(
    words: list[str], kind: str, count_noun: str | None, after: str = "."
) -> tuple[str | None, str | None, bool]:
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
    elif kind == "name" and i < len(words) and low[i] == "the" and i and words[i - 1].endswith(","):
        if after.strip()[:1] not in {",", ";", ".", ""}:
            return None, None, False  # "the harbour, the Saltmarsh Pier and the lighthouse": a list
        return _appositive([*words[: i - 1], words[i - 1].rstrip(",")]), None, False
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


def _appositive(words: list[str]) -> str | None:
    """'<Owner> opened its new ferry terminal, the <name>' -> 'What is the name of <owner>'s new ferry
    terminal?'; '... the annual fair, the <name>' -> 'What is the name of the annual fair?'."""
    subj = _subject(words, anchored=False)
    if subj is None or len(subj) < 2 or not all(w.islower() and w.isalpha() for w in subj[1:]):
        return None
    if subj[0].lower() in _PRONOUN_DETS:
        # "Tidewell Harbour Authority: Bulletin 2026/07 The Tidewell Harbour Authority opened its ...":
        # a heading glued to the sentence; the owner is the name the clause opens with.
        starts = [j for j, w in enumerate(words) if j == 0 or w == "The"]
        owner = next((o for j in reversed(starts) if (o := _leading_name(" ".join(words[j:])))), None)
        if owner is None or (len(owner.split()) == 1 and not re.search(r"\d", owner)):
            return None  # "Visitors to the ... praised its ...": a capitalised word, not a name
        owner += "'" if owner.endswith("s") else "'s"
        return f"What is the name of {owner} {' '.join(subj[1:])}?"
    if subj[0].lower() != "the":
        return None
    return f"What is the name of the {' '.join(subj[1:])}?"


#: "<Owner> opened its new ferry terminal, the <name>, on 8 August 2026": what the owner did to it.
_EVENT_VERB = re.compile(r"[a-z]{3,}(?<!e)(?<!ow)ed")  # "opened", not "proceed" or "showed"
#: The date the clause ends with, and nothing after it ("on 8 August 2026.", "in March 2026,").
_EVENT_WHEN = re.compile(
    rf",?\s*((?:on \d{{1,2}} (?:{_MONTHS}) \d{{4}})|(?:in (?:(?:{_MONTHS}) )?\d{{4}}))\s*(?:[.,;]|$)"
)


def _appositive_event(words: list[str], after: str) -> list[str]:
    """'<Owner> opened its new ferry terminal, the <name>, on 8 August 2026' -> 'What was opened by
    <owner> on 8 August 2026?' and 'Which terminal was opened by <owner> on ...?': the named thing
    asked from what happened to it, in words other than its description ([] when the clause is not
    '<Owner> <verb>ed its <noun phrase>')."""
    low = [_bare(w) for w in words]
    if "its" not in low:
        return []
    k = len(low) - 1 - low[::-1].index("its")
    described = words[k + 1 :]  # "new ferry terminal": the noun phrase alone ("its doors to the ..." is not)
    if (
        k < 2
        or not _EVENT_VERB.fullmatch(words[k - 1])
        or not described
        or not all(w.isalpha() and w.islower() and w not in STOPWORDS for w in described)
    ):
        return []
    # The owner is the name right before the verb ("The Authority said the council renamed its ..."
    # names no owner of the renaming).
    starts = [j for j, w in enumerate(words[: k - 1]) if j == 0 or w == "The"]
    owner = next(
        (
            o
            for j in reversed(starts)
            if (o := _leading_name(" ".join(words[j:k]))) and len(o.split()) == k - 1 - j
        ),
        None,
    )
    if owner is None or len(owner.split()) < 2:
        return []
    m = _EVENT_WHEN.match(after)
    when = f" {m.group(1)}" if m else ""
    head = words[-1]
    verb = words[k - 1]
    return [f"What was {verb} by {owner}{when}?", f"Which {head} was {verb} by {owner}{when}?"]


#: Where the clause a reversed question keeps ends: another clause, a list, a time or a number.
_CLAUSE_END = re.compile(
    r",|;|:|\(| and | but | which | while | where | who | with | from \d| since \d| until \d"
    rf"| (?:in|on|at|by) (?:\d|(?:{_MONTHS})\b)"
    r"|(?<!\bDr)(?<!\bMr)(?<!Mrs)(?<!\bMs)(?<!Prof)(?<!\bSt)(?<!\bInc)(?<!\bLtd)(?<!\bCo)\.(?:\s|$)"
)
#: Verbs after which the subject is what a reversed question asks for ("<X> was founded by <Y>").
_RELATION_VERBS = re.compile(
    r"(?:is|was|are|were) (?:\w+ly )?(?:founded|started|built|made|designed|developed|run|led|"
    r"owned|operated|managed|headquartered|based|located|opened|acquired|launched|produced|chaired|"
    r"sponsored|funded|named|twinned|the \w+(?: \w+)? of)\b"
    r"|(?:is|was) an? (?:[\w-]+ ){1,3}(?:made|built|designed|developed|operated|run|owned) by\b"
    r"|(?:makes|builds|operates|runs|owns|designs|develops|produces|manages|sponsors|funds|employs|"
    r"supplies|serves|fields|holds|publishes|trains|hosts)\b"
)


def _reversed(rest: str, answer: str) -> str | None:
    """A question that asks for the sentence's named subject from what it says of it: 'Quenby Robotics
    was founded by Tamsin Vey in 2019.' -> 'What was founded by Tamsin Vey?'; 'Ebbrick Ferry Line
    operates the MV Corran Lass.' -> 'What operates the MV Corran Lass?'. Only for a relation to
    another name (a capitalised word after the verb), never with a number in the clause kept."""
    m = _RELATION_VERBS.match(rest.strip())
    if not m:
        return None
    clause = rest.strip()
    end = _CLAUSE_END.search(clause, m.end())
    clause = clause[: end.start()] if end else clause
    after = clause[m.end() :].split()
    if not any(w[:1].isupper() for w in after) or answer in clause:
        return None
    if re.search(r"(?<![\w-])\d[\d,.]*(?![\w-])", clause):  # a number: another fact's answer
        return None
    if not 2 <= len(clause.split()) <= 14:
        return None
    clause = re.sub(r"^are\b", "is", re.sub(r"^were\b", "was", clause))  # the answer is one thing
    role = re.match(r"(?:is|was) the (\w+) of\b", clause)
    wh = "Who" if role and role.group(1).lower() in _ROLES else "What"  # "Who is the founder of ...?"
    return f"{wh} {clause.rstrip('.')}?"


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


#: Kinds whose answer is a value a "What is the ..." question can ask for (not a date, a person or a place).
_VALUE_FAMILIES = {"money", "percent", "quantity", "count", "number", "name"}


def _kind_openers(kind: str, answer: str, prev: str, nouns: list[str], after: list[str]) -> list[str]:
    """Question openers for an answer of `kind`, best first: the kind's own, then the first one asked
    indirectly ("Can you tell me when", "Do you know how fast") and, for a value, "What is the": more
    distinct wordings of one fact (the model completes each; the checks drop a completion that does
    not ask for the answer)."""
    own = _own_openers(kind, answer, prev, nouns, after)
    head = own[0]
    lead = head if head.split()[0] in {"When", "Who", "Where", "How"} else "what"
    lead = lead[0].lower() + lead[1:]
    extra = [f"Can you tell me {lead}", f"Do you know {lead}"]
    if kind.split(":")[0] in _VALUE_FAMILIES:
        extra.append("What is the")
    return [*own, *(o for o in extra if o not in own)]


def _own_openers(kind: str, answer: str, prev: str, nouns: list[str], after: list[str]) -> list[str]:
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


#: Verbs by which a sentence's subject holds "<a noun phrase> of <value>" ("carries a maximum payload
#: of 2.4 kg"), unlike an action on something else ("released the Q7 at a price of $1,299").
_HOLD_VERBS = {
    "has", "have", "had", "carries", "offers", "reaches", "provides", "holds", "keeps", "supports",
    "features", "includes", "gives", "with",
}  # fmt: skip


def _held_by_subject(before: list[str], np_: str) -> bool:
    """Whether the words before '<np_> of <answer>' end in a holding verb and an article."""
    rest = [_bare(w) for w in before[: len(before) - 1 - len(np_.split())]]
    if rest and rest[-1] in {"a", "an", "the"}:
        rest = rest[:-1]
    return bool(rest) and rest[-1] in _HOLD_VERBS


def _leading_name(sentence: str) -> str | None:
    """The named subject a sentence opens with, as a question names it: 'The Quillfeather Q7 weighs
    ...' -> 'the Quillfeather Q7', 'Lumenvale Orbit 5.2 keeps ...' -> 'Lumenvale Orbit 5.2'; None when
    the sentence does not open with a name followed by a lower-case word (a verb)."""
    m = re.match(r"(The\s+)?((?:[A-Z][\w'’-]*\s+)(?:[A-Z0-9][\w.'’-]*\s+){0,3})(?=[a-z])", sentence)
    if not m:
        return None
    name = m.group(2).strip().rstrip(".")
    if name.split()[0].lower() in _NOT_NAMES | _PRONOUN_DETS | {"it", "this", "these", "those"}:
        return None
    return f"the {name}" if m.group(1) else name


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
            template, head, role = _template(before, kind, count_noun, sentence[end:])
            if kind == "number" and not template:
                continue
            if not template and kind in {"name", "org"} and [w.lower() for w in before] in ([], ["the"]):
                template = _reversed(
                    sentence[end:], answer
                )  # the subject asked for: "What was founded by ...?"
                if template and answer.split()[-1].lower() in _ORG_WORDS:
                    kind, family = "org", "org"
                elif template and template.startswith("Who"):
                    kind, family = "person", "person"
            if kind == "name" and role and template and template.startswith("Who"):
                kind, family = "person", "person"
            np_ = _noun_phrase_before_of(before)
            nouns = _noun_after(sentence, end, prev) if family == "name" else []
            openers = _kind_openers(kind, answer, prev, nouns, sentence[end:].split()[:1])
            if np_ and family in {"money", "percent", "quantity"}:
                openers.insert(
                    0, f"What is the {np_}"
                )  # "payload of 2.4 kg" -> "What is the maximum payload"
                named = _leading_name(sentence) if _held_by_subject(before, np_) else None
                if named and not template:  # the model tends to write the answer into this one
                    template = f"What is the {np_} of {named}?"
            if head and not template and family in {"money", "percent", "quantity", "date", "name"}:
                openers.insert(0, f"What is the {head}")  # "its maximum service ceiling is ..."
            openers = list(dict.fromkeys(openers))
            score = _SCORE[family] + (1 if np_ or template or nouns else 0) - (1 if start == 0 else 0)
            if family in {"name", "org"} and template:
                score += 2  # what a thing is called, who made it: among the first questions a reader asks
            if openers[0] == "What" and not template:
                score -= 1  # a bare name: the model mostly asks "What is <the answer>?"
            more: list[str] = []
            if kind == "name" and template and template.startswith("What is the name of"):
                head = before[:-1] if before and before[-1].lower() == "the" else before
                more = _appositive_event([*head[:-1], head[-1].rstrip(",")] if head else [], sentence[end:])
            found.append(
                Candidate(
                    sentence, answer, kind, openers[0], score, tuple(openers[1:]), template, tuple(more)
                )
            )
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
