"""plots.LiveFigure: every explorer and live loss curve of the course changes figures through it."""

import ipywidgets
import plotly.graph_objects as go
import pytest
import torch

from utils import plots


def two_lines():
    return go.Figure([go.Scatter(x=[], y=[]), go.Scatter(x=[], y=[])])


@pytest.fixture(params=["FigureWidget", "output area"])
def live(request, monkeypatch):
    if request.param == "output area":  # plotly 6+ without anywidget cannot make a FigureWidget
        def needs_anywidget(*args, **kwargs):
            raise ImportError("Please install anywidget to use the FigureWidget class")
        monkeypatch.setattr(go, "FigureWidget", needs_anywidget)
    figure = plots.LiveFigure(two_lines())
    expected = go.FigureWidget if request.param == "FigureWidget" else ipywidgets.Output
    assert isinstance(figure.widget, expected)
    return figure


def test_update_sets_traces_from_tensors_and_the_title(live):
    live.update({1: {"x": torch.arange(3), "y": torch.tensor([0.5, 0.25, 0.125], requires_grad=True)}},
                title="halving")
    assert list(live.fig.data[1].x) == [0, 1, 2]
    assert list(live.fig.data[1].y) == [0.5, 0.25, 0.125]
    assert len(live.fig.data[0].x) == 0
    assert live.fig.layout.title.text == "halving"


def test_batch_applies_every_change(live):
    with live.batch() as fig:
        fig.data[0].x, fig.data[0].y = [1, 2], [3, 4]
        fig.layout.title.text = "batched"
    assert list(live.fig.data[0].y) == [3, 4] and live.fig.layout.title.text == "batched"
