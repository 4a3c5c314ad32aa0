"""The embedded, offline QA generator on the bundled SmolLM2-135M-Instruct.

A 135M model cannot be trusted to pick answers or emit JSON, so it is asked for far less: the
*answer* is chosen by rules (a number with its unit, money, a percentage, a date, a name) and is
therefore grounded by construction; the opening of the question is chosen by rules too (from the
answer's type, or "What is the <noun phrase>" for "<noun phrase> of <answer>"); the model only
completes the question, greedily, many prompts in one batched `generate` call. Every question is
then checked strictly and dropped when it fails.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.chunking import split_sentences
from tasks.qa import Budget, GenerationResult, validate_pair
from tasks.text import STOPWORDS, content_words, normalize_answer

#: Part of the cache key of local generations: bump when prompts, rules or checks change.
LOCAL_PROMPT_VERSION = "local-qg-v1"

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
_NUM = r"\d[\d,]*(?:\.\d+)?"
_UNITS = {
    "weight": "kg|g|mg|t|tonnes?|tons?|kilograms?|grams?|lb|lbs|pounds|oz|ounces",
    "length": "km|m|cm|mm|nm|mi|miles?|ft|feet|inch(?:es)?|metres?|meters?|kilometres?|kilometers?",
    "speed": "km/h|kph|mph|m/s|knots",
    "duration": "hours?|hrs?|h|minutes?|mins?|min|seconds?|secs?|s|days?|weeks?|months?|years?",
    "power": "W|kW|MW|GW|watts?|kilowatts?|megawatts?|hp|horsepower",
    "battery": "mAh|Ah|Wh|kWh",
    "energy": "MWh|GWh|TWh",
    "temperature": "°C|°F|degrees",
    "other": "L|l|ml|mL|litres?|liters?|gallons?|V|A|Hz|kHz|MHz|GHz|KB|MB|GB|TB|dB|px|fps",
}
_MONEY = (
    rf"[$€£¥]\s?{_NUM}(?:\s?(?:million|billion|thousand|bn|k)\b)?"
    rf"|{_NUM}\s?(?:million |billion )?(?:USD|EUR|GBP|dollars|euros)\b"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = (
    rf"\b(?:(?:{_MONTHS})\.?\s+{_DAY},?\s+\d{{4}}"  # March 5, 2024
    rf"|{_DAY}\s+(?:{_MONTHS})\s+\d{{4}}"  # 5 March 2024
    rf"|(?:{_MONTHS})\s+\d{{4}}"  # March 2024
    r"|\d{4}-\d{2}-\d{2})\b"  # 2024-03-05
)
_SPELLED = "two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
# "240 engineers", "20 new branches": an optional modifier (not itself a plural) and a plural noun.
_COUNT = (
    rf"\b(?:{_NUM}|{_SPELLED})(?:\s+[a-z-]*[a-rt-z])?"
    r"\s+(?:[a-z][a-z-]*s|people|children|staff|personnel|men|women)\b"
)
# Capitalised words, digits ("Q7") and name particles between them ("Pieter de Vries").
_NAME = (
    r"\b[A-Z][\w'’-]*"
    r"(?:\s+(?:(?:de|van|von|der|den|da|di|du|la|le|bin|al)\s+)?(?:[A-Z][\w'’-]*|\d[\w-]*))*"
)
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("money", re.compile(_MONEY)),
    ("percent", re.compile(rf"{_NUM}\s?(?:%|percent\b|per cent\b)")),
    ("date", re.compile(_DATE)),
    *[(f"quantity:{k}", re.compile(rf"{_NUM}\s?(?:{v})(?![\w/])")) for k, v in _UNITS.items()],
    ("year", re.compile(r"\b(?:1[5-9]\d\d|20\d\d)\b")),
    ("count", re.compile(_COUNT)),
    ("name", re.compile(_NAME)),
]
# Priority of answer kinds: facts with numbers make the most checkable questions.
_SCORE = {
    "money": 5,
    "percent": 5,
    "date": 5,
    "quantity": 5,
    "year": 4,
    "count": 4,
    "person": 4,
    "place": 3,
    "name": 2,
}
_OPENERS = {
    "money": "How much",
    "percent": "What percentage",
    "date": "When",
    "year": "In what year",
    "quantity:weight": "How much",
    "quantity:length": "How far",
    "quantity:speed": "How fast",
    "quantity:duration": "How long",
    "quantity:power": "How powerful",
    "quantity:battery": "What is the capacity",
    "quantity:energy": "How much energy",
    "quantity:temperature": "What temperature",
    "quantity:other": "What",
    "person": "Who",
    "place": "Where",
    "name": "What",
}
_PLACE_PREP = {"in", "at", "from", "near", "to", "into", "between", "and"}
_PERSON_CUES = {"by", "ceo", "founder", "engineer", "director", "dr", "mr", "mrs", "ms", "prof", "professor"}
_NOT_NAMES = set(_MONTHS.lower().split("|")) | STOPWORDS | {"its", "their", "this", "these", "field"}
# Words a question may use that its source sentence need not contain.
_QUESTION_WORDS = frozenset(
    "much many long far fast tall big high old large percentage percent year years total number amount "
    "name named called kind type date day time does did".split()
)
_META = re.compile(
    r"\b(the (text|passage|sentence|fact|answer|document|following)|this (sentence|fact|text))\b", re.I
)


@dataclass(frozen=True)
class Candidate:
    sentence: str
    answer: str
    kind: str
    opener: str  # the question's first words, given to the model
    score: float


def _noun_phrase_before_of(words: list[str]) -> str | None:
    """For '... a maximum payload of <answer>' return 'maximum payload' (up to 3 words back)."""
    if not words or words[-1].lower() != "of":
        return None
    phrase: list[str] = []
    for w in reversed(words[:-1]):
        bare = w.strip(",;:()\"'").lower()
        if not bare or bare in STOPWORDS or not bare.isalpha() or len(phrase) == 3:
            break
        phrase.insert(0, bare)
    return " ".join(phrase) or None


def answer_candidates(sentence: str) -> list[Candidate]:
    """Answer spans of one sentence with the question opener each suggests, best first."""
    found: list[Candidate] = []
    taken: list[tuple[int, int]] = []
    for pattern_kind, pattern in _PATTERNS:
        for m in pattern.finditer(sentence):
            start, end = m.span()
            if any(start < e and s < end for s, e in taken):
                continue  # inside a better span ("$1,299" is not also a count)
            kind, answer = pattern_kind, m.group(0).strip().rstrip(".,;:")
            before = sentence[:start].split()
            prev = before[-1].strip(",.").lower() if before else ""
            if kind == "name":
                toks = answer.split()
                while toks and toks[0].lower() in _NOT_NAMES:  # "The Quillfeather Q7" -> "Quillfeather Q7"
                    toks.pop(0)
                if not toks or (not before and len(toks) == 1 and toks == answer.split()):
                    continue  # a single capitalised sentence opener is usually just a word
                if re.search(r"-[a-z]", toks[-1]):
                    continue  # "Aurora-class": an adjective, not a name
                answer = " ".join(toks)
                if prev in _PERSON_CUES:
                    kind = "person"
                elif prev in _PLACE_PREP and all(t.isalpha() for t in toks):
                    kind = "place"
            elif kind == "year" and prev not in {"in", "since", "until", "by", "from", "of"}:
                continue
            if normalize_answer(sentence).count(normalize_answer(answer)) > 1 or len(answer) < 2:
                continue  # ambiguous: the answer occurs twice
            taken.append((start, end))
            family = kind.split(":")[0]
            np_ = _noun_phrase_before_of(before)
            if np_ and family in {"money", "percent", "quantity", "count"}:
                opener = f"What is the {np_}"  # "payload of 2.4 kg" -> "What is the maximum payload"
            elif kind == "count":
                opener = f"How many {answer.split()[-1]}"
            elif kind == "percent" and prev == "by":
                opener = "By what percentage"
            else:
                opener = _OPENERS[kind]
            found.append(Candidate(sentence, answer, kind, opener, _SCORE[family] + (1 if np_ else 0)))
    return sorted(found, key=lambda c: -c.score)


def select_candidates(text: str, k: int) -> list[Candidate]:
    """Up to `k` candidates from a chunk with distinct answers, spread over its sentences."""
    per_sentence = []
    for sentence in split_sentences(text):
        n = len(sentence.split())
        if 5 <= n <= 60 and not sentence.endswith("?"):
            per_sentence.append(answer_candidates(sentence))
    chosen: list[Candidate] = []
    seen: set[str] = set()
    for rank in range(max((len(c) for c in per_sentence), default=0)):
        layer = sorted((cs[rank] for cs in per_sentence if len(cs) > rank), key=lambda c: -c.score)
        for cand in layer:
            key = normalize_answer(cand.answer)
            if key not in seen and len(chosen) < k:
                seen.add(key)
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


class LocalQAGenerator:
    """Answer-aware question generation on a small local chat model (default: the bundled SmolLM2)."""

    max_concurrency = 1  # one model, batched instead of threaded
    prompt_version = LOCAL_PROMPT_VERSION

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str | None = None,
        pairs_per_chunk: int = 3,
        candidates_per_chunk: int | None = None,
        batch_size: int = 4,
        max_new_tokens: int = 20,
        max_prompts_per_call: int = 32,
        shots: Sequence[tuple[str, str, str]] = SHOTS,
        num_threads: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        name = model_name or Path(str(getattr(model.config, "_name_or_path", "") or "local")).name
        self.model_id = f"local:{name}"
        self.name = self.model_id
        self.pairs_per_chunk = pairs_per_chunk
        self.candidates_per_chunk = candidates_per_chunk or pairs_per_chunk + 2
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
            messages.append({"role": "user", "content": f"Fact: {cand.sentence}\nAnswer: {cand.answer}"})
        return messages

    def _prompt(self, cand: Candidate) -> str:
        prompt = self.tokenizer.apply_chat_template(
            self._messages(cand), tokenize=False, add_generation_prompt=True
        )
        return prompt + cand.opener  # the model continues the question we opened

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

    def _complete(self, prompts: list[str]) -> tuple[list[str], list[int], list[int]]:
        """Greedy completions, one batched generate call per `max_prompts_per_call` prompts;
        returns (texts, prompt tokens, generated tokens) per prompt.

        Layout of a batch row: [shared prefix][padding][suffix]. The prefix's KV cache is computed once
        and repeated over the batch; the attention mask hides the padding and generate derives position
        ids from the mask (cumsum), so every suffix sits right after the prefix, as in an unpadded prompt.
        """
        import copy

        import torch

        tok = self.tokenizer
        prefix_text, prefix_ids, prefix_cache = self._shared_prefix()
        if not all(p.startswith(prefix_text) for p in prompts):
            raise RuntimeError("chat template does not render the shared prefix verbatim")
        n_prefix = len(prefix_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        texts: list[str] = []
        t_in: list[int] = []
        t_out: list[int] = []
        for start in range(0, len(prompts), self.max_prompts_per_call):
            part = [p[len(prefix_text) :] for p in prompts[start : start + self.max_prompts_per_call]]
            suffixes = [tok(p, add_special_tokens=False)["input_ids"] for p in part]
            width = max(len(s) for s in suffixes)
            ids = torch.full((len(part), n_prefix + width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            ids[:, :n_prefix], mask[:, :n_prefix] = prefix_ids, 1
            for row, suffix in enumerate(suffixes):
                ids[row, n_prefix + width - len(suffix) :] = torch.tensor(suffix)
                mask[row, n_prefix + width - len(suffix) :] = 1
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(part))
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    past_key_values=cache,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=self._stop_ids,
                )
            for row, suffix in zip(out[:, ids.shape[1] :], suffixes, strict=True):
                keep = row[row != pad]
                texts.append(tok.decode(keep, skip_special_tokens=True))
                t_in.append(n_prefix + len(suffix))
                t_out.append(int(len(keep)))
        return texts, t_in, t_out

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

    def generate_many(self, texts: Sequence[str], budget: Budget | None = None) -> list[GenerationResult]:
        """QA pairs for several chunks with one batched model call (per `max_prompts_per_call`)."""
        per_chunk = [select_candidates(t, self.candidates_per_chunk) for t in texts]
        flat = [(i, c) for i, cands in enumerate(per_chunk) for c in cands]
        results = [GenerationResult([]) for _ in texts]
        if not flat:
            return results
        calls = -(-len(flat) // self.max_prompts_per_call)
        for _ in range(calls):
            if budget is not None and not budget.acquire():
                for r in results:
                    r.error, r.capped = "spend cap reached", True
                return results
        completions, t_in, t_out = self._with_threads(self._complete, [self._prompt(c) for _, c in flat])
        results[0].calls = calls  # the batch's calls are booked once, on its first chunk
        for (i, cand), completion, n_in, n_out in zip(flat, completions, t_in, t_out, strict=True):
            res = results[i]
            res.tokens_in += n_in
            res.tokens_out += n_out
            question = clean_question(cand.opener, completion)
            if len(res.pairs) < self.pairs_per_chunk and check_question(question, cand, texts[i]) is None:
                res.pairs.append({"question": question, "answer": cand.answer})
        if budget is not None:
            budget.add_tokens(sum(t_in) + sum(t_out))
        return results
