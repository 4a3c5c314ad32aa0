"""Human-readable text for a refresh summary (the CLI's default output)."""

from __future__ import annotations


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
    if (
        s["documents_new"] == 0
        and s["qa_generated"] == 0
        and s["llm_calls"] == 0
        and s.get("version") is None
        and not s.get("stopped_after")
    ):
        lines.append("  nothing new: no model loaded, no LLM call")
    if s.get("version"):
        lines.append(f"  version: {s['version']}")
    lines.append(f"  decision: {s['decision']}")
    for r in s.get("reasons", []):
        lines.append(f"    {r}")
    return "\n".join(lines)
