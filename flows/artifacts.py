"""The run's Prefect artifacts: the evaluation report as markdown (plots inlined) and the keyed
registry table."""

from __future__ import annotations

import base64

from storage.registry import Registry
from storage.settings import Settings
from tasks.plots import render_plots, save_plots
from tasks.report import ARTIFACT_PLOT_DPI, REGISTRY_TABLE_KEY, evaluation_markdown, registry_rows


def artifact_key(version: int) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return f"moral-evaluation-v{version}"


def publish_artifacts(settings: Settings, version: int) -> dict[str, str]:
    """The run's markdown report and the keyed registry table, as Prefect artifacts (inside a run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    reg = Registry.from_settings(settings)
    save_plots(settings, version)  # kept beside the version for `moral report`
    markdown = evaluation_markdown(reg, version, settings)
    # Inlined, not linked: the files live on the worker, out of reach of whoever reads the UI.
    images = render_plots(settings, version, dpi=ARTIFACT_PLOT_DPI)
    if images:
        markdown += (
            "\n## Training\n\n"
            + "\n\n".join(
                f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})"
                for name, data in images.items()
            )
            + "\n"
        )
    create_markdown_artifact(
        markdown=markdown,
        key=artifact_key(version),
        description=f"Evaluation and gate decision of v{version}",
    )
    create_table_artifact(
        table=registry_rows(reg), key=REGISTRY_TABLE_KEY, description="Adapter versions in the registry"
    )
    return {"markdown": artifact_key(version), "table": REGISTRY_TABLE_KEY}
