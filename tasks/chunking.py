"""Sentence splitting and sentence-aware chunking with overlap.

Sizes are counted in whitespace tokens: cheap, tokenizer-independent and stable across model
changes (a chunk id must not change when the base model does). Sentences are packed whole into a
chunk; only a sentence longer than a whole chunk is cut hard. The overlap is made of the previous
chunk's trailing sentences when they fit in `overlap` tokens, else of its last `overlap` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.records import Chunk, chunk_id_for

if TYPE_CHECKING:
    from storage.registry import Registry

# Abbreviations whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st vs etc eg ie e.g i.e fig figs no nos approx ca cf al inc ltd co corp
    dept est jan feb mar apr jun jul aug sep sept oct nov dec mt ft vol pp ed eds""".split()
)
# A candidate boundary: end punctuation (optionally closing quotes/brackets), whitespace, then
# something that can start a sentence.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class Page:
    number: int  # 1-based
    text: str


def _looks_like_heading(prev: str, line: str) -> bool:
    """A short line without end punctuation followed by a capitalised line is a heading or a list
    item, not a soft wrap (PDF text wraps mid-sentence; the next line then starts in lower case)."""
    if re.search(r"[.!?:;,\"')\]]$", prev):
        return False
    return len(prev.split()) <= 12 and bool(re.match(r"[\W_]*[A-Z0-9]", line))


def split_sentences(text: str) -> list[str]:
    """Split text into sentences: blank lines and line-final headings end a sentence, as does
    `.`/`!`/`?` before a capital or digit, unless the period ends a known abbreviation or an initial."""
    sentences: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        # Inside a paragraph, line breaks are soft wraps unless the line looks like a heading.
        lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
        merged: list[str] = []
        for line in lines:
            if merged and _looks_like_heading(merged[-1], line):
                merged.append(line)
            elif merged:
                merged[-1] = f"{merged[-1]} {line}"
            else:
                merged.append(line)
        for block in merged:
            start = 0
            for m in _BOUNDARY.finditer(block):
                head = block[start : m.start()].rstrip("\"')]")
                last = head.split()[-1] if head.split() else ""
                word = last.rstrip(".").lower()
                # "Dr. Smith", "e.g. Paris", "J. Doe": not a boundary.
                if last.endswith(".") and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
                    continue
                piece = block[start : m.start() + len(m.group(0))].strip()
                if piece:
                    sentences.append(piece)
                start = m.end()
            tail = block[start:].strip()
            if tail:
                sentences.append(tail)
    return sentences


# A word of a title's name: capitalised, or a version or model number ("5.2", "2026/07").
_NAME_WORD = re.compile(r"[A-Z][\w'’&.-]*|\d[\w./-]*")
_YEAR = re.compile(r"(?:19|20)\d\d")


#: Bump when :func:`document_subject` names other subjects: questions name the subject, so the
#: chunks asked under the old rule are then on another fingerprint (``moral qa regenerate``; the
#: cache is keyed by the subject itself, so an unchanged subject's reply is still read).
SUBJECT_RULE = "subject-1"


def document_subject(first_chunk: str, max_words: int = 8) -> str | None:
    """The name a document is about, from its title at the head of its first chunk (chunking joins
    the title line onto the first sentence): "Lumenvale Orbit 5.2 release notes Lumenvale Orbit is
    ..." -> "Lumenvale Orbit 5.2", "Sandrel Botanic Garden: Visitor Notes The Sandrel Botanic Garden
    opened ..." -> "the Sandrel Botanic Garden"; None when unsure.

    The title's leading name is its capitalised words and numbers up to a lower-case word, a "The"
    (the body begins) or a colon, at most `max_words`. The subject is the longest run of two or more
    of those words that the rest of the chunk names too (a site header or a genre word in front,
    "Ardwick Libraries Ardwick Central Library", or after it, "Quillfeather Q7 Survey Drone", is not
    the body's name), with a version number right after it kept ("5.2"; not a year), and "the" in
    front when the body says "the <name>". A chunk that opens with a plain sentence names nothing
    twice and gives None."""
    words = first_chunk.split()
    run: list[str] = []
    for word in words[:max_words]:
        bare = word.rstrip(":,")
        if bare[:1].isdigit():
            bare = bare.rstrip(".")  # "Orbit 5.2. Release notes": the full stop is not the version's
        if word in ("The", "A", "An") or not _NAME_WORD.fullmatch(bare):
            break
        run.append(bare)
        if bare != word:  # "Brindlemoor Water Board:" and "Orbit 5.2." end the name
            break
    body = " ".join(words[len(run) :])
    best: tuple[int, int] | None = None
    for i in range(len(run)):
        if not run[i][0].isupper():
            continue
        for j in range(len(run), i + 1, -1):
            if (best is None or j - i > best[1] - best[0]) and re.search(
                rf"(?<![\w-]){re.escape(' '.join(run[i:j]))}(?![\w-])", body
            ):
                best = (i, j)
    if best is None:
        return None
    i, j = best
    named = " ".join(run[i:j])
    while j < len(run) and run[j][0].isdigit() and not _YEAR.fullmatch(run[j]):
        j += 1
    article = re.search(rf"(?:^|\s)(?:the|The) {re.escape(named)}(?![\w-])", body)
    return ("the " if article else "") + " ".join(run[i:j])


def document_subjects(
    reg: Registry, doc_ids: Sequence[str], status: str | None = "active"
) -> dict[str, str | None]:
    """What each document is about (:func:`document_subject`), from the head of its first chunk (one
    query for all documents; the chunk read without instruction-like sentences, like every chunk QA
    reads). The QA stage names it in questions; the hold-outs leave it out of their distances, with
    ``status=None`` for retired versions of a document too."""
    from tasks.text import knowledge_text

    return {
        c.doc_id: document_subject(knowledge_text(c.text)) for c in reg.first_chunks(doc_ids, status=status)
    }


def make_chunk_id(doc_id: str, idx: int, text: str) -> str:
    """Deterministic chunk id (sha256 of doc id, position and text): the registry's own definition,
    so DuckDB and Chroma rows agree without recomputation."""
    return chunk_id_for(doc_id, idx, text)


def chunk_pages(doc_id: str, pages: Sequence[Page], chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Pack the pages' sentences into chunks of at most `chunk_tokens` whitespace tokens, each
    (after the first) starting with up to `overlap` tokens of the previous one."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(
            f"overlap must be in [0, chunk_tokens), got {overlap} with chunk_tokens={chunk_tokens}"
        )

    # Units: (page, tokens) of each sentence. A sentence longer than a chunk is cut into pieces of
    # chunk_tokens - overlap, so that each piece still fits after the previous piece's overlap tail.
    units: list[tuple[int, list[str]]] = []
    piece = chunk_tokens - overlap
    for page in pages:
        for sentence in split_sentences(page.text):
            toks = sentence.split()
            if len(toks) <= chunk_tokens:
                units.append((page.number, toks))
            else:
                units.extend((page.number, toks[i : i + piece]) for i in range(0, len(toks), piece))

    chunks: list[Chunk] = []
    current: list[tuple[int, list[str]]] = []
    fresh = False  # does `current` hold any unit not already emitted in the previous chunk?

    def size(us: list[tuple[int, list[str]]]) -> int:
        return sum(len(t) for _, t in us)

    def emit() -> None:
        toks = [t for _, ts in current for t in ts]
        text = " ".join(toks)
        idx = len(chunks)
        chunks.append(Chunk(make_chunk_id(doc_id, idx, text), doc_id, idx, text, current[0][0], len(toks)))

    def overlap_units(prev: list[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
        if overlap == 0:
            return []
        tail: list[tuple[int, list[str]]] = []
        for unit in reversed(prev):  # whole trailing sentences that fit
            if size(tail) + len(unit[1]) > overlap:
                break
            tail.insert(0, unit)
        if tail:
            return tail
        page, toks = prev[-1]  # last sentence is longer than the overlap: take its last tokens
        return [(page, toks[-overlap:])]

    for unit in units:
        if current and size(current) + len(unit[1]) > chunk_tokens:
            emit()
            carried = overlap_units(current)
            # Drop overlap from the front until the new sentence fits (always progresses: the
            # new unit alone is at most chunk_tokens).
            while carried and size(carried) + len(unit[1]) > chunk_tokens:
                carried = carried[1:] if len(carried) > 1 else []
            current, fresh = carried, False
        current.append(unit)
        fresh = True
    if current and fresh:
        emit()
    return chunks
