"""Small plotly helpers, so every figure of the course has the same look.

Each function returns a ``plotly.graph_objects.Figure``: show it by leaving it
as the last line of a cell, or change it further (``fig.update_layout(...)``).
Tensors are accepted wherever numbers are expected.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)


def _numbers(values):
    """A tensor (on any device, with or without grad) or array as plain Python lists."""
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").float().numpy()
    return values.tolist() if hasattr(values, "tolist") else list(values)


def style(fig: go.Figure, title: str | None = None, height: int | None = None,
          width: int | None = None) -> go.Figure:
    """Give ``fig`` the course's look (template, font, margins with room for a title); return it."""
    fig.update_layout(template=TEMPLATE, font=FONT, title=title, height=height, width=width,
                      margin=dict(l=60, r=20, t=70 if title is not None else 30, b=50))
    return fig


def heatmap(z, x: Sequence | None = None, y: Sequence | None = None, *, title: str | None = None,
            xaxis_title: str | None = None, yaxis_title: str | None = None, zmin: float | None = None,
            zmax: float | None = None, colorscale: str = "Blues", text_format: str | None = None,
            height: int | None = 420, width: int | None = None) -> go.Figure:
    """A heatmap of the 2-D ``z`` with row 0 at the top, as a matrix is printed.

    ``x`` and ``y`` label the columns and rows; ``text_format`` (e.g. ``".2f"``)
    writes each value in its cell.
    """
    trace = go.Heatmap(z=_numbers(z), x=_axis_labels(x), y=_axis_labels(y), zmin=zmin, zmax=zmax,
                       colorscale=colorscale, texttemplate=f"%{{z:{text_format}}}" if text_format else None,
                       hovertemplate="row %{y}<br>column %{x}<br>value %{z:.3f}<extra></extra>")
    fig = go.Figure(trace)
    fig.update_xaxes(title=xaxis_title, side="bottom")
    fig.update_yaxes(title=yaxis_title, autorange="reversed")
    return style(fig, title, height, width)


def heatmap_grid(matrices: Sequence, titles: Sequence[str], x: Sequence | None = None,
                 y: Sequence | None = None, *, title: str | None = None, zmin: float | None = 0.0,
                 zmax: float | None = 1.0, colorscale: str = "Blues", height: int | None = 380,
                 width: int | None = None) -> go.Figure:
    """Heatmaps side by side (one per matrix) sharing one colour scale, e.g. one per attention head."""
    fig = make_subplots(rows=1, cols=len(matrices), subplot_titles=list(titles), horizontal_spacing=0.04)
    for col, z in enumerate(matrices, start=1):
        fig.add_trace(go.Heatmap(z=_numbers(z), x=_axis_labels(x), y=_axis_labels(y), zmin=zmin, zmax=zmax,
                                 colorscale=colorscale, coloraxis="coloraxis",
                                 hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"),
                      row=1, col=col)
        fig.update_yaxes(autorange="reversed", showticklabels=col == 1, row=1, col=col)
    fig.update_layout(coloraxis=dict(colorscale=colorscale, cmin=zmin, cmax=zmax))
    return style(fig, title, height, width)


def line_chart(x, series: Mapping[str, Sequence], *, title: str | None = None,
               xaxis_title: str | None = None, yaxis_title: str | None = None, log_x: bool = False,
               log_y: bool = False, markers: bool = True, height: int | None = 400,
               width: int | None = None) -> go.Figure:
    """One line per entry of ``series`` (legend name -> y values), all over the same ``x``.

    A ``None`` in a series leaves a gap (for a point that was not measured).
    """
    fig = go.Figure()
    mode = "lines+markers" if markers else "lines"
    for name, ys in series.items():
        fig.add_trace(go.Scatter(x=_numbers(x), y=_numbers(ys), name=name, mode=mode))
    fig.update_xaxes(title=xaxis_title, type="log" if log_x else None)
    fig.update_yaxes(title=yaxis_title, type="log" if log_y else None)
    return style(fig, title, height, width)


def _axis_labels(labels):
    """Category labels stay in order even when two are equal (plotly would merge repeated names)."""
    if labels is None:
        return None
    seen: dict[str, int] = {}
    unique = []
    for label in map(str, labels):
        seen[label] = seen.get(label, 0) + 1
        # A zero-width space per repeat keeps the label readable and distinct.
        unique.append(label + "\u200b" * (seen[label] - 1))
    return unique


class LiveFigure:
    """A figure that changes in place while a cell runs or a slider moves.

    Show ``live.widget`` once, then change the figure inside ``with live.batch() as fig:``
    (or with ``live.update``): the browser redraws once per batch. plotly's ``FigureWidget``
    redraws smoothly (plotly 6+ needs the ``anywidget`` package for it); without it the
    figure is redrawn inside an output area instead, so explorers work either way.
    """

    def __init__(self, fig: go.Figure):
        import ipywidgets as widgets

        try:
            self.fig = go.FigureWidget(fig)
            self.widget, self._output = self.fig, None
        except ImportError:  # plotly 6+ without anywidget
            self.fig = fig
            self.widget = self._output = widgets.Output()
            self._redraw()

    @contextlib.contextmanager
    def batch(self):
        """Change ``fig`` (yielded) inside the block; the figure is redrawn once at its end."""
        if self._output is None:
            with self.fig.batch_update():
                yield self.fig
        else:
            yield self.fig
            self._redraw()

    def update(self, changes: Mapping[int, Mapping], title: str | None = None) -> None:
        """Set properties of traces, ``{trace_index: {"x": [...], "y": [...]}}`` (tensors
        accepted), and the title."""
        with self.batch() as fig:
            for index, props in changes.items():
                fig.data[index].update(**{k: _numbers(v) for k, v in props.items()})
            if title is not None:
                fig.layout.title.text = title

    def _redraw(self):
        from IPython.display import display

        self._output.clear_output(wait=True)
        with self._output:
            display(self.fig)
