"""What people read about a refresh, as text: the CLI's summary, the evaluation tables, the
knowledge-by-document report and the registry table.

Everything here reads what the stages stored (registry rows, ``evaluations/vN.json``) and renders
it; no model is loaded and nothing is computed that the gate did not already decide.  The plots and
the HTML report are in :mod:`tasks.plots`; the Prefect artifacts in :mod:`flows.artifacts`.
"""

from __future__ import annotations

import html
import json
import math

from storage.registry import Registry, format_version
from storage.settings import Settings

MODELS = ("base", "champion", "candidate")
REGISTRY_TABLE_KEY = "moral-registry"
#: The plots inlined in the Prefect markdown artifact are rendered smaller than the saved PNGs.
ARTIFACT_PLOT_DPI = 72


def summary_text(s: dict) -> str:
    lines = [f"refresh {s['run_id'][:8]}: {s.get('status')} in {s.get('seconds', 0):.1f} s"]
    lines.append(
        f"  documents: {s['documents_new']} new, {s['documents_unchanged']} unchanged, "
        f"{s.get('documents_retired', 0)} retired, {len(s['documents_quarantined'])} quarantined"
    )
    for q in s["documents_quarantined"]:
        lines.append(f"    quarantined {q['path']}: {q['reason']}")
    lines.append(
        f"  qa: {s['qa_generated']} pairs generated, {s['qa_duplicates']} duplicates, {s['qa_indexed']} indexed, "
        f"{s.get('qa_failed', 0)} chunks failed; {s['llm_calls']} LLM calls, {s.get('llm_tokens', 0)} tokens"
    )
    if s.get("chunks_on_old_fingerprint"):
        lines.append(
            f"  qa: {s['chunks_on_old_fingerprint']} chunks keep pairs from an older generation (model, prompt "
            "or pairs/wordings settings changed since); `moral qa regenerate` renews them"
        )
    if (
        s["documents_new"] == 0
        and s["qa_generated"] == 0
        and s["llm_calls"] == 0
        and s.get("version") is None
        and not s.get("stopped_after")
    ):
        lines.append("  nothing new: no model loaded, no LLM call")
    tm = (s.get("train") or {}).get("metrics") or {}
    if tm.get("examples"):
        kinds = ", ".join(f"{n} {k.replace('_', '-')}" for k, n in tm["examples"].items() if n)
        lines.append(
            f"  train: {kinds}; {tm.get('steps')} steps in {tm.get('seconds')} s "
            f"({tm.get('tokens_per_second')} tokens/s); kept step {tm.get('best_step')}: {tm.get('checkpoint')}"
        )
    if s.get("version"):
        lines.append(f"  version: {s['version']}")
    lines.append(f"  decision: {s['decision']}")
    for r in s.get("reasons", []):
        lines.append(f"    {r}")
    for w in s.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# evaluation tables


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def evaluation_table(reg: Registry, version: int) -> list[dict]:
    """One row per (suite, mode, metric): each model's value with its 95% CI and n (latest evaluation)."""
    rows: dict[tuple[str, str, str], dict] = {}
    for e in reg.latest_evaluations(version):
        row = rows.setdefault(
            (e.suite, e.mode, e.metric), {"suite": e.suite, "mode": e.mode, "metric": e.metric}
        )
        row[e.model] = {"value": e.value, "n": e.n, "ci_low": e.ci_low, "ci_high": e.ci_high}
    return list(rows.values())


def score_cell(v: dict | None) -> str:
    if not v:
        return "–"
    return f"{_fmt(v['value'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] n={v['n']}"


def evaluation_markdown(reg: Registry, version: int, settings: Settings | None = None) -> str:
    """The run's report: the decision, then base / champion / candidate with CIs and sample sizes;
    with ``settings``, also the knowledge per document from the saved evaluation."""
    v = reg.get_version(version)
    table = evaluation_table(reg, version)
    models = [m for m in MODELS if any(m in r for r in table)]
    lines = [f"# {v.name}: {v.status}", ""]
    if v.decision_reasons:
        lines += ["## Decision", ""] + [f"- {r}" for r in v.decision_reasons] + [""]
    lines += ["## Evaluation (value [95% CI] n)", ""]
    lines.append("| suite | mode | metric | " + " | ".join(models) + " |")
    lines.append("|" + " --- |" * (3 + len(models)))
    for r in table:
        lines.append(
            f"| {r['suite']} | {r['mode']} | {r['metric']} | "
            + " | ".join(score_cell(r.get(m)) for m in models)
            + " |"
        )
    markdown = "\n".join(lines) + "\n"
    if settings is not None:
        markdown += "\n" + knowledge_section(saved_evaluation(settings, version))
    return markdown


# --------------------------------------------------------------------------------------------------
# knowledge per document

#: The held-out document suites (closed key "X", open key "X:open") the per-document view counts.
KNOWLEDGE_SUITES = ("paraphrase", "unseen", "retention")
KNOWLEDGE_MODES = (("closed", ""), ("open", ":open"))
KNOWLEDGE_NOT_RECORDED = (
    "per-document knowledge not recorded for this version (evaluated by an older release; "
    "`moral eval --rerun` records it)"
)
UNKNOWN_DOCUMENT = "(unknown document)"
_DIFFS_SHOWN = 5


def saved_evaluation(settings: Settings, version: int) -> dict | None:
    """The parsed ``evaluations/vN.json`` of a version, None when it has not been evaluated."""
    from storage.home import scores_path

    path = scores_path(settings, version)
    return json.loads(path.read_text()) if path.exists() else None


def knowledge_recorded(saved: dict) -> bool:
    """Whether a saved evaluation carries the per-item facts and answers (newer releases only)."""
    return all(isinstance(saved.get(k), dict) for k in ("items", "predictions", "fact_docs"))


def reference_model(saved: dict) -> str:
    """What the candidate is compared with: the champion when it was evaluated, else the base model."""
    scores = saved.get("scores") or {}
    return "champion" if any("champion" in by for by in scores.values()) else "base"


def _answered(marks: list[float]) -> bool:
    # A fact is known when at least half of its questions are answered strictly right.
    return bool(marks) and 2 * sum(1 for m in marks if m == 1) >= len(marks)


def knowledge_by_document(saved: dict) -> list[dict]:
    """Per document (path) of the held-out suites: its distinct facts, how many the reference model
    (champion, else base) and the candidate answer closed- and open-book, and the facts learned
    (candidate answers closed-book, reference does not) and forgotten (the reverse), each with its
    first question, gold and both answers.  A fact counts as answered by a model in a mode when at
    least half of its questions there have ``ra_strict == 1``.  Sorted by path; [] for a file saved
    by an older release (see :func:`knowledge_recorded`)."""
    if not knowledge_recorded(saved):
        return []
    scores = saved.get("scores") or {}
    items, predictions, fact_docs = saved["items"], saved["predictions"], saved["fact_docs"]
    reference = reference_model(saved)
    models = (reference, "candidate")
    first: dict[str, dict[str, tuple[str, int, dict]]] = {}  # fact -> mode -> its first item
    marks: dict[tuple[str, str, str], list[float]] = {}  # (fact, mode, model) -> ra_strict per question
    for mode, suffix in KNOWLEDGE_MODES:
        for suite in KNOWLEDGE_SUITES:
            key = suite + suffix
            strict = {m: ((scores.get(key) or {}).get(m) or {}).get("ra_strict") or [] for m in models}
            for i, item in enumerate(items.get(key) or []):
                fact = item.get("fact_id")
                if not fact:
                    continue
                first.setdefault(fact, {}).setdefault(mode, (key, i, item))
                for m in models:
                    if i < len(strict[m]):
                        marks.setdefault((fact, mode, m), []).append(strict[m][i])

    def answer(key: str, model: str, i: int) -> str | None:
        answers = (predictions.get(key) or {}).get(model) or []
        return answers[i] if i < len(answers) else None

    def diff(fact: str) -> dict:
        key, i, item = first[fact]["closed"]
        return {
            "fact_id": fact,
            "question": item.get("question"),
            "gold": item.get("gold"),
            "reference_answer": answer(key, reference, i),
            "candidate_answer": answer(key, "candidate", i),
        }

    by_doc: dict[str, list[str]] = {}
    for fact in first:  # in order of first appearance: closed-book suites first, then item order
        doc = fact_docs.get(fact) or {}
        by_doc.setdefault(doc.get("path") or doc.get("doc_id") or UNKNOWN_DOCUMENT, []).append(fact)
    rows = []
    for path in sorted(by_doc):
        facts = by_doc[path]
        known = {
            (mode, m): {f for f in facts if _answered(marks.get((f, mode, m), []))}
            for mode, _ in KNOWLEDGE_MODES
            for m in models
        }
        ref_closed, cand_closed = known[("closed", reference)], known[("closed", "candidate")]
        rows.append(
            {
                "document": path,
                "facts": len(facts),
                "reference": reference,
                **{
                    mode: {
                        "reference": len(known[(mode, reference)]),
                        "candidate": len(known[(mode, "candidate")]),
                    }
                    for mode, _ in KNOWLEDGE_MODES
                },
                "learned": [diff(f) for f in facts if f in cand_closed and f not in ref_closed],
                "forgot": [diff(f) for f in facts if f in ref_closed and f not in cand_closed],
            }
        )
    return rows


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _short(text: object, limit: int = 160) -> str:
    if text is None:
        return "–"
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _diff_line(d: dict, reference: str) -> str:
    return (
        f"{_short(d['question'])} — gold: {_short(d['gold'])}; {reference}: {_short(d['reference_answer'])}; "
        f"candidate: {_short(d['candidate_answer'])}"
    )


KNOWLEDGE_HEADING = "## Knowledge by document"
KNOWLEDGE_COLUMNS = (
    "document",
    "facts",
    "reference closed",
    "candidate closed",
    "reference open",
    "candidate open",
    "learned",
    "forgot",
)
_KNOWLEDGE_NOTE = (
    "Held-out questions (paraphrase, unseen, retention). A fact counts as answered when at least half "
    "of its questions are answered strictly right; learned = the candidate answers it closed-book and "
    "the reference does not, forgot = the reverse."
)


def _knowledge_cells(r: dict) -> list[str]:
    return [
        r["document"],
        str(r["facts"]),
        str(r["closed"]["reference"]),
        str(r["closed"]["candidate"]),
        str(r["open"]["reference"]),
        str(r["open"]["candidate"]),
        str(len(r["learned"])),
        str(len(r["forgot"])),
    ]


def knowledge_markdown(rows: list[dict]) -> str:
    """The per-document table (rows of :func:`knowledge_by_document`), then per document up to five
    learned and five forgotten facts with question, gold and both answers."""
    lines = [KNOWLEDGE_HEADING, ""]
    if not rows:
        return "\n".join(lines + ["no held-out document questions in this evaluation", ""])
    lines += [f"Reference: {rows[0]['reference']}. {_KNOWLEDGE_NOTE}", ""]
    lines.append("| " + " | ".join(KNOWLEDGE_COLUMNS) + " |")
    lines.append("|" + " --- |" * len(KNOWLEDGE_COLUMNS))
    lines += ["| " + " | ".join(_md_cell(c) for c in _knowledge_cells(r)) + " |" for r in rows]
    for r in rows:
        if not (r["learned"] or r["forgot"]):
            continue
        lines += ["", f"### {r['document']}"]
        for label, diffs in (("Learned", r["learned"]), ("Forgot", r["forgot"])):
            if diffs:
                lines += ["", f"{label} ({len(diffs)}):", ""]
                lines += [f"- {_diff_line(d, r['reference'])}" for d in diffs[:_DIFFS_SHOWN]]
                if len(diffs) > _DIFFS_SHOWN:
                    lines.append(f"- … and {len(diffs) - _DIFFS_SHOWN} more")
    return "\n".join(lines) + "\n"


def knowledge_section(saved: dict | None) -> str:
    """The per-document markdown of a saved evaluation, or why there is none."""
    if saved is None:
        return f"{KNOWLEDGE_HEADING}\n\nnot evaluated yet\n"
    if not knowledge_recorded(saved):
        return f"{KNOWLEDGE_HEADING}\n\n{KNOWLEDGE_NOT_RECORDED}\n"
    return knowledge_markdown(knowledge_by_document(saved))


def knowledge_html(saved: dict | None) -> list[str]:
    """The per-document section of the HTML report (same content as :func:`knowledge_markdown`)."""
    esc = html.escape
    parts = ["<h2>Knowledge by document</h2>"]
    if saved is None:
        return parts + ["<p>not evaluated yet</p>"]
    if not knowledge_recorded(saved):
        return parts + [f"<p>{esc(KNOWLEDGE_NOT_RECORDED)}</p>"]
    rows = knowledge_by_document(saved)
    if not rows:
        return parts + ["<p>no held-out document questions in this evaluation</p>"]
    parts.append(f"<p>Reference: {esc(rows[0]['reference'])}. {esc(_KNOWLEDGE_NOTE)}</p><table>")
    parts.append("<tr>" + "".join(f"<th>{c}</th>" for c in KNOWLEDGE_COLUMNS) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _knowledge_cells(r)) + "</tr>" for r in rows]
    parts.append("</table>")
    for r in rows:
        if not (r["learned"] or r["forgot"]):
            continue
        parts.append(f"<h3>{esc(r['document'])}</h3>")
        for label, diffs in (("Learned", r["learned"]), ("Forgot", r["forgot"])):
            if diffs:
                parts.append(f"<p>{label} ({len(diffs)}):</p><ul>")
                parts += [f"<li>{esc(_diff_line(d, r['reference']))}</li>" for d in diffs[:_DIFFS_SHOWN]]
                if len(diffs) > _DIFFS_SHOWN:
                    parts.append(f"<li>… and {len(diffs) - _DIFFS_SHOWN} more</li>")
                parts.append("</ul>")
    return parts


# --------------------------------------------------------------------------------------------------
# artifacts


def registry_rows(reg: Registry) -> list[dict]:
    """The registry's versions as flat rows (the keyed table artifact)."""
    return [
        {
            "version": v.name,
            "status": v.status,
            "champion": bool(v.is_champion),
            "kind": v.kind or "",
            "parent": format_version(v.parent_version) if v.parent_version else "",
            "created_at": v.created_at.isoformat(timespec="seconds"),
            "reasons": " | ".join(v.decision_reasons or []),
        }
        for v in reg.list_versions()
    ]
