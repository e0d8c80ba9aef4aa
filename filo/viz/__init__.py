"""Visualisations: one panel per image (input | anomaly-map overlay | colour bar) and a
self-contained ``index.html`` per run.

Callers pass ``vmin=0, vmax=1`` for FiLo maps (they are probabilities); :func:`fixed_scale`
gives one scale for other maps. See :mod:`filo.viz.render` for the panel layout and
:mod:`filo.viz.writer` for the folder layout and selection rules.
"""

from __future__ import annotations

from filo.viz.export import atomic_write_bytes, viz_file_name, write_panel, write_thumbnail
from filo.viz.html import markdown_table_to_html
from filo.viz.render import (
    PanelLayout,
    box_label,
    colorbar_width,
    fit_text,
    fixed_scale,
    panel_layout,
    render_panel,
    text_style,
)
from filo.viz.writer import VizWriter, f1_optimal_threshold, is_error

__all__ = [
    "PanelLayout",
    "VizWriter",
    "atomic_write_bytes",
    "box_label",
    "colorbar_width",
    "f1_optimal_threshold",
    "fit_text",
    "fixed_scale",
    "is_error",
    "markdown_table_to_html",
    "panel_layout",
    "render_panel",
    "text_style",
    "viz_file_name",
    "write_panel",
    "write_thumbnail",
]
