"""The chapters' one entry to training: "load the run if it exists, else run it", and the tables they read.

A chapter never trains in a loop of its own. It describes its experimental setting once, from its
``parameters`` cell, then asks for runs by method, seed and hyperparameters; every run goes through
:func:`kdlib.engine.train` into a directory named by everything that decides its numbers, so a run that
another chapter (or an earlier build) already finished is read back, not repeated. The teacher is trained
once per setting through the engine's teacher cache (``$KDLIB_HOME/teachers``).

API (stable; the method chapters are written against it)::

    setting = Setting.from_parameters(profile, dataset=None, teacher=None, student=None, epochs=None,
                                      teacher_epochs=None, train_per_class=None, test_per_class=None,
                                      seeds=(0,), tiny=False, **extra)   # extra: any RunConfig field
    setting.config(method, seed, **method_params) -> RunConfig  # the run's recipe, validated, with `out`
    run_dir(setting, method, seed, **method_params) -> Path     # where that run lives (no training)
    run(setting, method, seed, **method_params) -> Path          # train or reuse; the run directory
    run_all(setting, {label: (method, params)}, seeds=None) -> RunTables  # + a `label` column everywhere
    load(paths, label="auto") -> RunTables                       # read existing records (a sweep's folder)
    select(tables, keep) -> RunTables                            # the runs where keep(runs) is true
    label(setting_or_tables) -> str   # "dataset · profile · teacher→student · epochs · seeds · precision"
    precision(setting_or_tables) -> str   # "students bf16 autocast, channels_last" (what the runs recorded)

    dataset(setting) -> ImageDataset                             # the setting's data (cached)
    teacher_model(setting) -> nn.Module                          # frozen teacher (trained once, cached)
    teacher_run(setting) -> Path | None                          # the teacher's own run directory
    teacher_records(setting) -> RunTables | None                 # its records, labelled "teacher"
    student_model(run_dir) -> nn.Module                          # a finished run's student, eval mode
    logits(model, images_u8) -> Tensor                           # float32 logits, eval mode, batched
    setup_predict(setting) -> fn(model, images_u8)               # the engine's setup-time predict (fp32)

    glue(key, value, display=False)              # myst_nb.glue, numpy scalars as Python numbers
    method_artifacts(run_dir) -> dict[str, ndarray]        # a finished run's method_artifacts.npz ({} if none)
    method_history(tables, key, by="label") -> DataFrame   # a per-epoch method fact, one row per list item
    image_predictions(tables, images, labels, by="label") -> DataFrame  # every run's prediction per image
    within_between(matrix, groups) -> dict(within=, between=, n_within=, n_between=)

    verdicts([(claim, stats result), ...]) -> DataFrame  # the chapter's verdict table; glues rule, power_text
    share(count, total) -> str                    # "11 of 4,000 (0.28 %)": never a small share printed as 0 %
    summarize(tables, by="label") -> DataFrame   # mean/std over seeds of best and last accuracy, cost
    pm(mean, std, digits=2) -> str               # "71.23 ± 0.40"
    class_accuracy(tables, by="label") -> DataFrame        # per class, mean over seeds (+ teacher_acc)
    class_delta(tables, label, baseline, by="label") -> DataFrame   # per class: acc, baseline_acc, delta
    tail_accuracy(tables, k=10, by="label") -> DataFrame   # mean, worst class, bottom-k mean: mean/std over seeds
    helped_hurt(delta) -> dict(helped=, hurt=, unchanged=)  # a naive count; judge it with kdlib.stats
    seed_halves(tables, label) -> (tables, first, second)  # one method as two: pure seed noise, for calibration

Every verdict a chapter prints about these tables (above/below, class-specific gains and losses,
correlated or not) comes from :mod:`kdlib.stats`: paired-by-seed t intervals from the two compared
methods' runs, class effects against null twins of the same runs, correlations from crossed seeds with a
permutation test, collapsed runs left out.

Run directories: ``$KDLIB_HOME/runs/<profile>/<method>-<teacher>-<student>-s<seed>-<hash>`` where
``hash`` is :meth:`kdlib.config.RunConfig.identity_hash` (the resolved recipe minus execution fields:
method and its hyperparameters, models, data, optimiser, seed, teacher recipe). Vanilla runs have no
teacher in their identity, so every chapter shares them.

Warm-up. DKD-style methods ramp their distillation weight up over ``warmup`` epochs (20 of the papers'
240). Every run's recipe scales that warm-up with the run's length, ``20 * epochs / 240`` epochs without
rounding (:func:`kdlib.config.scaled_warmup`: a third of an epoch in the 4-epoch smoke profile), the book as the
command line and the sweeps, and the methods ramp a warm-up that is
not a whole number >= 2 of epochs per step (:func:`kdlib.methods.base.warmup_factor`), so a short run's
warm-up still ramps. A value the chapter passes explicitly is used as given, and the value used is
recorded in each run's ``metrics.json``. In the ``paper`` profile (240 epochs) this is the paper's 20,
by epoch.

``tiny`` is set only by the tests (a few images per class, one epoch): chapters use it to skip optional
extra experiments, never to change what the main experiment is.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from torch import Tensor, nn

from kdlib import config as kconfig
from kdlib import runs
from kdlib.errors import KDLibError
from kdlib.glued import GLUED
from kdlib.records import RunTables, load_runs
from kdlib.tables import (class_accuracy, class_delta, helped_hurt, method_history, pm,  # noqa: F401
                          summarize, tail_accuracy, within_between)
from kdlib.runs import run_workers  # how many runs run_all trains at once

__all__ = ["Setting", "run", "run_dir", "run_all", "load", "select", "label", "precision", "dataset", "teacher_model",
           "teacher_run", "teacher_records", "student_model", "logits", "setup_predict", "method_artifacts", "method_history",
           "image_predictions", "within_between", "glue", "verdicts", "share", "summarize", "pm", "class_accuracy",
           "class_delta", "tail_accuracy", "helped_hurt", "seed_halves", "scaled_warmup"]

#: the papers' warm-up length (epochs) out of their 240-epoch recipe
PAPER_WARMUP = 20


def _seeds(seeds: Union[int, Iterable[int]]) -> Tuple[int, ...]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        return (int(seeds),)
    out = tuple(int(s) for s in seeds)
    if not out:
        raise KDLibError("seeds must name at least one seed, e.g. [0, 1]")
    return out


@dataclass(frozen=True)
class Setting:
    """The experimental setting a chapter shares across its runs: data, teacher, student, recipe, seeds.

    Build it with :meth:`from_parameters` from the chapter's parameters; ``None`` means "the profile's
    value" (see :data:`kdlib.config.PROFILES`). ``extra`` holds further :class:`~kdlib.config.RunConfig`
    fields (``device``, ``data_root``, ``teacher_checkpoint``, ``lr``, ...) applied to every run. A thin
    front door: the recipe itself is assembled and resolved by :func:`kdlib.config.make_config`.
    """

    profile: str
    dataset: str
    teacher: str
    student: str
    epochs: int
    teacher_epochs: Optional[int]
    train_per_class: Optional[int]
    test_per_class: Optional[int]
    seeds: Tuple[int, ...] = (0,)
    tiny: bool = False
    extra: Tuple[Tuple[str, Any], ...] = field(default=())

    @classmethod
    def from_parameters(cls, profile: str = "smoke", dataset: Optional[str] = None,
                        teacher: Optional[str] = None, student: Optional[str] = None,
                        epochs: Optional[int] = None, teacher_epochs: Optional[int] = None,
                        train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                        seeds: Union[int, Iterable[int]] = (0,), tiny: bool = False,
                        **extra: Any) -> "Setting":
        """The setting of a chapter's ``parameters`` cell; validated (an unknown field raises)."""
        given = dict(dataset=dataset, teacher=teacher, student=student, epochs=epochs,
                     teacher_epochs=teacher_epochs, train_per_class=train_per_class,
                     test_per_class=test_per_class)
        values = {k: v for k, v in given.items() if v is not None}
        for name in ("train_per_class", "test_per_class"):  # "all": every image of the dataset
            if values.get(name) == "all":
                values[name] = None
        base = kconfig.make_config(profile, method="kd", **values, **extra)  # validates every field
        return cls(profile=profile, **{k: getattr(base, k) for k in given}, seeds=_seeds(seeds), tiny=bool(tiny),
                   extra=tuple(sorted(extra.items())))

    # -- runs ------------------------------------------------------------------------------------
    def base_config(self, method: str = "kd") -> kconfig.RunConfig:
        fields = {k: getattr(self, k) for k in ("dataset", "teacher", "student", "epochs", "teacher_epochs",
                                                 "train_per_class", "test_per_class")}
        return kconfig.make_config(self.profile, method=method, **fields, **dict(self.extra))

    def method_params(self, method: str, **method_params: Any) -> Dict[str, Any]:
        """The hyperparameters the book passes for ``method``: the given ones, plus the scaled warm-up every
        run's recipe gets (:func:`kdlib.config.scaled_warmup`), written out in the config."""
        params = dict(method_params)
        warmup = self.base_config(method).method_hparams().get("warmup")
        if warmup is not None and "warmup" not in params:
            params["warmup"] = warmup
        return params

    def config(self, method: str, seed: int, **method_params: Any) -> kconfig.RunConfig:
        """The validated :class:`RunConfig` of one run, with its deterministic output directory."""
        cfg = self.base_config(method).replace(seed=int(seed), method_params=self.method_params(method, **method_params))
        cfg.validate()
        return cfg.replace(out=str(runs.run_directory(cfg)))

    def with_seeds(self, seeds) -> "Setting":
        return dataclasses.replace(self, seeds=_seeds(seeds))


def scaled_warmup(epochs: int, warmup: int = PAPER_WARMUP, of: int = kconfig.PAPER_EPOCHS) -> Union[int, float]:
    """The papers' warm-up (20 of 240 epochs) scaled to ``epochs`` (:func:`kdlib.config.scaled_warmup`,
    which every run's recipe applies to a warm-up it does not set)."""
    return kconfig.scaled_warmup(epochs, warmup, of)


def run_dir(setting: Setting, method: str, seed: int, **method_params: Any) -> Path:
    """Where the run ``(method, seed, method_params)`` of ``setting`` lives; trains nothing."""
    return Path(setting.config(method, seed, **method_params).out)


def _finished(path: Path) -> bool:
    import json

    try:
        with open(path / "metrics.json") as f:
            return bool(json.load(f).get("final"))
    except (OSError, ValueError):
        return False


def run(setting: Setting, method: str, seed: int, verbose: bool = False, **method_params: Any) -> Path:
    """Train the run (or reuse it when finished, resume it when interrupted); return its directory.

    Prints nothing (a tqdm bar on a terminal while it trains); ``verbose=True`` shows the engine's
    per-epoch lines. Two processes asking for the same run do not both train it: one waits on the run's
    lock and then reuses it.
    """
    cfg = setting.config(method, seed, **method_params)
    runs.ensure(runs.plan([cfg]), verbose=verbose)
    return Path(cfg.out)


Spec = Union[str, Tuple[str, Mapping[str, Any]]]


def run_all(setting: Setting, specs: Mapping[str, Spec], seeds: Optional[Iterable[int]] = None,
            verbose: bool = False) -> RunTables:
    """Run (or reuse) every ``label: (method, params)`` for every seed; the records with a ``label`` column.

    ``specs`` values may also be a bare method name. ``seeds`` defaults to ``setting.seeds``. Two labels
    may name the same run (it is trained once and appears under both labels). The runs are independent,
    so on a CPU-only machine they train side by side, one per core (:func:`kdlib.runs.run_workers`);
    ``verbose=True`` trains them one by one in this process and shows the engine's per-epoch lines.
    Reused runs print nothing; training shows a tqdm bar on a terminal.
    """
    seeds = setting.seeds if seeds is None else _seeds(seeds)
    dirs: Dict[str, list] = {}
    configs = []
    for name, value in specs.items():
        method, params = (value, {}) if isinstance(value, str) else (value[0], value[1] or {})
        dirs[name] = [setting.config(method, s, **params) for s in seeds]
        configs += dirs[name]
    runs.ensure(runs.plan(configs), verbose=verbose)
    return _concat([_with_label(load_runs([Path(c.out) for c in cfgs]), name) for name, cfgs in dirs.items()])


def load(paths, label: Union[str, Mapping[str, str]] = "auto") -> RunTables:
    """The records of existing runs (directories, ``metrics.json`` files, globs or parent folders).

    The ``label`` column: ``"auto"`` (the method's name, followed by the hyperparameters that differ
    between that method's runs, e.g. ``dkd (beta=2.0)``), the name of a ``runs`` column (``"method"``),
    or a mapping from run directory to label.
    """
    tables = load_runs(paths)
    if tables.runs.empty:
        raise KDLibError(f"no run records (metrics.json) found in {paths!r}")
    runs = tables.runs
    if isinstance(label, str) and label == "auto":
        mapping = {}
        for method, group in runs.groupby("method", sort=False):
            hp = [c for c in group.columns if c.startswith("hp_") and group[c].notna().any()
                  and group[c].astype(str).nunique() > 1]
            for _, row in group.iterrows():
                extra = ", ".join(f"{c[3:]}={row[c]}" for c in hp)
                mapping[row["run"]] = f"{method} ({extra})" if extra else str(method)
    elif isinstance(label, str):
        mapping = dict(zip(runs["run"], runs[label].astype(str)))
    else:
        mapping = {str(k): v for k, v in label.items()}
    return RunTables(*[_add_label_column(df, df["run"].map(mapping)) for df in _frames(tables)])


def select(tables: RunTables, keep) -> RunTables:
    """The tables restricted to the runs for which ``keep(runs_row)`` is true (a boolean mask works too)."""
    runs = tables.runs
    mask = keep(runs) if callable(keep) else keep
    chosen = set(runs.loc[mask, "run"])
    return RunTables(*[df[df["run"].isin(chosen)].reset_index(drop=True) for df in _frames(tables)])


def _frames(t: RunTables):
    return [t.runs, t.epochs, t.classes, t.epoch_classes]


def _add_label_column(df: pd.DataFrame, values) -> pd.DataFrame:
    df = df.copy()
    df.insert(0, "label", values)
    return df


def _with_label(tables: RunTables, name: str) -> RunTables:
    return RunTables(*[_add_label_column(df, name) for df in _frames(tables)])


def _concat(parts: Sequence[RunTables]) -> RunTables:
    if not parts:
        raise KDLibError("run_all needs at least one run")
    return RunTables(*[pd.concat([_frames(p)[i] for p in parts], ignore_index=True) for i in range(4)])


# -- captions -------------------------------------------------------------------------------------
def _seed_text(seeds) -> str:
    seeds = sorted({int(s) for s in seeds})
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))


def _epoch_text(epochs) -> str:
    epochs = sorted({int(e) for e in epochs})
    return "/".join(map(str, epochs)) + (" epoch" if epochs == [1] else " epochs")


def _precision_text(amps, channels_last) -> str:
    """``"student bf16 autocast, channels_last"``: how the students' runs computed (from their records)."""
    amps = sorted({str(a) for a in amps if a is not None})
    layouts = sorted({bool(c) for c in channels_last if c is not None})
    words = {"bf16": "bf16 autocast", "none": "fp32"}
    text = "/".join(words.get(a, a) for a in amps) or "precision not recorded"
    if layouts == [True]:
        text += ", channels_last"
    return "students " + text


def precision(obj: Union[Setting, RunTables, pd.DataFrame]) -> str:
    """The precision the students trained in: from a :class:`Setting` (what ``amp="auto"`` resolves to on
    this machine) or from run records (``segments[].amp`` and ``channels_last`` of each run)."""
    from kdlib.records import read_metrics

    if isinstance(obj, Setting):
        from kdlib.engine.device import resolve_device
        from kdlib.precision import resolve_amp

        cfg = obj.base_config()
        device = resolve_device(cfg.device)
        return _precision_text([resolve_amp(cfg.amp, device)], [cfg.channels_last])
    runs = obj.runs if isinstance(obj, RunTables) else obj
    amps, layouts = [], []
    for path in (runs["run"].dropna().unique() if "run" in runs else []):
        try:
            for segment in read_metrics(path).get("segments") or []:
                amps.append(segment.get("amp"))
                layouts.append(segment.get("channels_last"))
        except KDLibError:
            continue
    return _precision_text(amps, layouts)


def label(obj: Union[Setting, RunTables, pd.DataFrame]) -> str:
    """One line naming the dataset, profile, pair, epochs, seeds and precision, for every caption.

    From a :class:`Setting` (the dataset's own description), or from run records (what the runs say).
    """
    if isinstance(obj, Setting):
        parts = [dataset(obj).description, f"{obj.profile} profile", f"{obj.teacher}→{obj.student}",
                 _epoch_text([obj.epochs]), _seed_text(obj.seeds), precision(obj)]
        return " · ".join(parts)
    runs = obj.runs if isinstance(obj, RunTables) else obj
    if runs.empty:
        raise KDLibError("no runs to label")

    def one(column):
        values = sorted({str(v) for v in runs[column].dropna()})
        return ", ".join(values) if values else "?"

    students = runs.dropna(subset=["teacher"]) if runs["teacher"].notna().any() else runs
    pairs = sorted({f"{t}→{s}" for t, s in zip(students["teacher"], students["student"])}
                   if runs["teacher"].notna().any() else set(runs["student"].astype(str)))
    epochs = sorted({int(e) for e in runs["epochs"].dropna()})
    return " · ".join([one("dataset"), f"{one('profile')} profile", ", ".join(pairs),
                       _epoch_text(epochs), _seed_text(runs["seed"].dropna()), precision(obj)])


# -- models and data for the analyses --------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_data(name, root, train_per_class, test_per_class, seed):
    from kdlib.data import load_dataset

    return load_dataset(name, root=root, train_per_class=train_per_class, test_per_class=test_per_class,
                        seed=seed)


def dataset(setting: Setting):
    """The setting's :class:`~kdlib.data.ImageDataset` (loaded once per process)."""
    cfg = setting.base_config()
    return _load_data(cfg.dataset, cfg.data_root, cfg.train_per_class, cfg.test_per_class, cfg.data_seed)


def _teacher(setting: Setting):
    from kdlib import runs, teachers

    cfg = setting.config("kd", setting.seeds[0])
    runs.ensure(runs.plan([cfg], teachers_only=True))  # trained here if missing (collected in the book's plan)
    return teachers.get_teacher(cfg, dataset(setting), "cpu", verbose=False)


def teacher_model(setting: Setting) -> nn.Module:
    """The setting's frozen teacher on the CPU: the community checkpoint, or the cached trained one
    (trained now, once, if no chapter has needed it yet)."""
    return _teacher(setting)[0]


def teacher_run(setting: Setting) -> Optional[Path]:
    """The run directory (with ``metrics.json``) of the teacher the engine trained; None for a checkpoint."""
    info = _teacher(setting)[1]
    return Path(info["run_dir"]) if info.get("run_dir") else None


def teacher_records(setting: Setting) -> Optional[RunTables]:
    """The teacher's own run records, labelled ``"teacher"`` (None for a community checkpoint)."""
    path = teacher_run(setting)
    if path is None:
        return None
    return _with_label(load_runs([path]), "teacher")


def student_model(run_directory) -> nn.Module:
    """The student a finished run saved (``student.pt``), on the CPU in eval mode."""
    from kdlib import engine, models
    from kdlib.records import read_metrics

    path = Path(run_directory)
    if not (path / engine.STUDENT).is_file():
        raise KDLibError(f"{path} has no {engine.STUDENT}: the run is not finished")
    meta = read_metrics(path)
    arch = meta["config"]["run"]["student"]
    classes = meta["config"]["dataset"]["num_classes"]
    model = models.load_pretrained(arch, str(path / engine.STUDENT), num_classes=classes)
    return model.eval()


def setup_predict(obj: Union[Setting, kconfig.RunConfig]):
    """The predict function the engine hands a method's ``setup`` for this setting's runs: float32 logits
    whatever the run's autocast, the run's evaluation batch size and memory format. A chapter that scores
    images with it (DLKD's difficulties, CWKD's teacher accuracy) gets exactly what the training saw."""
    from kdlib.engine import predict

    cfg = obj.base_config() if isinstance(obj, Setting) else obj

    def predict_fn(model: nn.Module, images_u8: Tensor) -> Tensor:
        return predict(model, images_u8.cpu(), cfg.eval_batch_size, bool(cfg.channels_last), "none")

    return predict_fn


def logits(model: nn.Module, images_u8: Tensor, batch_size: int = 256) -> Tensor:
    """float32 logits of un-augmented uint8 images (eval mode, no grad, normalised, batched)."""
    from kdlib.engine import predict

    return predict(model, images_u8.cpu(), batch_size)


# -- tables for the text ---------------------------------------------------------------------------
def glue(key: str, value: Any, display: bool = False) -> None:
    """``myst_nb.glue`` for the prose: numpy/torch scalars become Python numbers first (their repr,
    ``np.float64(0.5)``, would defeat ``{glue:text}`key:.2f```), and nothing is shown by default."""
    from myst_nb import glue as _glue

    if isinstance(value, (np.generic, Tensor)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    GLUED[key] = value  # what the chapter's lab copy shows (kdlib.glued)
    _glue(key, value, display=display)


def share(count: int, total: int) -> str:
    """``"11 of 4,000 (0.28 %)"``: a count and its percentage with enough digits that a small share does
    not print as 0 % (two significant digits below 1 %)."""
    count, total = int(count), int(total)
    if total <= 0:
        return f"{count} of {total}"
    pct = 100.0 * count / total
    digits = 0 if pct == 0 or pct >= 10 or pct == round(pct) else (1 if pct >= 1 else 2 - int(math.floor(math.log10(pct))) - 1)
    return f"{count:,} of {total:,} ({pct:.{digits}f} %)"


def verdicts(rows: Sequence[Tuple]) -> pd.DataFrame:
    """The chapter's one verdict table (:func:`kdlib.stats.verdict_table` of ``rows``), gluing with it
    ``rule`` (the footnote under the table), ``power_text`` (the smallest difference this build detects)
    and ``verdict_records`` (the numbers, as JSON, for the test that one comparison reads the same in
    every chapter)."""
    import json

    from kdlib import stats

    glue("rule", stats.RULE)
    glue("power_text", stats.power_sentence([row[1] for row in rows if isinstance(row[1], stats.Difference)]))
    glue("verdict_records", json.dumps(stats.verdict_records(
        [row for row in rows if isinstance(row[1], stats.Difference)])))
    return stats.verdict_table(rows)


def seed_halves(tables: RunTables, label: str, by: str = "label") -> Tuple[RunTables, str, str]:
    """Two pseudo-methods made of one method's seeds: the first half and the second half, re-numbered so
    that they pair position by position. What the statistics say about them is what pure seed noise
    gets: a calibration of every rule on the build's own runs. Returns the tables (only those runs) and
    the two new labels."""
    runs = tables.runs[tables.runs[by] == label]
    seeds = sorted(int(s) for s in runs["seed"].unique())
    if len(seeds) < 2:
        raise KDLibError(f"{label!r} has {len(seeds)} seed(s): splitting needs two or more")
    half = len(seeds) // 2
    first, second = seeds[:half], seeds[half:2 * half]
    def seeds_text(group):
        return ("seed " if len(group) == 1 else "seeds ") + ", ".join(map(str, group))

    names = (f"{label} ({seeds_text(first)})", f"{label} ({seeds_text(second)})")
    position = {s: i for i, s in enumerate(first)} | {s: i for i, s in enumerate(second)}
    group = {s: names[0] for s in first} | {s: names[1] for s in second}

    def relabel(df):
        df = df[(df[by] == label) & df["seed"].isin(first + second)].copy()
        df[by] = df["seed"].map(group)
        df["seed"] = df["seed"].map(position)
        return df.reset_index(drop=True)

    return RunTables(*[relabel(df) for df in _frames(tables)]), names[0], names[1]


def method_artifacts(run_directory) -> Dict[str, np.ndarray]:
    """The arrays a finished run's method saved (``method_artifacts.npz``: AEKT's ``serial_weight``,
    ``serial_bias`` and ``r_last_epoch``; DLKD's per-training-image ``difficulty`` and ``temperature``).

    An empty dict when the method saves none; raises :class:`KDLibError` when the run is not finished.
    """
    from kdlib import engine

    path = Path(run_directory)
    if not _finished(path):
        raise KDLibError(f"{path} is not a finished run (no final record in metrics.json)")
    file = path / engine.ARTIFACTS
    if not file.is_file():
        return {}
    with np.load(file) as npz:
        return {k: npz[k] for k in npz.files}


# -- added for the AEKT and DLKD chapters ---------------------------------------------------------------


def image_predictions(tables: RunTables, images_u8: Tensor, labels: Tensor, by: str = "label") -> pd.DataFrame:
    """Every finished run's student, evaluated on the given images: one row per run and image with
    ``by`` (the run's label), ``run``, ``seed``, ``index`` (position in ``images_u8``), ``target``,
    ``pred`` and ``correct`` (bool). For accuracy on any subset of images, e.g. per difficulty bin."""
    y = labels.cpu().numpy()
    parts = []
    for row in tables.runs.itertuples(index=False):
        model = student_model(row.run)
        pred = logits(model, images_u8).argmax(1).numpy()
        parts.append(pd.DataFrame({by: getattr(row, by), "run": row.run, "seed": row.seed,
                                   "index": np.arange(len(y)), "target": y, "pred": pred,
                                   "correct": pred == y}))
    if not parts:
        raise KDLibError("no runs to evaluate")
    return pd.concat(parts, ignore_index=True)


# -- added for the CWKD, CLKD and ReKD chapters ---------------------------------------------------------


