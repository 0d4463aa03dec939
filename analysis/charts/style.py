"""How every figure looks: the run palette, axis names, ``ChartStyle`` (projector sizes included), text wrapping
and the common layout every figure of the dashboard and its reports shares.

Run colours come from one colour-blind-safe palette, assigned by the sorted run names, so a run has the same
colour on every page and in every report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

# Okabe & Ito's palette: distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]

X_LABELS = {"step": "step", "tokens": "tokens seen", "flops": "FLOPs"}


@dataclass(frozen=True)
class ChartStyle:
    """How figures look. ``large`` is for projectors: bigger fonts and thicker lines."""

    large: bool = False
    height: int = 420
    template: str = "plotly_white"

    def __post_init__(self) -> None:
        if self.height < 100:
            raise ValueError(f"ChartStyle.height={self.height}: use at least 100 pixels")

    @property
    def font_size(self) -> int:
        return 20 if self.large else 13

    @property
    def line_width(self) -> float:
        return 3.5 if self.large else 2.0

    @property
    def tick_size(self) -> int:
        return self.font_size - 2

    def fonts(self) -> dict:
        """Explicit sizes for every text of a figure.

        The dashboard draws figures in Streamlit's theme, whose template sets title, legend, axis-title and
        tick sizes of its own (16, 12, 14, 12 px): a figure-wide ``font.size`` alone left the projector mode
        with 12 px legends. Sizes set on the figure win over any template.
        """
        return {
            "font": {"size": self.font_size},
            "legend": {"font": {"size": self.font_size}},
            "hoverlabel": {"font": {"size": self.font_size}},
        }

    def axis_fonts(self) -> dict:
        """Axis-title and tick-label sizes, for ``update_xaxes`` / ``update_yaxes``."""
        return {"title_font": {"size": self.font_size}, "tickfont": {"size": self.tick_size}}


def run_colors(runs: list[str] | pd.Series) -> dict[str, str]:
    """A stable run -> colour map (sorted names, cycling through the palette)."""
    names = sorted({str(r) for r in runs})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def wrap_text(text: str, width: int) -> str:
    """``text`` broken onto lines of about ``width`` characters (Plotly ``<br>``), after a space, ``/`` or ``,``.

    Metric names have no spaces (``modarith_em/exact_match,first_word``): they break at their separators.
    """
    lines: list[str] = []
    for piece in re.split(r"(?<=[ /,])", str(text)):
        if lines and len(lines[-1]) + len(piece.rstrip()) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "<br>".join(line.rstrip() for line in lines if line)


def wrap_title(text: str, style: ChartStyle) -> str:
    """A figure title wrapped for ``style``: ~40 characters a line in large fonts, 90 else.

    A figure may be drawn half-width at projector size, where 40 characters of 22 px text fill ~440 px.
    """
    return wrap_text(text, 40 if style.large else 90)


def axis_label(text: str, style: ChartStyle) -> str:
    """An axis title wrapped for ``style`` (~26 characters a line in large fonts, 60 else): a y-axis title
    runs along a row a few hundred pixels tall."""
    return wrap_text(text, 26 if style.large else 60)


def _layout(
    fig: go.Figure, style: ChartStyle, *, title: str, x_title: str, y_title: str, log_x: bool, log_y: bool
) -> go.Figure:
    """Give ``fig`` the dashboard's title, legend, margins, font sizes and axis titles and types; returns it."""
    fonts = style.fonts()
    text = wrap_title(title, style)
    lines = text.count("<br>") + 1
    fig.update_layout(
        template=style.template,
        height=style.height,
        # The title in a top margin sized to its lines, the legend at the foot of the figure (Plotly widens the
        # bottom margin to fit it): a legend that wraps onto several rows (a narrow column, many runs,
        # projector fonts) cannot run into the title, and a long title wraps instead of being cut.
        title={"text": text, "x": 0.0, "xanchor": "left", "font": {"size": style.font_size + 2}},
        hovermode="x unified",
        showlegend=True,
        legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom", "xanchor": "left", "x": 0.0,
                **fonts["legend"]},
        margin={"l": 60, "r": 20, "t": round(lines * (style.font_size + 2) * 1.35 + 26), "b": 30},
        font=fonts["font"],
        hoverlabel=fonts["hoverlabel"],
    )  # fmt: skip
    x_title, y_title = axis_label(x_title, style), axis_label(y_title, style)
    fig.update_xaxes(title_text=x_title, type="log" if log_x else "linear", showgrid=True, **style.axis_fonts())
    fig.update_yaxes(title_text=y_title, type="log" if log_y else "linear", showgrid=True, **style.axis_fonts())
    return fig


def empty_figure(message: str, style: ChartStyle | None = None) -> go.Figure:
    """A blank figure that says why it is blank."""
    style = style or ChartStyle()
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(template=style.template, height=style.height, **style.fonts())
    fig.update_annotations(font={"size": style.font_size})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig
