"""The English the local generator reads answers and questions with: months, units, money, dates,
clock times, counts, names, roles and organisation words, and the word lists its checks use.

Pure data and compiled patterns; nothing here imports the rest of the package.
"""

from __future__ import annotations

import re

from tasks.text import STOPWORDS

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
    "robotics", "shipyard", "clinic", "club", "airways", "airlines", "railway", "trust", "partners",
    "holdings", "press", "cooperative",
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
# for "3.20 pounds" (a fee), "How long ... cost?" for a duration, "What is the maximum speed ...?" for
# "4,500 metres", "What is the total cost ...?" for "two batteries".
_MONEY_WORDS = {"cost", "costs", "price", "priced", "pay", "paid", "fee", "fees", "charge"}
_MASS_WORDS = {"weigh", "weighs", "weight", "heavy", "mass"}
_SPEED_WORDS = {"fast", "speed", "velocity"}
_WRONG_WORDS = {
    "money": _MASS_WORDS | _SPEED_WORDS | {"far", "tall", "long", "old", "when", "who"},
    "quantity:weight": _MONEY_WORDS | _SPEED_WORDS | {"far", "long", "tall", "old", "when", "who"},
    "quantity:length": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"old", "when", "who"},
    "quantity:duration": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"far", "tall", "when", "who"},
    "quantity:speed": _MASS_WORDS | _MONEY_WORDS | {"old", "when", "who"},
    "count": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"long", "when", "who"},
    "date": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"many", "much", "who"},
    "year": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"many", "much", "who"},
    "time": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"many", "much", "who"},
    "weekday": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"many", "much", "who"},
    "person": _MASS_WORDS | _MONEY_WORDS | _SPEED_WORDS | {"many", "much", "when", "long"},
}
# Words a question may say another way, each pair in one grammatical form so that either replaces the
# other in place ("Who chaired ...?" -> "Who led ...?"). General English only: no pair names a subject.
_SYNONYMS: tuple[tuple[str, str], ...] = (
    ("maximum", "highest"),
    ("minimum", "lowest"),
    ("chief", "head"),
    ("chaired", "led"),
    ("chairs", "leads"),
    ("launched", "released"),
    ("launch", "release"),
    ("introduced", "brought in"),
    ("scheduled", "planned"),
    ("located", "based"),
    ("founded", "established"),
    ("built", "constructed"),
    ("company", "firm"),
    ("staff", "employees"),
    ("workers", "employees"),
    ("worker", "employee"),
    ("fee", "charge"),
    ("kept", "retained"),
    ("retention", "storage"),
    ("replaced", "renewed"),
    ("weight", "mass"),
    ("accuracy", "precision"),
    ("meeting", "session"),
    ("total", "overall"),
    ("review", "revisit"),
    ("reviewed", "revisited"),
    ("begin", "start"),
    ("begins", "starts"),
    ("raised", "increased"),
    ("reduced", "lowered"),
    ("uses", "relies on"),
    ("use", "rely on"),
    ("adds", "introduces"),
    ("recharges", "charges"),
)
# Questions built around the verb a measure implies, for "What is the <...> <noun> of|for <X>?": the
# same fact asked with other words and another structure ("What is the maximum payload of X?" ->
# "How much weight can X carry?"). Keyed by the noun phrase's last two words or its last word, and
# only when every word before that key is one of `_FRAME_MODIFIERS` ("battery weight", "shipping
# cost", "cruising speed" measure something else); `{x}` is what follows "of"/"for" as the question
# wrote it, `{be}` / `{do}` agree with it. General English only.
_FRAMES: dict[str, tuple[str, ...]] = {
    "payload": ("How much weight can {x} carry?", "How much can {x} carry?"),
    "weight": ("How heavy {be} {x}?", "How much {do} {x} weigh?"),
    "mass": ("How heavy {be} {x}?", "How much {do} {x} weigh?"),
    "price": ("How much {do} {x} cost?", "What {do} {x} cost?"),
    "speed": ("How fast can {x} go?", "How fast {be} {x}?"),
    "ceiling": ("How high can {x} fly?", "How high can {x} go?"),
    "altitude": ("How high can {x} fly?", "How high can {x} go?"),
    "retention period": ("How long {be} {x} kept?", "For how long {be} {x} kept?"),
    "storage period": ("How long {be} {x} kept?", "For how long {be} {x} stored?"),
    "length": ("How long {be} {x}?",),
    "height": ("How tall {be} {x}?", "How high {be} {x}?"),
    "width": ("How wide {be} {x}?",),
    "depth": ("How deep {be} {x}?",),
    "accuracy": ("How accurate {be} {x}?", "How precise {be} {x}?"),
    "precision": ("How precise {be} {x}?", "How accurate {be} {x}?"),
    "endurance": ("How long can {x} keep going?", "For how long can {x} operate?"),
    "name": ("What {be} {x} called?", "What {be} {x} named?"),
}
#: Words that may stand before a frame's key noun without changing what is measured.
_FRAME_MODIFIERS = frozenset(
    "maximum max top highest total default full standard usual typical flight service overall".split()
)
