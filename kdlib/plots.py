"""The book's figures, drawn from run-record tables (:mod:`kdlib.records`, :mod:`kdlib.experiments`).

Every function takes tables (or tensors computed from a trained model and the data), never a notebook's
variables, and returns a :class:`matplotlib.figure.Figure` that is *not* registered with pyplot, so a
chapter shows it exactly where it wants it (``glue("key", fig, display=False)`` then ``{glue:figure}``,
or ``fig`` as a cell's last line) and nothing is drawn twice. ``title`` is where a chapter puts
:func:`kdlib.experiments.label` (dataset and profile): every figure of the book carries it.

API::

    style()                                                     # the book's seaborn theme (call once)
    sample_grid(data, superclasses=None, split="train", title=None)
    lr_schedule(config, epochs=None, title=None)                # the engine's lr_at, + recorded lrs
    class_accuracy_curves(acc, teacher=True, title=None)        # acc = experiments.class_accuracy(...)
    class_delta(delta, title=None)                              # delta = experiments.class_delta(...)
    class_effects(effects, title=None)                          # effects = stats.class_effects(...)
    class_heatmap(deltas, title=None)                           # deltas = concat of class_delta frames
    training_curves(epochs, y="test_acc", hue="label", title=None)
    best_vs_last(runs, hue="label", title=None)
    cost(summary, title=None)                                   # summary = experiments.summarize(...)
    gradient_check({name: (analytic, autograd)}, title=None)
    soft_targets(logits, temperatures, label=None, class_names=None, title=None)
    histogram(values, xlabel, title=None, bins=30, hue=None)
    binned(frame, x, y, hue=None, title=None, xlabel=None)      # one panel per y column, per bin of x
    weights_vs_confidence(confidence, {name: weights or constant}, xlabel, ylabel, logy=False, title=None)
    class_matrices({name: C x C matrix}, class_to_superclass, title=None)  # heatmaps, superclass order
    class_sets(members, class_to_superclass, x="epoch", value="value", class_names=None, highlight=None,
               title=None)                                      # set membership per epoch (CWKD)
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["style", "figure", "sample_grid", "lr_schedule", "class_accuracy_curves", "class_delta", "class_effects",
           "class_heatmap", "training_curves", "best_vs_last", "cost", "gradient_check", "soft_targets",
           "histogram", "binned", "weights_vs_confidence", "class_matrices", "class_sets",
           "superclass_palette"]

HELPED, HURT, NEUTRAL = "#2a9d8f", "#e76f51", "#8d99ae"


def style() -> None:
    """The book's look: seaborn's whitegrid theme, small fonts, 110 dpi PNGs."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9,
                  rc={"figure.dpi": 110, "savefig.dpi": 110, "axes.titlesize": "medium"})


#: The book's text column is about 700 px wide and figures are PNGs at 110 dpi: a figure wider than this
#: (inches) is shrunk by the browser, and its labels end up much smaller than the text around them.
PAGE_WIDTH = 7.0
#: the narrowest panel (inches) whose tick labels do not run into each other; a row of narrower panels
#: wraps onto several rows
MIN_PANEL = 2.8


def figure(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 3.4, **kwargs):
    """A constrained-layout Figure outside pyplot and its axes (an array when there are several).

    Never wider than :data:`PAGE_WIDTH`: a wider request is narrowed to it, and a single row of ``ncols``
    panels that would then be narrower than :data:`MIN_PANEL` is laid out on several rows (``height`` per
    row); the axes still come back as one flat array of ``ncols`` panels, in reading order.
    """
    if width > PAGE_WIDTH:
        if nrows == 1 and ncols > 2 and PAGE_WIDTH / ncols < MIN_PANEL:
            per_row = max(1, int(PAGE_WIDTH // MIN_PANEL))
            rows = math.ceil(ncols / per_row)
            fig = Figure(figsize=(PAGE_WIDTH, height * rows), layout="constrained")
            axes = fig.subplots(rows, per_row, squeeze=False, **kwargs).ravel()
            for unused in axes[ncols:]:
                fig.delaxes(unused)
            return fig, axes[:ncols]
        width = PAGE_WIDTH
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **kwargs)
    return fig, axes


def _title(fig: Figure, title: Optional[str]) -> Figure:
    if title:
        fig.suptitle(title, fontsize="small", color="0.3")
    return fig


def superclass_palette(n: int = 20):
    """One colour per superclass (tab20 has exactly the 20 of CIFAR-100)."""
    return sns.color_palette("tab20", n) if n <= 20 else sns.color_palette("husl", n)


# -- data and recipe ------------------------------------------------------------------------------
def sample_grid(data, superclasses: Optional[Sequence[int]] = None, split: str = "train",
                title: Optional[str] = None) -> Figure:
    """One column per superclass, one row per member class (its first image of ``split``), uint8 as is.

    With a designed difficulty (``data.class_difficulty``, synthetic only) each image is titled with its
    class's noise level.
    """
    images = getattr(data, f"{split}_images").cpu()
    labels = getattr(data, f"{split}_labels").cpu()
    to_super = data.class_to_superclass.cpu()
    difficulty = getattr(data, "class_difficulty", None)
    supers = list(range(len(data.superclass_names))) if superclasses is None else list(superclasses)
    members = [torch.nonzero(to_super == s).flatten().tolist() for s in supers]
    nrows = max(len(m) for m in members)
    fig = Figure(figsize=(0.62 * len(supers) + 0.3, 0.72 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, len(supers), squeeze=False)
    for col, (s, classes) in enumerate(zip(supers, members)):
        for row in range(nrows):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if row >= len(classes):
                continue
            c = classes[row]
            idx = torch.nonzero(labels == c).flatten()
            if len(idx):
                ax.imshow(images[idx[0]].permute(1, 2, 0).numpy(), interpolation="nearest")
            if difficulty is not None:
                ax.set_title(f"{float(difficulty[c]):.2f}", fontsize=5, pad=1)
        axes[0, col].set_title(str(data.superclass_names[s])[:10] + (
            f"\n{float(difficulty[classes[0]]):.2f}" if difficulty is not None else ""), fontsize=5, pad=1)
    return _title(fig, title)


def lr_schedule(config, epochs: Optional[pd.DataFrame] = None, title: Optional[str] = None) -> Figure:
    """The learning rate of each epoch from :func:`kdlib.engine.lr_at` for a (resolved) run config; the
    rates a run recorded (``epochs`` table, column ``lr``) are drawn on top when given."""
    from kdlib.engine import lr_at

    cfg = config.resolved()
    xs = np.arange(1, cfg.epochs + 1)
    lrs = [lr_at(int(e), cfg.lr, cfg.milestones, cfg.lr_decay) for e in xs]
    fig, ax = figure(width=6, height=2.8)
    ax.step(xs, lrs, where="mid", color="C0", label="engine.lr_at")
    if epochs is not None and not epochs.empty:
        rec = epochs.groupby("epoch")["lr"].first()
        ax.plot(rec.index, rec.values, "o", ms=3, color="C1", label="recorded in metrics.json")
    for m in cfg.milestones:
        ax.axvline(m + 0.5, color="0.7", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize="small")
    return _title(fig, title)


# -- classes --------------------------------------------------------------------------------------
def class_accuracy_curves(acc: pd.DataFrame, teacher: bool = True, by: str = "label",
                          title: Optional[str] = None) -> Figure:
    """Left: each model's per-class accuracies sorted from best to worst class, every class a dot in its
    superclass's colour. Right (with a teacher): each class's student accuracy against the teacher's.

    ``acc`` is :func:`kdlib.experiments.class_accuracy` (columns ``label``, ``class_index``, ``superclass``,
    ``superclass_index``, ``acc`` and ``teacher_acc``).
    """
    labels = list(dict.fromkeys(acc[by]))
    series = [(str(l), acc[acc[by] == l]) for l in labels]
    has_teacher = teacher and "teacher_acc" in acc and acc["teacher_acc"].notna().any()
    if has_teacher:
        first = series[0][1]
        t = first.assign(acc=first["teacher_acc"])
        series = [("teacher", t)] + series
    n_super = int(acc["superclass_index"].max()) + 1 if acc["superclass_index"].notna().any() else 1
    pal = superclass_palette(n_super)
    fig, axes = figure(ncols=2 if has_teacher else 1, width=10 if has_teacher else 6.5, height=3.6)
    ax = axes[0] if has_teacher else axes
    styles = ["-", "--", ":", "-."]
    greys = ["0.1", "0.45", "0.65", "0.8"]
    for i, (name, df) in enumerate(series):
        d = df.sort_values("acc", ascending=False)
        x = np.arange(1, len(d) + 1)
        ax.plot(x, d["acc"], styles[i % 4], color=greys[i % 4], lw=1.2, label=name, zorder=1)
        colours = [pal[int(s)] if not pd.isna(s) else "0.5" for s in d["superclass_index"]]
        ax.scatter(x, d["acc"], c=colours, s=9, zorder=2, linewidths=0)
    ax.set_xlabel("class rank (best to worst, per model)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize="small", loc="lower left")
    if has_teacher:
        ax2 = axes[1]
        markers = ["o", "s", "^", "D"]
        for i, (name, df) in enumerate(series[1:]):
            colours = [pal[int(s)] if not pd.isna(s) else "0.5" for s in df["superclass_index"]]
            ax2.scatter(df["teacher_acc"], df["acc"], c=colours, s=14, marker=markers[i % 4], alpha=0.85,
                        linewidths=0, label=name)
        ax2.plot([0, 100], [0, 100], color="0.6", lw=0.8, ls="--")
        ax2.set_xlabel("teacher's accuracy on the class (%)")
        ax2.set_ylabel("student's accuracy on the class (%)")
        ax2.set_xlim(-3, 103)
        ax2.set_ylim(-3, 103)
        if len(series) > 2:
            ax2.legend(fontsize="small", loc="upper left")
        ax2.set_title("one dot per class, coloured by superclass", fontsize="small")
    return _title(fig, title)


def class_delta(delta: pd.DataFrame, title: Optional[str] = None) -> Figure:
    """Per-class change of accuracy, method minus baseline: sorted bars (green helped, red hurt) and a
    histogram. ``delta`` is :func:`kdlib.experiments.class_delta`."""
    d = delta.sort_values("delta", ascending=False)
    helped, hurt = int((d["delta"] > 0).sum()), int((d["delta"] < 0).sum())
    same = len(d) - helped - hurt
    colours = [HELPED if v > 0 else HURT if v < 0 else NEUTRAL for v in d["delta"]]
    fig, (ax, ax2) = figure(ncols=2, width=10, height=3.2, gridspec_kw={"width_ratios": [2.2, 1]})
    ax.bar(np.arange(len(d)), d["delta"], color=colours, width=1.0, linewidth=0)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlim(-1, len(d))
    ax.set_xticks([])
    ax.set_xlabel("classes, sorted by the change")
    method, base = str(d["label"].iloc[0]), str(d["baseline"].iloc[0])
    ax.set_ylabel(f"{method} − {base} (points)")
    ax.set_title(f"{helped} classes helped, {hurt} hurt, {same} unchanged", fontsize="small")
    lim = max(1.0, float(d["delta"].abs().max()))
    # bins one "grain" wide (per-class accuracies move in steps of 100 / (test images x seeds)), centred
    values = np.unique(np.round(d["delta"].to_numpy(dtype=float), 6))
    gaps = np.diff(values)
    step = float(gaps[gaps > 1e-6].min()) if (gaps > 1e-6).any() else 1.0
    step = max(step, 2 * lim / 60)
    bins = np.arange(-lim - step / 2, lim + step, step)
    ax2.hist(d["delta"], bins=bins, color=NEUTRAL, edgecolor="white")
    ax2.axvline(0, color="0.3", lw=0.8)
    ax2.axvline(float(d["delta"].mean()), color="C0", lw=1.2, label=f"mean {d['delta'].mean():+.2f}")
    ax2.set_xlabel("change of class accuracy (points)")
    ax2.set_ylabel("classes")
    ax2.legend(fontsize="small")
    return _title(fig, title)


def class_effects(effects, title: Optional[str] = None) -> Figure:
    """The class-by-class test of :func:`kdlib.stats.class_effects` as a picture: every class's centred
    change (bars, sorted; coloured where it counts as a gain or a loss) against its null twins (the line:
    the same seeds with half of them sign-flipped, sorted), with the two tail thresholds (dashed)."""
    t = effects.table.sort_values("centred", ascending=False)
    x = np.arange(len(t))
    measured = effects.measured
    if measured:
        colours = [HELPED if v > effects.upper else HURT if v < effects.lower else NEUTRAL for v in t["centred"]]
    else:
        colours = [NEUTRAL] * len(t)
    fig, (ax, ax2) = figure(ncols=2, width=10, height=3.2, gridspec_kw={"width_ratios": [2.2, 1]})
    ax.bar(x, t["centred"], color=colours, width=1.0, linewidth=0, label="centred change")
    ax.axhline(0, color="0.3", lw=0.8)
    if measured:
        ax.plot(x, np.sort(t["null"].to_numpy(float))[::-1], color="0.15", lw=1.1, label="null twins, sorted")
        for limit in (effects.upper, effects.lower):
            ax.axhline(limit, color="0.3", lw=0.8, ls="--")
        ax.set_title(f"{effects.gains} gain, {effects.losses} lose (noise alone: about "
                     f"{effects.expected_gains:.0f} and {effects.expected_losses:.0f})", fontsize="small")
        ax.legend(fontsize="small", loc="upper right")
    else:
        ax.set_title("one seed: no null, no verdict", fontsize="small")
    ax.set_xlim(-1, len(t))
    ax.set_xticks([])
    ax.set_xlabel("classes, sorted by the centred change")
    ax.set_ylabel(f"{effects.label} − {effects.baseline},\ncentred (points)")
    values = t["centred"].to_numpy(float)
    lim = max(1.0, float(np.nanmax(np.abs(values))), float(np.nanmax(np.abs(t["null"]))) if measured else 0.0)
    bins = np.linspace(-lim, lim, 31)
    ax2.hist(values, bins=bins, color=NEUTRAL, edgecolor="white", label="centred changes")
    if measured:
        ax2.hist(t["null"], bins=bins, histtype="step", color="0.15", lw=1.2, label="null twins")
    ax2.axvline(0, color="0.3", lw=0.8)
    ax2.set_xlabel("centred change (points)")
    ax2.set_ylabel("classes")
    ax2.legend(fontsize="small")
    return _title(fig, title)


def class_heatmap(deltas: pd.DataFrame, by: str = "label", title: Optional[str] = None,
                  value: str = "delta") -> Figure:
    """Rows: methods; columns: the classes grouped by superclass; colour: ``value`` (default the change
    against the baseline, red worse, blue better). ``deltas`` stacks :func:`class_delta` frames."""
    order = (deltas[["class_index", "superclass_index", "superclass"]].drop_duplicates("class_index")
             .sort_values(["superclass_index", "class_index"]))
    wide = deltas.pivot_table(index=by, columns="class_index", values=value, sort=False)
    wide = wide.loc[list(dict.fromkeys(deltas[by])), order["class_index"].tolist()]
    lim = max(1.0, float(np.nanmax(np.abs(wide.values))))
    fig, ax = figure(width=11, height=1.9 + 0.42 * len(wide))
    sns.heatmap(wide, ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, xticklabels=False,
                cbar_kws={"label": f"{value} (points)", "shrink": 0.9})
    supers = order["superclass"].tolist()
    bounds = [i for i in range(1, len(supers)) if supers[i] != supers[i - 1]]
    for b in bounds:
        ax.axvline(b, color="white", lw=1.2)
    starts = [0] + bounds
    ends = bounds + [len(supers)]
    ax.set_xticks([(a + b) / 2 for a, b in zip(starts, ends)])
    ax.set_xticklabels([str(supers[a])[:14] for a in starts], rotation=60, ha="right", fontsize=6)
    ax.set_xlabel("classes, grouped by superclass")
    ax.set_ylabel("")
    return _title(fig, title)


# -- runs -----------------------------------------------------------------------------------------
def training_curves(epochs: pd.DataFrame, y: str = "test_acc", hue: str = "label",
                    title: Optional[str] = None, ylabel: Optional[str] = None) -> Figure:
    """``y`` per epoch, one line per ``hue`` value, the band spanning the seeds (min to max)."""
    fig, ax = figure(width=6.5, height=3.3)
    sns.lineplot(data=epochs, x="epoch", y=y, hue=hue, ax=ax, errorbar=("pi", 100), marker="o",
                 markersize=3, linewidth=1.2)
    ax.set_ylabel(ylabel or {"test_acc": "test accuracy (%)", "train_loss": "training loss",
                             "train_acc": "training accuracy (%)"}.get(y, y))
    ax.legend(title=None, fontsize="small")
    return _title(fig, title)


def best_vs_last(runs: pd.DataFrame, hue: str = "label", title: Optional[str] = None) -> Figure:
    """Each run's best-epoch accuracy against its last-epoch accuracy (on the diagonal: no difference)."""
    fig, ax = figure(width=4.6, height=3.8)
    sns.scatterplot(data=runs, x="last_test_acc", y="best_test_acc", hue=hue, style=hue, ax=ax, s=40)
    lo = float(min(runs["last_test_acc"].min(), runs["best_test_acc"].min())) - 1
    hi = float(max(runs["last_test_acc"].max(), runs["best_test_acc"].max())) + 1
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("last epoch (%)")
    ax.set_ylabel("best epoch (%)")
    ax.legend(title=None, fontsize="small")
    return _title(fig, title)


def cost(summary: pd.DataFrame, title: Optional[str] = None) -> Figure:
    """Seconds per epoch and training images per second of each row of :func:`experiments.summarize`."""
    s = summary.reset_index()
    name = s.columns[0]
    fig, (a, b) = figure(ncols=2, width=9, height=3.0)
    sns.barplot(data=s, y=name, x="seconds_per_epoch", ax=a, color="C0")
    sns.barplot(data=s, y=name, x="images_per_second", ax=b, color="C2")
    a.set_xlabel("seconds per epoch (train + test)")
    b.set_xlabel("training images per second")
    a.set_ylabel("")
    b.set_ylabel("")
    return _title(fig, title)


# -- gradients and distributions ------------------------------------------------------------------
def gradient_check(pairs: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], title: Optional[str] = None) -> Figure:
    """Analytic gradient entries against autograd's, one panel per loss term, with the largest error."""
    fig, axes = figure(ncols=len(pairs), width=3.2 * len(pairs) + 0.4, height=3.1)
    axes = np.atleast_1d(axes)
    for ax, (name, (analytic, auto)) in zip(axes, pairs.items()):
        a = analytic.detach().double().flatten().cpu().numpy()
        g = auto.detach().double().flatten().cpu().numpy()
        ax.scatter(g, a, s=5, alpha=0.5, linewidths=0)
        lo, hi = float(min(a.min(), g.min())), float(max(a.max(), g.max()))
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
        ax.set_title(f"{name}\nmax |analytic − autograd| = {np.abs(a - g).max():.1e}", fontsize="small")
        ax.set_xlabel("autograd")
        # gradients are small numbers: "−1.5" with a common "1e−3" is short where "−0.0015" runs into its
        # neighbours
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3), useMathText=True)
    axes[0].set_ylabel("analytic formula")
    return _title(fig, title)


def soft_targets(logits: torch.Tensor, temperatures: Sequence[float], label: Optional[torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Figure:
    """softmax(z / T) of a few images (rows of ``logits``), classes ordered by the logit, for each T.

    Log scale: the small probabilities (the dark knowledge) rise by orders of magnitude as T grows.
    """
    z = logits.detach().double().cpu()
    n = z.shape[0]
    fig, axes = figure(ncols=n, width=3.3 * n + 0.4, height=3.1, sharey=True)
    axes = np.atleast_1d(axes)
    colours = sns.color_palette("viridis", len(temperatures))
    for i, ax in enumerate(axes):
        order = torch.argsort(z[i], descending=True)
        ranks = np.arange(1, z.shape[1] + 1)
        for T, c in zip(temperatures, colours):
            p = torch.softmax(z[i] / T, dim=0)[order].numpy()
            ax.plot(ranks, p, color=c, lw=1.3, label=f"T = {T:g}")
        ax.set_yscale("log")
        lowest = float(torch.softmax(z[i] / min(temperatures), dim=0).min())
        ax.set_ylim(max(lowest / 3, 1e-12), 1.5)
        ax.set_xlabel("class rank by teacher logit")
        if label is not None:
            y = int(label[i])
            rank = int((order == y).nonzero()[0, 0]) + 1
            name = class_names[y] if class_names is not None else str(y)
            ax.set_title(f"image {i}: label {name} (rank {rank})", fontsize="small")
    axes[0].set_ylabel("probability")
    axes[-1].legend(fontsize="small")
    return _title(fig, title)


def histogram(values, xlabel: str, title: Optional[str] = None, bins=30, hue=None,
              ylabel: str = "count") -> Figure:
    """A histogram of ``values`` (array, tensor or DataFrame column; ``hue`` splits a DataFrame)."""
    fig, ax = figure(width=6, height=3.0)
    if isinstance(values, pd.DataFrame):
        sns.histplot(data=values, x=xlabel, hue=hue, bins=bins, ax=ax, element="step")
    else:
        v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        sns.histplot(x=v.ravel(), bins=bins, ax=ax, color="C0")
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _title(fig, title)


# -- added for the AEKT and DLKD chapters ---------------------------------------------------------------
def weights_vs_confidence(confidence, weights: Mapping[str, object], xlabel: str = "teacher's target probability p^t_t",
                          ylabel: str = "weight", logy: bool = False, title: Optional[str] = None,
                          max_points: int = 4000) -> Figure:
    """Per-sample weights against a per-sample confidence: one scatter series per entry of ``weights``
    (arrays or tensors of the same length as ``confidence``; a scalar draws a horizontal line). At most
    ``max_points`` samples are drawn, a fixed evenly spaced subset."""
    def arr(v):
        return v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=float)

    x = arr(confidence).ravel()
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), max_points)).round().astype(int)) if len(x) else []
    fig, ax = figure(width=6.2, height=3.4)
    for i, (name, w) in enumerate(weights.items()):
        w = arr(w)
        if w.ndim == 0 or w.size == 1:
            ax.axhline(float(w.ravel()[0]), color=f"C{i}", lw=1.4, label=name)
        else:
            ax.scatter(x[keep], w.ravel()[keep], s=6, alpha=0.5, color=f"C{i}", linewidths=0, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", markerscale=2)
    return _title(fig, title)


def class_matrices(matrices: Mapping[str, object], class_to_superclass, title: Optional[str] = None,
                   zero_diagonal: bool = True, cmap: str = "RdBu_r") -> Figure:
    """C x C matrices side by side (e.g. a learned layer's weights minus the identity and the teacher's
    class correlation), rows and columns grouped by superclass, superclass boundaries in grey. Each panel
    has its own colour scale, symmetric around 0; ``zero_diagonal`` blanks the diagonal so the
    off-diagonal structure sets the scale."""
    sup = (class_to_superclass.cpu().numpy() if isinstance(class_to_superclass, torch.Tensor)
           else np.asarray(class_to_superclass))
    order = np.argsort(sup, kind="stable")
    bounds = [i for i in range(1, len(order)) if sup[order[i]] != sup[order[i - 1]]]
    n = len(matrices)
    fig, axes = figure(ncols=n, width=3.9 * n + 0.6, height=3.8)
    axes = np.atleast_1d(axes)
    for ax, (name, m) in zip(axes, matrices.items()):
        m = m.detach().double().cpu().numpy() if isinstance(m, torch.Tensor) else np.array(m, dtype=float)
        m = m[np.ix_(order, order)]
        if zero_diagonal:
            np.fill_diagonal(m, np.nan)
        finite = np.abs(m[np.isfinite(m)])
        lim = float(np.quantile(finite, 0.995)) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        image = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        for b in bounds:
            ax.axhline(b - 0.5, color="0.6", lw=0.4)
            ax.axvline(b - 0.5, color="0.6", lw=0.4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("class (grouped by superclass)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _title(fig, title)


def binned(frame: pd.DataFrame, x: str, y: Sequence[str], hue: Optional[str] = None,
           title: Optional[str] = None, xlabel: Optional[str] = None) -> Figure:
    """One panel per column in ``y`` against the bins in ``x`` (e.g. difficulty deciles), a line with
    markers per ``hue`` value; with several rows per (bin, hue) the band spans their range."""
    y = [y] if isinstance(y, str) else list(y)
    fig, axes = figure(ncols=len(y), width=3.4 * len(y) + 0.6, height=3.1)
    axes = np.atleast_1d(axes)
    for i, (ax, column) in enumerate(zip(axes, y)):
        sns.lineplot(data=frame, x=x, y=column, hue=hue, ax=ax, marker="o", markersize=4, linewidth=1.2,
                     errorbar=("pi", 100), legend=(i == len(y) - 1) and hue is not None)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(column)
    if hue is not None and axes[-1].get_legend() is not None:
        axes[-1].legend(fontsize="small", title=None)
    return _title(fig, title)


# -- added for the CWKD, CLKD and ReKD chapters ---------------------------------------------------------
def class_sets(members: pd.DataFrame, class_to_superclass, x: str = "epoch", value: str = "value",
               class_names: Optional[Sequence[str]] = None, highlight: Optional[Sequence[int]] = None,
               title: Optional[str] = None) -> Figure:
    """Which classes belong to a set at each step (e.g. CWKD's hard classes per epoch): one row per class
    that is ever a member, a dot in its superclass's colour at every ``x`` where it is. ``members`` has
    one row per (``x``, member class index in ``value``), e.g. :func:`kdlib.experiments.method_history`
    of one run. Rows are grouped by superclass; ``highlight`` (class indices, e.g. the teacher's weakest
    classes) marks row labels with a star."""
    sup = (class_to_superclass.cpu().numpy() if isinstance(class_to_superclass, torch.Tensor)
           else np.asarray(class_to_superclass))
    pal = superclass_palette(int(sup.max()) + 1 if len(sup) else 1)
    classes = sorted({int(c) for c in members[value]}, key=lambda c: (sup[c], c))
    row_of = {c: i for i, c in enumerate(classes)}
    marked = {int(c) for c in (highlight or [])}
    fig, ax = figure(width=6.8, height=max(2.2, 0.16 * len(classes) + 1.2))
    if classes:
        xs = members[x].to_numpy()
        ys = np.array([row_of[int(c)] for c in members[value]])
        colours = [pal[int(sup[int(c)])] for c in members[value]]
        ax.scatter(xs, ys, c=colours, s=22, marker="s", linewidths=0)
        names = [(str(class_names[c]) if class_names is not None else str(c)) + (" *" if c in marked else "")
                 for c in classes]
        ax.set_yticks(range(len(classes)))
        ax.set_yticklabels(names, fontsize=6)
        for tick, c in zip(ax.get_yticklabels(), classes):
            tick.set_color(pal[int(sup[c])])
        ax.set_ylim(len(classes) - 0.5, -0.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel("class (grouped by superclass)")
    ax.grid(axis="y", visible=False)
    return _title(fig, title)
