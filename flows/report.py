"""What people read about a refresh: the CLI's summary text, the run's Prefect artifacts, the
training plots and the self-contained HTML report of a version.

Everything here reads what the stages stored (registry rows, ``evaluations/vN.json``,
``training/vN.json``) and renders it; no model is loaded and nothing is computed that the gate
did not already decide.  Plots use matplotlib's Agg backend (no display on servers).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

from storage.registry import Registry, format_version
from storage.settings import Settings

MODELS = ("base", "champion", "candidate")
REGISTRY_TABLE_KEY = "moral-registry"


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


def _cell(v: dict | None) -> str:
    if not v:
        return "–"
    return f"{_fmt(v['value'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] n={v['n']}"


def evaluation_markdown(reg: Registry, version: int) -> str:
    """The run's report: base / champion / candidate with CIs and sample sizes, then the decision."""
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
            + " | ".join(_cell(r.get(m)) for m in models)
            + " |"
        )
    return "\n".join(lines) + "\n"


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


def artifact_key(version: int) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return f"moral-evaluation-v{version}"


def publish_artifacts(settings: Settings, version: int) -> dict[str, str]:
    """The run's markdown report and the keyed registry table, as Prefect artifacts (inside a run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    reg = Registry.from_settings(settings)
    plots = save_plots(settings, version)
    markdown = evaluation_markdown(reg, version)
    if plots:
        markdown += "\nPlots: " + ", ".join(str(p) for p in plots.values()) + "\n"
    create_markdown_artifact(
        markdown=markdown,
        key=artifact_key(version),
        description=f"Evaluation and gate decision of v{version}",
    )
    create_table_artifact(
        table=registry_rows(reg), key=REGISTRY_TABLE_KEY, description="Adapter versions in the registry"
    )
    return {"markdown": artifact_key(version), "table": REGISTRY_TABLE_KEY}


# --------------------------------------------------------------------------------------------------
# plots


def plots_dir(settings: Settings, version: int) -> Path:
    return settings.reports_dir / f"v{version}"


def _layer_of(router: str) -> int | None:
    match = re.search(r"\.(\d+)(?:\.|$)", router)
    return int(match.group(1)) if match else None


def expert_load_per_layer(
    expert_stats: dict[str, dict[str, list[float]]],
) -> tuple[list[int], list[list[float]]]:
    """Routers grouped by decoder layer: per layer the mean load of each expert (fraction of tokens
    routed to it; a row sums to top_k).  Routers whose name carries no layer index are left out."""
    by_layer: dict[int, list[list[float]]] = {}
    for name, stats in expert_stats.items():
        layer = _layer_of(name)
        if layer is not None and stats.get("load"):
            by_layer.setdefault(layer, []).append(stats["load"])
    layers = sorted(by_layer)
    loads = [[sum(col) / len(col) for col in zip(*by_layer[layer], strict=True)] for layer in layers]
    return layers, loads


def save_plots(settings: Settings, version: int) -> dict[str, Path]:
    """``loss.png`` and ``expert_load.png`` of a version (from its training log), beside its report."""
    log_path = settings.home / "training" / f"v{version}.json"
    if not log_path.exists():
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(log_path.read_text())
    out_dir = plots_dir(settings, version)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    losses = log.get("losses") or []
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.plot(range(1, len(losses) + 1), losses, label="LM loss")
        aux = log.get("aux_losses") or []
        if aux and any(aux):
            ax.plot(range(1, len(aux) + 1), aux, label="router aux loss")
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"v{version} training loss")
        ax.legend()
        fig.tight_layout()
        out["loss"] = out_dir / "loss.png"
        fig.savefig(out["loss"])
        plt.close(fig)
    layers, loads = expert_load_per_layer(log.get("expert_stats") or {})
    if layers:
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.18 * len(layers) + 1.2)), dpi=100)
        image = ax.imshow(loads, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title=f"v{version} expert load per layer (training)")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xticks(range(len(loads[0])))
        fig.colorbar(image, ax=ax, label="fraction of tokens")
        fig.tight_layout()
        out["expert_load"] = out_dir / "expert_load.png"
        fig.savefig(out["expert_load"])
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# HTML report


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_html_report(settings: Settings, version: int | str | None = None) -> Path:
    """``$MORAL_HOME/reports/vN.html``: decision, evaluation table and plots in one file (images
    inlined as base64, no external assets).  ``version`` defaults to the latest version."""
    reg = Registry.from_settings(settings)
    if version is None:
        versions = reg.list_versions()
        if not versions:
            raise ValueError("no adapter versions yet: run `moral refresh` first")
        v = versions[-1]
    else:
        v = reg.get_version(version)
    table = evaluation_table(reg, v.version)
    models = [m for m in MODELS if any(m in r for r in table)]
    plots = save_plots(settings, v.version)
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>MoRAL Refresh {esc(v.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#eee}</style>",
        "</head><body>",
        f"<h1>{esc(v.name)}: {esc(v.status)}{' (champion)' if v.is_champion else ''}</h1>",
        f"<p>kind {esc(v.kind or '')}, base model {esc(v.base_model or '')}, created "
        f"{esc(v.created_at.isoformat(timespec='seconds'))}</p>",
        "<h2>Decision</h2><ul>",
        *[f"<li>{esc(r)}</li>" for r in (v.decision_reasons or ["no decision recorded yet"])],
        "</ul><h2>Evaluation</h2>",
    ]
    if table:
        parts.append(
            "<p>value, [95% bootstrap CI], n</p><table><tr><th>suite</th><th>mode</th><th>metric</th>"
        )
        parts += [f"<th>{m}</th>" for m in models] + ["</tr>"]
        for r in table:
            parts.append(f"<tr><td>{esc(r['suite'])}</td><td>{r['mode']}</td><td>{esc(r['metric'])}</td>")
            parts += [f"<td>{esc(_cell(r.get(m)))}</td>" for m in models] + ["</tr>"]
        parts.append("</table>")
    else:
        parts.append("<p>not evaluated yet</p>")
    if plots:
        parts.append("<h2>Training</h2>")
        parts += [_img(p, name) for name, p in plots.items()]
    parts.append("</body></html>")
    out = settings.reports_dir / f"v{v.version}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return out
