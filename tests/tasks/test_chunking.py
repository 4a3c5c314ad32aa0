"""Sentence splitting and sentence-aware chunking with overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.chunking import Page, chunk_pages, document_subject, make_chunk_id, split_sentences

SENTENCES = [
    f"Sentence number {i} talks about the drone model Q{i} and its {i + 3} rotors." for i in range(40)
]


def test_split_sentences_handles_abbreviations_headings_and_wraps():
    text = (
        "# Quillfeather Q7\n"
        "The Q7 weighs 1.8 kg and carries a maximum\npayload of 2.4 kg. Dr. Smith designed it, e.g. in Oslo.\n"
        "It costs $1,299! Is it good? J. Doe thinks so.\n\nSpecs\nBattery 5000 mAh"
    )
    assert split_sentences(text) == [
        "# Quillfeather Q7",
        "The Q7 weighs 1.8 kg and carries a maximum payload of 2.4 kg.",
        "Dr. Smith designed it, e.g. in Oslo.",
        "It costs $1,299!",
        "Is it good?",
        "J. Doe thinks so.",
        "Specs",
        "Battery 5000 mAh",
    ]
    assert split_sentences("Version 2.5 is out. 3 units shipped.") == [
        "Version 2.5 is out.",
        "3 units shipped.",
    ]


def test_chunks_bounded_overlapping_and_complete():
    pages = [Page(1, " ".join(SENTENCES[:20])), Page(2, " ".join(SENTENCES[20:]))]
    chunks = chunk_pages("doc", pages, chunk_tokens=50, overlap=15)
    assert all(c.n_tokens <= 50 and c.n_tokens == len(c.text.split()) for c in chunks)
    assert [c.idx for c in chunks] == list(range(len(chunks)))
    for s in SENTENCES:  # every sentence whole in some chunk: packing never cuts a normal sentence
        assert any(s in c.text for c in chunks)
    for prev, cur in zip(chunks, chunks[1:], strict=False):
        # the overlap is whole trailing sentences of the previous chunk, at most 15 tokens
        first = cur.text.split(". ")[0] + "."
        assert prev.text.endswith(first) and len(first.split()) <= 15
    assert chunks[0].page == 1 and chunks[-1].page == 2
    assert {c.page for c in chunks} == {1, 2}


def test_chunk_page_is_where_it_starts():
    pages = [Page(1, SENTENCES[0]), Page(2, SENTENCES[1]), Page(3, SENTENCES[2])]
    chunks = chunk_pages("doc", pages, chunk_tokens=30, overlap=0)
    assert [(c.page, c.text) for c in chunks] == [(1, SENTENCES[0] + " " + SENTENCES[1]), (3, SENTENCES[2])]


def test_chunk_ids_deterministic_and_document_specific():
    pages = [Page(1, " ".join(SENTENCES))]
    a = chunk_pages("docA", pages, 60, 10)
    assert a == chunk_pages("docA", pages, 60, 10)
    b = chunk_pages("docB", pages, 60, 10)
    assert [c.text for c in a] == [c.text for c in b]
    assert not {c.chunk_id for c in a} & {c.chunk_id for c in b}
    assert a[0].chunk_id == make_chunk_id("docA", 0, a[0].text) and len(a[0].chunk_id) == 64
    assert len({c.chunk_id for c in a}) == len(a)


def test_giant_sentence_is_split_hard_with_token_overlap():
    words = [f"w{i}" for i in range(130)]
    chunks = chunk_pages("doc", [Page(1, " ".join(words))], chunk_tokens=50, overlap=10)
    toks = [c.text.split() for c in chunks]
    assert all(len(t) <= 50 for t in toks)
    covered = {w for t in toks for w in t}
    assert covered == set(words)
    assert toks[1][:10] == toks[0][-10:]  # hard overlap: the last 10 tokens


def test_empty_and_invalid_arguments():
    assert chunk_pages("doc", [Page(1, "")], 50, 10) == []
    with pytest.raises(ValueError):
        chunk_pages("doc", [Page(1, "x")], 50, 50)
    with pytest.raises(ValueError):
        chunk_pages("doc", [Page(1, "x")], 0, 0)


def test_document_subject_is_the_titles_name_that_the_body_repeats():
    # chunking joins the title line onto the first sentence; the body's name for it is kept
    assert (
        document_subject(
            "Lumenvale Orbit 5.2 release notes Lumenvale Orbit is the ticket-routing service used by ..."
        )
        == "Lumenvale Orbit 5.2"
    )  # the version after the name stays, the genre words go
    assert document_subject("Lumenvale Orbit 5.2. Release Notes Lumenvale Orbit routes tickets.") == (
        "Lumenvale Orbit 5.2"
    )  # a full stop after the version ends the name and is not part of it
    assert (
        document_subject(
            "Ardwick Libraries Ardwick Central Library: Makerspace Rules The Ardwick Central Library opened ..."
        )
        == "the Ardwick Central Library"
    )  # a site header in front is not the body's name
    assert (
        document_subject(
            "Quillfeather Q7 Survey Drone: Technical Specification The Quillfeather Q7 is a survey drone ..."
        )
        == "the Quillfeather Q7"
    )
    assert (
        document_subject(
            "Brindlemoor Water Board 2026 annual summary The Brindlemoor Water Board supplies ..."
        )
        == "the Brindlemoor Water Board"
    )  # a year is no version
    # unsure: no title, a name the body never repeats, a one-word name
    assert document_subject("The Quillfeather Q7 is a drone. The Quillfeather Q7 weighs 1.8 kg.") is None
    assert document_subject("Northwind Bank reported a profit. The bank employs 5,300 people.") is None
    assert document_subject("Acme: annual report Acme grew by 4%.") is None
    assert document_subject("") is None


DEMO_SUBJECTS = {
    "ardwick-library-makerspace.html": "the Ardwick Central Library",
    "brindlemoor-water-board.txt": "the Brindlemoor Water Board",
    "carraway-cycling-club.md": "the Carraway Wheelers",
    "harrowgate-remote-work-policy-2026.md": "the Harrowgate Fen Institute",
    "kestrow-observatory-update.html": "the Kestrow Hill Observatory",
    "lumenvale-release-notes.txt": "Lumenvale Orbit 5.2",
    "marrowby-rail-depot-notice.txt": "the Marrowby Rail Depot",
    "orlith-seed-library-guide.md": "the Orlith Valley Seed Library",
    "pemberly-hospital-parking.txt": "Pemberly General Hospital",
    "quillfeather-q7-spec.pdf": "the Quillfeather Q7",
    "sandrel-botanic-garden.html": "the Sandrel Botanic Garden",
    "tidewell-harbour-bulletin.html": "the Tidewell Harbour Authority",
    "vellacourt-ferry-fleet.md": "Vellacourt Island Ferries",
}


def test_every_demo_document_gets_its_subject_from_its_first_chunk():
    from tasks.ingest import parse_document, scan_source

    files = scan_source(Path(__file__).parents[2] / "examples" / "docs", 50).files
    got = {}
    for f in files:
        first = chunk_pages(f.rel_path, parse_document(f, 50).pages, chunk_tokens=80, overlap=16)[0]
        got[f.rel_path] = document_subject(first.text)
    assert got == DEMO_SUBJECTS
