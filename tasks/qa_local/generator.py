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
openers ("What is the maximum payload ..." / "How much ..."), each valid one also rebuilt
around the verb its measure implies ("How much weight can the Q7 carry?", `checks.framed`); only
when those do not give enough distinct valid questions, a valid one is reopened by rule ("Who ..." / "Which person ...", "When ..." /
"On what date ...") or its subject named the other way ("the Quillfeather Q7" / "the Q7"). The training
data then holds several wordings of a fact and the question-hash split puts some in train and some in
the held-out eval: an eval question asks about a fact the adapter was trained on, in words it was not
trained on. `pairs_per_chunk` caps the facts per chunk; the pairs are up to pairs_per_chunk * variants.
A chunk may not name what its document is about ("The default retention period for closed tickets is
now 540 days"): each kept wording that names nothing of its own then names the document's subject
("How long are closed tickets kept in Lumenvale Orbit 5.2?", `checks.situated`).

One file (~550 lines): the generator class and its prompts are one concept; the rules it applies
are in the package's other modules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.qa import Budget, GenerationResult
from tasks.qa_local.checks import (
    _adds_content,
    check_question,
    clean_question,
    framed,
    name_aliases,
    renamed,
    reworded,
    situated,
    synonymed,
)
from tasks.qa_local.facts import Candidate, select_candidates
from tasks.splits import says_what, without_subject
from tasks.text import normalize_answer, normalize_question

# v4: "<named subject> carries a <noun phrase> of <value>" gets a rule-only question.
# v5: a wording with the synonym list's words said the other way; stricter wrong-kind words.
# v6: wordings rebuilt around the verb a measure implies ("How much weight can X carry?"); an
#     appositive name ("opened its new ferry terminal, the Saltmarsh Pier,") and a named subject of a
#     relation ("Quenby Robotics was founded by Tamsin Vey": "What was founded by Tamsin Vey?") get
#     rule-only questions; two wordings of one fact are never semantic duplicates.
# v7: only a question that passes the checks for its own answer makes another fact's wording
#     ambiguous (a completion asking for the wrong measure no longer takes the right one's frames);
#     an appositive name is also asked from what happened to it ("What was opened by <owner> on <date>?").
# v8: a wording that names nothing of its own is tied to the document's subject ("How long are closed
#     tickets kept in Lumenvale Orbit 5.2?"; the subject comes with each chunk, see `generate_many`).
# v9: a wording that asks about nothing but the subject ("What is the Marrowby Rail Depot?" for
#     "26 trains") is dropped; "Where is it?" says what it wants by its question word and stays.
LOCAL_PROMPT_VERSION = "local-qg-v9"


def local_prompt_version(pairs_per_chunk: int, variants: int) -> str:
    """The local generator's ``prompt_version`` for these settings (computable without the model)."""
    return f"{LOCAL_PROMPT_VERSION}:f{pairs_per_chunk}w{variants}"


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
        # Part of the cache key and recorded with every pair: what changes the output is in it.
        self.prompt_version = local_prompt_version(pairs_per_chunk, variants)
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
                fixed = [
                    q
                    for q in (cand.template, *cand.more_templates)
                    if q and check_question(q, cand, text) is None
                ]
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

    def generate_many(
        self,
        texts: Sequence[str],
        budget: Budget | None = None,
        subjects: Sequence[str | None] | None = None,
    ) -> list[GenerationResult]:
        """QA pairs for several chunks with one batched model call (per `max_prompts_per_call` rows).
        ``subjects[i]``: what the document of ``texts[i]`` is about (``tasks.chunking.document_subject``),
        named in its questions that name nothing of their own; None: questions as the chunk words them."""
        subjects = list(subjects) if subjects is not None else [None] * len(texts)
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
                text,
                [(c, fixed + questions.get((i, j), [])) for j, (c, fixed) in enumerate(plan)],
                subjects[i],
            )
        return results

    def _pick(
        self, text: str, asked: list[tuple[Candidate, list[str]]], subject: str | None = None
    ) -> list[dict[str, str]]:
        """Up to `variants` distinct valid questions per fact, facts with more variants first, at most
        `pairs_per_chunk` facts. A question already kept (normalised) is not kept again, for any answer.
        Each kept wording that names nothing of its own is then tied to the document's `subject`
        (`checks.situated`)."""
        askers: dict[str, set[str]] = {}
        for cand, qs in asked:
            # Only a question that passes the checks for its answer can make another ambiguous: a
            # completion that asked for the wrong measure is dropped anyway ("What is the maximum
            # speed of the Q7?" written for its ceiling), and must not take the speed's own wordings.
            passing = [q for q in qs if check_question(q, cand, text) is None]
            rebuilt = [
                f
                for src in passing
                for f in framed(src)
                if check_question(f, cand, text, derived=True) is None
            ]
            for q in [*passing, *rebuilt]:  # a rebuilt wording can collide too
                askers.setdefault(normalize_question(q), set()).add(normalize_answer(cand.answer))
        # A question written for two answers is ambiguous: it is kept for neither.
        seen = {q for q, answers in askers.items() if len(answers) > 1}
        aliases: list[tuple[str, str]] | None = None
        facts: list[tuple[Candidate, list[str]]] = []
        for cand, qs in asked:
            valid: list[str] = []

            def take(q: str, cand: Candidate = cand, valid: list[str] = valid, derived: bool = False) -> bool:
                key = normalize_question(q)
                if (
                    len(valid) < self.variants
                    and key not in seen
                    and check_question(q, cand, text, derived=derived) is None
                ):
                    seen.add(key)
                    valid.append(q)
                    return True
                return False

            # The first valid question's structural rewrites come right after it, the others' after
            # all of them: a fact's wordings differ in structure first, then in single words.
            for q in qs:
                if take(q) and len(valid) == 1:
                    for alt in framed(q):
                        take(alt, derived=True)
            for q in list(valid[1:]):
                for alt in framed(q):
                    take(alt, derived=True)
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
            if valid and len(valid) < self.variants:  # say its other words another way
                for q in list(valid):
                    alt = synonymed(q)
                    if alt:
                        take(alt)
            if valid:
                facts.append((cand, valid))
        facts.sort(key=lambda f: -len(f[1]))  # stable: by score within the same number of variants
        kept = facts[: self.pairs_per_chunk]
        if subject:
            kept = [(c, _situate(qs, c, text, subject)) for c, qs in kept]
        return [{"question": q, "answer": c.answer} for c, qs in kept for q in qs]


def _situate(questions: list[str], cand: Candidate, text: str, subject: str) -> list[str]:
    """The fact's wordings tied to the document's subject. The situated wording replaces the bare one
    (a bare one trained beside it would still be ambiguous across documents, and the fact keeps as
    many wordings as it had); a wording whose situated form fails the checks (the subject is the
    answer, or would leak one of its numbers) stays as it was. The subject counts as the chunk's
    text for grounding: its number ("5.2") is the title's, not invented. A wording that asks about
    nothing but the subject ("What is the Marrowby Rail Depot?" for "26 trains",
    `tasks.splits.says_what`) is dropped: it does not say what it asks ("Where is the depot?" for a
    place says it by its question word; it is trained, never held out)."""
    grounds = f"{text}\n{subject}"
    out: list[str] = []
    for q in questions:
        s = situated(q, subject)
        if s is not None and check_question(s, cand, grounds, derived=True) is None:
            q = s
        if _asks_nothing(without_subject(q, subject)):
            continue
        if normalize_question(q) not in {normalize_question(o) for o in out}:
            out.append(q)
    return out


def _asks_nothing(bare: str) -> bool:
    """A wording, its subject out, with no content word and no question word that says what kind of
    answer it wants ("What is it?" for "26 trains"; not "Where is it?", "When did it open?")."""
    return not says_what(bare) and re.search(r"\b(?:where|when|who)\b", bare, re.I) is None
