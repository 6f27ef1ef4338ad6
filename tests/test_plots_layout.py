"""The book's figures at the width of the page: no figure wider than the text column, no tick labels
running into each other, panels that would be too narrow wrapped onto rows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kdlib import experiments as ex, plots, stats
from test_experiments import hand_made_tables, tiny_setting


def overlapping_labels(fig):
    """(axes title, label a, label b) for every pair of visible tick labels whose boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figures are outside pyplot: give them the PNG backend's canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [t for t in labels if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in shown]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        found.append((ax.get_title(), shown[i].get_text(), shown[j].get_text()))
    return found


@pytest.fixture(scope="module")
def book_figures():
    plots.style()
    tables, _, _ = hand_made_tables()
    acc = ex.class_accuracy(tables)
    deltas = pd.concat([ex.class_delta(tables, name, "vanilla") for name in ("KD", "DKD")])
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    data = ex.dataset(tiny_setting())
    small_a, small_b = torch.linspace(-0.00026, 0.00021, 400), torch.linspace(-0.0017, 0.0002, 400)
    return {
        "class_accuracy_curves": plots.class_accuracy_curves(acc[acc.label == "KD"], title="t"),
        "class_delta": plots.class_delta(ex.class_delta(tables, "KD", "vanilla"), title="t"),
        "class_heatmap": plots.class_heatmap(deltas, title="t"),
        "class_effects": plots.class_effects(stats.class_effects(tables.classes, "KD", "vanilla"), title="t"),
        "cost": plots.cost(ex.summarize(tables)),
        "gradient_check": plots.gradient_check({"a": (z, z + 1e-9), "b": (z, z), "c": (z, z)}),
        # the KD chapter's case: gradients of order 1e-3, whose plain tick labels (−0.0015) ran together
        "gradient_check_small": plots.gradient_check({"KD": (small_a, small_a), "0.1 CE + 0.9 KD": (small_b, small_b)}),
        "soft_targets": plots.soft_targets(z[:3], [1, 2, 4, 8], torch.tensor([0, 1, 2]),
                                           [f"c{i}" for i in range(100)]),
        "binned": plots.binned(pd.DataFrame({"bin": [1, 2, 1, 2], "y": [1.0, 2, 3, 4], "w": [1.0, 0, 2, 1]}),
                               "bin", ["y", "w", "y"]),
        "class_matrices": plots.class_matrices({"a": torch.randn(100, 100), "b": np.eye(100), "c": np.eye(100)},
                                               data.class_to_superclass),
    }


def test_no_figure_is_wider_than_the_page(book_figures):
    for name, fig in book_figures.items():
        assert fig.get_figwidth() <= plots.PAGE_WIDTH + 1e-9, name


def test_tick_labels_do_not_overlap(book_figures):
    for name, fig in book_figures.items():
        assert overlapping_labels(fig) == [], name


def test_a_row_of_narrow_panels_wraps_and_keeps_every_panel():
    fig, axes = plots.figure(ncols=3, width=3.3 * 3 + 0.4, height=3.0, sharey=True)
    assert len(axes) == 3 and len(fig.axes) == 3  # the fourth cell of the 2 x 2 grid is removed
    rows = sorted({round(ax.get_position().y0, 3) for ax in axes})
    assert len(rows) == 2
    assert fig.get_figheight() == pytest.approx(6.0)
    fig, axes = plots.figure(ncols=2, width=10, height=3.0)  # two panels fit side by side: narrowed only
    assert len(axes) == 2 and fig.get_figwidth() == plots.PAGE_WIDTH and fig.get_figheight() == 3.0
    fig, ax = plots.figure(width=5, height=2)  # narrow figures are left as asked
    assert tuple(fig.get_size_inches()) == (5, 2)


def test_the_overlap_check_sees_overlapping_labels():
    """The check above can fail: long labels on a narrow axis are found."""
    fig, ax = plots.figure(width=2, height=2)
    ax.set_xticks(range(10))
    ax.set_xticklabels([f"a long label {i}" for i in range(10)])
    assert overlapping_labels(fig)
