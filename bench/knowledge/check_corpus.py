"""Static checks of the knowledge benchmark corpus (documents, facts, questions); no model is loaded.

Run: `.venv/bin/python bench/knowledge/check_corpus.py` (exit status 1 and a list of problems if any check
fails; a summary of counts either way). Needs pypdf for the PDFs.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE / "docs"
PARTS = ("part1", "part2", "part3")
KINDS = (".pdf", ".md", ".txt", ".html")
GROUPS = ("trained", "document_only", "unanswerable")
STYLES = ("opener", "reversed", "synonym", "plain")
MINIMA = {"trained": 110, "document_only": 55, "unanswerable": 24, "reversed": 25}


# ------------------------------------------------------------------------------------------- helpers
def normalize(text: str) -> str:
    """Lowercase; punctuation removed except a '.' between two digits; whitespace collapsed."""
    text = text.lower()
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "", text)
    text = re.sub(r"[^\w\s.]|_", "", text)
    return " ".join(text.split())


def contains(haystack: str, needle: str) -> bool:
    """Whole-word containment of normalize(needle) in normalize(haystack)."""
    n = normalize(needle)
    return bool(n) and f" {n} " in f" {normalize(haystack)} "


class _Text(HTMLParser):
    SKIP = {"head", "script", "style", "title"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1
        self.parts.append(" ")

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def doc_text(path: Path) -> str:
    """Visible text of one document (PDF via pypdf, HTML without tags and <head>, others as is)."""
    if path.suffix == ".pdf":
        from pypdf import PdfReader

        return "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".html":
        parser = _Text()
        parser.feed(raw)
        parser.close()
        return "".join(parser.parts)
    return raw


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_texts() -> dict[str, str]:
    """{'part1/name.pdf': text, ..., 'edited/name.md': text} for every document."""
    return {
        f"{p.parent.name}/{p.name}": doc_text(p)
        for p in sorted(DOCS.glob("*/*"))
        if p.is_file() and p.suffix in KINDS
    }


# ------------------------------------------------------------------------------------------- checks
def check() -> tuple[list[str], dict]:
    problems: list[str] = []
    err = problems.append
    texts = load_texts()
    originals = {k: v for k, v in texts.items() if not k.startswith("edited/")}
    summary: dict = {"documents": {}}

    # documents: 3 parts x one document per format, 150-230 words each
    for part in PARTS:
        kinds = sorted(Path(k).suffix for k in originals if k.startswith(part + "/"))
        if kinds != sorted(KINDS):
            err(f"{part}: formats {kinds}, expected one each of {sorted(KINDS)}")
    for name, text in originals.items():
        words = len(text.split())
        summary["documents"][name] = {"words": words}
        if not 150 <= words <= 230:
            err(f"{name}: {words} words (expected 150-230)")
    edited = sorted(k for k in texts if k.startswith("edited/"))
    for name in edited:
        base = Path(name).name
        sources = [k for k in originals if Path(k).name == base]
        if len(sources) != 1:
            err(f"{name}: no unique original with that file name")
    edited_parts = sorted(
        next(k for k in originals if Path(k).name == Path(e).name).split("/")[0] for e in edited
    )
    if edited_parts != ["part1", "part2"]:
        err(f"edited documents come from {edited_parts}, expected one from part1 and one from part2")

    # facts
    facts = read_jsonl(HERE / "facts.jsonl")
    by_id: dict[str, dict] = {}
    for f in facts:
        fid = f.get("fact_id")
        if fid in by_id:
            err(f"duplicate fact_id {fid}")
        by_id[fid] = f
        for key in ("fact_id", "part", "doc", "value", "document_only", "sentence", "note"):
            if key not in f:
                err(f"{fid}: missing {key}")
        doc = f["doc"]
        if doc not in originals:
            err(f"{fid}: unknown doc {doc}")
            continue
        if f["part"] != int(doc[4]):
            err(f"{fid}: part {f['part']} but doc {doc}")
        if not f["value"] or not all(isinstance(v, str) and v.strip() for v in f["value"]):
            err(f"{fid}: empty value aliases")
            continue
        if not contains(originals[doc], f["sentence"]):
            err(f"{fid}: sentence not found in {doc}: {f['sentence']!r}")
        if not contains(f["sentence"], f["value"][0]):
            err(f"{fid}: value {f['value'][0]!r} not in its sentence")
        if not contains(originals[doc], f["value"][0]):
            err(f"{fid}: value {f['value'][0]!r} not in {doc}")
    per_doc = collections.Counter(f["doc"] for f in facts)
    per_doc_only = collections.Counter(f["doc"] for f in facts if f["document_only"])
    for name in originals:
        summary["documents"][name].update(facts=per_doc[name], document_only=per_doc_only[name])
        if not 8 <= per_doc[name] <= 10:
            err(f"{name}: {per_doc[name]} facts (expected 8-10)")
        if per_doc_only[name] == 0:
            err(f"{name}: no document_only fact")

    # names (values with letters) belong to one document unless the note marks a cross-document relation
    for f in facts:
        v = f["value"][0]
        if re.search(r"[A-Za-z]{3}", v) and not re.search(r"\d", v):
            docs = [k for k, t in originals.items() if contains(t, v)]
            if len(docs) > 1 and "cross-document" not in f["note"]:
                err(f"{f['fact_id']}: {v!r} appears in {docs} but the note marks no cross-document relation")
    summary["cross_document_facts"] = sorted(f["fact_id"] for f in facts if "cross-document" in f["note"])

    # edited documents: identical to the original except for the edited facts' values
    edited_facts = [f for f in facts if "edited_value" in f]
    for name in edited:
        base = Path(name).name
        source = next(k for k in originals if Path(k).name == base)
        mine = [f for f in edited_facts if f["doc"] == source]
        if not 3 <= len(mine) <= 4:
            err(f"{name}: {len(mine)} edited facts (expected 3-4)")
        rebuilt = normalize(originals[source])
        for f in mine:
            old_s = normalize(f["sentence"])
            new_s = normalize(f["sentence"].replace(f["value"][0], f["edited_value"][0], 1))
            if old_s == new_s:
                err(f"{f['fact_id']}: edited value does not change the sentence")
            if not contains(texts[name], new_s):
                err(f"{f['fact_id']}: edited sentence not in {name}: {new_s!r}")
            if contains(texts[name], old_s):
                err(f"{f['fact_id']}: original sentence still in {name}")
            rebuilt = rebuilt.replace(old_s, new_s)
        if rebuilt != normalize(texts[name]):
            err(f"{name}: differs from {source} beyond the edited values")
    for f in edited_facts:
        if not any(Path(e).name == Path(f["doc"]).name for e in edited):
            err(f"{f['fact_id']}: edited_value but its document has no edited version")

    # questions
    questions = read_jsonl(HERE / "questions.jsonl")
    qids = [q["qid"] for q in questions]
    if len(set(qids)) != len(qids):
        err("duplicate qids in questions.jsonl")
    all_text = " ".join(texts.values())
    for q in questions:
        qid, group = q["qid"], q.get("group")
        for key in ("qid", "fact_id", "part", "group", "question", "answers", "style", "split"):
            if key not in q:
                err(f"{qid}: missing {key}")
        if group not in GROUPS:
            err(f"{qid}: group {group!r}")
        if q.get("style") not in STYLES:
            err(f"{qid}: style {q.get('style')!r}")
        if q.get("split") not in ("tune", "report"):
            err(f"{qid}: split {q.get('split')!r}")
        if re.match(r"(it|its|they|their|he|she|the company)\b", q["question"], re.I):
            err(f"{qid}: question starts with a pronoun: {q['question']!r}")
        if group == "unanswerable":
            if q["fact_id"] is not None or q["answers"]:
                err(f"{qid}: unanswerable question with a fact_id or answers")
            entities = q.get("entities") or []
            if not entities:
                err(f"{qid}: unanswerable question lists no entities")
            for e in entities:
                if not contains(q["question"], e) and not contains(q["question"].replace("'", ""), e):
                    err(f"{qid}: entity {e!r} not named in the question")
                if contains(all_text, e):
                    err(f"{qid}: entity {e!r} appears in a document")
            continue
        f = by_id.get(q["fact_id"])
        if f is None:
            err(f"{qid}: unknown fact_id {q['fact_id']}")
            continue
        if q["part"] != f["part"]:
            err(f"{qid}: part {q['part']} but fact part {f['part']}")
        if group != ("document_only" if f["document_only"] else "trained"):
            err(f"{qid}: group {group} but fact document_only={f['document_only']}")
        if not q["answers"]:
            err(f"{qid}: no answers")
            continue
        if not contains(originals[f["doc"]], q["answers"][0]):
            err(f"{qid}: answer {q['answers'][0]!r} not in {f['doc']}")
        if q["style"] != "reversed" and q["answers"] != f["value"]:
            err(f"{qid}: answers differ from the fact's value but the style is not 'reversed'")
        if q["style"] == "reversed" and q["answers"] == f["value"]:
            err(f"{qid}: reversed question asks for the fact's own value")
        for a in q["answers"]:
            if contains(q["question"], a):
                err(f"{qid}: answer alias {a!r} appears in the question")
        if contains(f["sentence"], q["question"].rstrip("?.")):
            err(f"{qid}: question copies its sentence")

    # splits: every third question of each group (in qid order) is 'tune'
    for group in GROUPS:
        rows = [q for q in questions if q["group"] == group]
        for k, q in enumerate(rows):
            want = "tune" if k % 3 == 2 else "report"
            if q["split"] != want:
                err(f"{q['qid']}: split {q['split']}, expected {want} (position {k} in {group})")

    counts = collections.Counter(q["group"] for q in questions)
    counts["reversed"] = sum(q["style"] == "reversed" for q in questions)
    for key, minimum in MINIMA.items():
        if counts[key] < minimum:
            err(f"{counts[key]} {key} questions (expected at least {minimum})")
    asked = {q["fact_id"] for q in questions if q["fact_id"]}
    for fid in by_id:
        if fid not in asked:
            err(f"{fid}: no question asks about this fact")

    # edit questions
    edit_qs = read_jsonl(HERE / "edit_questions.jsonl")
    for q in edit_qs:
        f = by_id.get(q["fact_id"])
        if f is None or "edited_value" not in f:
            err(f"{q['qid']}: fact {q['fact_id']} is not an edited fact")
            continue
        if q["answers"] != f["edited_value"] or q["old_answers"] != f["value"]:
            err(f"{q['qid']}: answers/old_answers differ from the fact's edited_value/value")
        edited_doc = "edited/" + Path(f["doc"]).name
        if not contains(texts[edited_doc], q["answers"][0]):
            err(f"{q['qid']}: new answer {q['answers'][0]!r} not in {edited_doc}")
        if q.get("style") not in STYLES:
            err(f"{q['qid']}: style {q.get('style')!r}")
        for a in q["answers"] + q["old_answers"]:
            if contains(q["question"], a):
                err(f"{q['qid']}: alias {a!r} appears in the question")
    per_fact = collections.Counter(q["fact_id"] for q in edit_qs)
    for f in edited_facts:
        if not 1 <= per_fact[f["fact_id"]] <= 2:
            err(f"{f['fact_id']}: {per_fact[f['fact_id']]} edit questions (expected 1-2)")

    summary.update(
        facts=len(facts),
        document_only_facts=sum(f["document_only"] for f in facts),
        edited_facts=len(edited_facts),
        questions=len(questions),
        edit_questions=len(edit_qs),
        by_group={g: counts[g] for g in GROUPS},
        by_group_split={
            g: dict(collections.Counter(q["split"] for q in questions if q["group"] == g)) for g in GROUPS
        },
        by_style=dict(collections.Counter(q["style"] for q in questions)),
        by_part_group={
            p: dict(collections.Counter(q["group"] for q in questions if q["part"] == p)) for p in (1, 2, 3)
        },
    )
    return problems, summary


def main() -> int:
    problems, summary = check()
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for p in problems:
        print("PROBLEM:", p)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
