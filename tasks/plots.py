"""A version's training plots (loss curve, expert load per layer) and its self-contained HTML
report.  matplotlib's Agg backend (no display on servers); nothing is computed that the stages did
not store.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from storage.files import write_text_atomic
from storage.home import plots_dir, training_log_path
from storage.registry import Registry
from storage.settings import Settings
from tasks.report import MODELS, evaluation_table, knowledge_html, saved_evaluation, score_cell

# --------------------------------------------------------------------------------------------------
# plots


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
    images = render_plots(settings, version)
    out: dict[str, Path] = {}
    if images:
        out_dir = plots_dir(settings, version)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in images.items():
            out[name] = out_dir / f"{name}.png"
            out[name].write_bytes(data)
    return out


def render_plots(settings: Settings, version: int, dpi: int = 100) -> dict[str, bytes]:
    """The PNGs of a version's training plots (``loss``, ``expert_load``) in memory; {} without a
    training log."""
    log_path = training_log_path(settings, version)
    if not log_path.exists():
        return {}
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        return buf.getvalue()

    log = json.loads(log_path.read_text())
    out: dict[str, bytes] = {}
    losses = log.get("losses") or []
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.plot(range(1, len(losses) + 1), losses, label="LM loss")
        aux = log.get("aux_losses") or []
        if aux and any(aux):
            ax.plot(range(1, len(aux) + 1), aux, label="router aux loss")
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"v{version} training loss")
        curve = log.get("dev_curve") or []
        if curve:  # the checkpoint choice: dev strict recall at each scored step, the kept one marked
            dev_ax = ax.twinx()
            dev_ax.plot(
                [s for s, _ in curve], [v for _, v in curve], "o-", color="tab:green", label="dev recall"
            )
            best = log.get("best_step")
            dev_ax.plot([s for s, v in curve if s == best], [v for s, v in curve if s == best], "*",
                        color="tab:red", markersize=14, label="kept")  # fmt: skip
            dev_ax.set(ylabel="dev strict recall", ylim=(0, 1))
            dev_ax.legend(loc="center right")
        ax.legend()
        fig.tight_layout()
        out["loss"] = png(fig)
    layers, loads = expert_load_per_layer(log.get("expert_stats") or {})
    if layers:
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.18 * len(layers) + 1.2)), dpi=100)
        image = ax.imshow(loads, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title=f"v{version} expert load per layer (training)")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xticks(range(len(loads[0])))
        fig.colorbar(image, ax=ax, label="fraction of tokens")
        fig.tight_layout()
        out["expert_load"] = png(fig)
    return out


# --------------------------------------------------------------------------------------------------
# HTML report


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_html_report(reg: Registry, settings: Settings, version: int | str | None = None) -> Path:
    """``$MORAL_HOME/reports/vN.html``: decision, evaluation table and plots in one file (images
    inlined as base64, no external assets).  ``version`` defaults to the latest version."""
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
    saved = saved_evaluation(settings, v.version)
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
            parts += [f"<td>{esc(score_cell(r.get(m)))}</td>" for m in models] + ["</tr>"]
        parts.append("</table>")
    else:
        parts.append("<p>not evaluated yet</p>")
    if table or saved is not None:
        parts += knowledge_html(saved)
    if plots:
        parts.append("<h2>Training</h2>")
        parts += [_img(p, name) for name, p in plots.items()]
    parts.append("</body></html>")
    return write_text_atomic(settings.reports_dir / f"v{v.version}.html", "\n".join(parts))
