"""The recipe of one run: :class:`RunConfig`, the profiles ``smoke``/``course``/``paper``, ``--set`` parsing.

A :class:`RunConfig` names everything that decides a run's numbers (method and its hyperparameters,
teacher and student, data, optimiser recipe, seed) plus a few *execution* fields that only decide how fast
it runs (device, bf16 autocast, channels-last, evaluation batch size, output folder). Profiles are named
presets; any field can be overridden::

    cfg = make_config("smoke", method="dkd", student="resnet8", out="runs/dkd")
    cfg = apply_overrides(cfg, ["epochs=30", "beta=2", "lr=0.1"])

One place assembles and resolves a run's recipe, in this order: the profile's preset, the caller's
fields, the ``--set`` overrides (:func:`make_config`; every front door -- the book's ``Setting``, the
sweep's grid, ``kdlib train`` -- only gathers these), then :meth:`RunConfig.resolved` fills in what is
left ``None`` from the method and pair's recipe and the CIFAR-100 protocol: the learning rate (the
method authors' where it differs, ``Method.recipe``, else 0.05, or 0.01 for MobileNetV2/ShuffleNet
students), the decay milestones (150/180/210 of 240 epochs, scaled to the run's length), the method's
hyperparameters (its defaults with the warm-up scaled to the run's length, then its per-pair table
``Method.per_pair``, e.g. DKD's beta, then the user's) and the teacher's recipe.
``python -m kdlib train ... --dry-run`` prints the resolved recipe of a run without training it.

| profile | data | teacher -> student | teacher recipe | student recipe |
|---|---|---|---|---|
| ``smoke`` | synthetic, 30 train / 20 test per class | resnet20 -> resnet8 | 20 epochs | 4 epochs |
| ``course`` | CIFAR-100, 100 train per class, full test set | resnet56 -> resnet20 | 30 epochs | 20 epochs |
| ``paper`` | CIFAR-100 (50k / 10k) | resnet32x4 -> resnet8x4 | 240 epochs | 240 epochs |
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from kdlib.errors import KDLibError, unknown_name

DATASETS = ("synthetic", "cifar100")
AMP_MODES = ("auto", "none", "bf16")
#: the CIFAR-100 protocol's decay milestones, for 240 epochs; shorter runs scale them
PAPER_EPOCHS = 240
PAPER_MILESTONES = (150, 180, 210)

#: fields that decide how fast a run goes, not its numbers: a run may be resumed with other values
EXECUTION_FIELDS = ("out", "device", "amp", "channels_last", "eval_batch_size", "compile", "teachers_dir",
                    "data_root", "teacher_cache", "teacher_cache_dtype", "graph")
#: ``graph``: capture the training step as one CUDA graph; auto = on for CUDA, off elsewhere
GRAPH_MODES = ("auto", True, False)
#: ``teacher_cache``: exact teacher-logit cache (kdlib.logit_cache); auto = lazy when a teacher is used and it fits
TEACHER_CACHE_MODES = ("auto", "off", "lazy", "full")
TEACHER_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
#: fields about the teacher, meaningless (and set to None) for methods without a teacher
TEACHER_FIELDS = ("teacher", "teacher_checkpoint", "teacher_epochs", "teacher_lr", "teacher_milestones",
                  "teacher_seed")


@dataclass
class RunConfig:
    """One training run. ``None`` means "the protocol's default" (see :meth:`resolved`)."""

    method: str = "kd"
    #: hyperparameters the user set; the method's defaults (and per-pair defaults) fill in the rest
    method_params: Dict[str, Any] = field(default_factory=dict)
    teacher: Optional[str] = "resnet20"
    student: str = "resnet8"
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    train_per_class: Optional[int] = 100
    test_per_class: Optional[int] = 20
    data_seed: int = 0
    profile: str = "smoke"
    epochs: int = 15
    batch_size: int = 64
    lr: Optional[float] = None  # None: 0.05, or 0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: Optional[List[int]] = None  # None: 150/180/210 of 240 scaled to `epochs`
    lr_decay: float = 0.1
    seed: int = 0
    # -- the teacher: a community checkpoint, or one trained (vanilla, this recipe) and cached
    teacher_checkpoint: Optional[str] = None
    teacher_epochs: Optional[int] = 30
    teacher_lr: Optional[float] = None
    teacher_milestones: Optional[List[int]] = None
    teacher_seed: Optional[int] = 0  # one teacher shared by every student seed, as in the papers
    teachers_dir: Optional[str] = None  # None: $KDLIB_HOME/teachers (KDLIB_HOME defaults to ~/.cache/kdlib)
    # -- execution
    out: Optional[str] = None
    device: str = "auto"  # auto: cuda when available, else cpu
    # amp, auto: bf16 autocast for a CUDA-graphed step and on a CPU with native bf16 (AVX-512-BF16/AMX),
    # none (fp32) otherwise; losses are always float32. Why, with measurements: kdlib.precision.resolve_amp.
    amp: str = "auto"
    channels_last: bool = True
    eval_batch_size: int = 256
    compile: bool = False  # torch.compile the student (GPU only; slower than eager on CPU)
    # exact teacher-logit cache, shared by every run with this teacher and data ($KDLIB_HOME/logit_cache):
    # auto = lazy when the method uses a teacher and the table fits in memory and on disk; off; lazy
    # (fill as batches need views); full (every view before the first epoch)
    teacher_cache: str = "auto"
    teacher_cache_dtype: str = "auto"  # auto: float32 (exact), bfloat16 under bf16 autocast (lossless); float16
    # capture the whole training step once as a CUDA graph and replay it (kdlib.engine.capture.GraphedStep):
    # "auto" = on for CUDA, off on CPU; false = eager steps; true on a machine without CUDA is an error.
    # With graph on, teacher_cache=auto fills the cache up front (full) when it fits, because a graph
    # cannot fill a lazy cache (a miss needs the host); an incomplete cache falls back to the live teacher
    # inside the graph. Chosen from GPU measurements made elsewhere (a full bf16 fill of 50k x 162 views
    # ~100 s, once per teacher and data, shared by every run; the teacher's graphed forward ~1 ms per
    # batch of 64, ~3 min over a 240-epoch run), not measured in this repository's CI (it has no GPU).
    graph: Any = "auto"

    # -- conversions ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise KDLibError(f"a run config must be a mapping, got {type(data).__name__}")
        valid = field_names()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise KDLibError(f"unknown config field {', '.join(map(repr, unknown))}; valid fields: "
                             f"{', '.join(valid)}")
        return cls(**copy.deepcopy(data))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **copy.deepcopy(changes))

    # -- derived values ------------------------------------------------------------------------
    @property
    def uses_teacher(self) -> bool:
        from kdlib import methods

        return bool(methods.get(self.method).uses_teacher)

    def method_hparams(self) -> Dict[str, Any]:
        """The method's hyperparameters: defaults, then per-pair defaults, then what the user set."""
        from kdlib import methods

        cls = methods.get(self.method)
        params = dict(cls.defaults)
        if "warmup" in params and isinstance(self.epochs, int):
            # a warm-up is part of the recipe's shape, like the milestones: 20 of 240 epochs, scaled
            params["warmup"] = scaled_warmup(self.epochs, params["warmup"])
        if cls.uses_teacher and self.teacher:
            pair = (self.teacher, self.student)
            params.update({name: table[pair] for name, table in cls.per_pair.items() if pair in table})
        # the value counts, not its spelling: 2 for a hyperparameter whose default is 2.0 is the same run
        params.update({k: float(v) if isinstance(cls.defaults.get(k), float) and type(v) is int else v
                       for k, v in (self.method_params or {}).items()})
        return params

    def method_recipe(self) -> Dict[str, Any]:
        """Recipe fields the method's authors set differently from the shared recipe (``Method.recipe``)."""
        from kdlib import methods

        return dict(methods.get(self.method).recipe(self.teacher, self.student))

    def resolved(self) -> "RunConfig":
        """A copy with every ``None`` default filled in and the method's hyperparameters spelt out."""
        cfg = self.replace()
        for name in ("lr", "momentum", "weight_decay", "lr_decay", "teacher_lr"):  # 1 and 1.0: one recipe
            if type(getattr(cfg, name)) is int:
                setattr(cfg, name, float(getattr(cfg, name)))
        if cfg.lr is None:  # the method authors' recipe where it differs (MLKD: 0.025), else the protocol's
            cfg.lr = self.method_recipe().get("lr") or default_lr(cfg.student)
        if cfg.milestones is None:
            cfg.milestones = scaled_milestones(cfg.epochs)
        elif isinstance(cfg.milestones, tuple):
            cfg.milestones = list(cfg.milestones)
        cfg.method_params = self.method_hparams()
        if self.uses_teacher:
            if cfg.teacher_checkpoint is None:
                if cfg.teacher_lr is None and cfg.teacher:
                    cfg.teacher_lr = default_lr(cfg.teacher)
                if cfg.teacher_milestones is None and isinstance(cfg.teacher_epochs, int):
                    cfg.teacher_milestones = scaled_milestones(cfg.teacher_epochs)
                elif isinstance(cfg.teacher_milestones, tuple):
                    cfg.teacher_milestones = list(cfg.teacher_milestones)
            else:
                cfg.teacher_checkpoint = os.path.abspath(os.path.expanduser(str(cfg.teacher_checkpoint)))
                # the recipe of a teacher someone else trained is not ours to record
                cfg.teacher_epochs = cfg.teacher_lr = cfg.teacher_milestones = cfg.teacher_seed = None
        else:
            for name in TEACHER_FIELDS:
                setattr(cfg, name, None)
        return cfg

    def identity(self) -> Dict[str, Any]:
        """What two runs must share to be "the same run" (resume): the resolved config minus execution."""
        data = self.resolved().to_dict()
        for name in EXECUTION_FIELDS:
            data.pop(name, None)
        return data

    def identity_hash(self, length: int = 10) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:length]

    def teacher_config(self) -> "RunConfig":
        """The vanilla run that trains this run's teacher (profile's teacher recipe, same data)."""
        r = self.resolved()
        if r.teacher is None:
            raise KDLibError(f"method {self.method!r} uses no teacher")
        # the data, the shared recipe and the execution fields stay; the teacher's own recipe becomes the run's
        own = dict(student=r.teacher, epochs=r.teacher_epochs, lr=r.teacher_lr, milestones=r.teacher_milestones,
                   seed=r.teacher_seed)
        return r.replace(method="vanilla", method_params={}, out=None, **own).resolved()

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise :class:`KDLibError` for anything wrong, before a single step is taken. Returns self."""
        from kdlib import methods

        if not isinstance(self.method, str):
            raise KDLibError(f"method must be a name, got {self.method!r}")
        method_cls = methods.get(self.method)  # unknown method -> KDLibError listing the valid ones
        if self.profile not in PROFILES:
            raise unknown_name("profile", str(self.profile), PROFILES)
        if self.dataset not in DATASETS:
            raise unknown_name("dataset", str(self.dataset), DATASETS)
        archs = _model_names()
        _check_arch("student", self.student, archs)
        if method_cls.uses_teacher:
            if self.teacher is None:
                raise KDLibError(f"method {self.method!r} needs a teacher (--teacher ARCH)")
            _check_arch("teacher", self.teacher, archs)
            if self.teacher_checkpoint is None:
                _check_int("teacher_epochs", self.teacher_epochs, 1)
                _check_int("teacher_seed", self.teacher_seed, 0)
                if self.teacher_lr is not None:
                    _check_float("teacher_lr", self.teacher_lr, positive=True)
                if self.teacher_milestones is not None:
                    _check_milestones("teacher_milestones", self.teacher_milestones)
            elif not Path(self.teacher_checkpoint).is_file():
                raise KDLibError(f"teacher checkpoint {str(self.teacher_checkpoint)!r} does not exist")
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("data_seed", self.data_seed, 0)
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.lr is not None:
            _check_float("lr", self.lr, positive=True)
        _check_float("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise KDLibError(f"momentum must be in [0, 1), got {self.momentum!r}")
        _check_float("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise KDLibError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check_float("lr_decay", self.lr_decay, positive=True)
        if self.milestones is not None:
            _check_milestones("milestones", self.milestones)
        if self.amp not in AMP_MODES:
            raise KDLibError(f"amp must be one of {', '.join(map(repr, AMP_MODES))}, got {self.amp!r}")
        if self.teacher_cache not in TEACHER_CACHE_MODES:
            raise KDLibError(f"teacher_cache must be one of {', '.join(map(repr, TEACHER_CACHE_MODES))}, "
                             f"got {self.teacher_cache!r}")
        if self.teacher_cache_dtype not in TEACHER_CACHE_DTYPES:
            raise KDLibError(f"teacher_cache_dtype must be one of {', '.join(map(repr, TEACHER_CACHE_DTYPES))}, "
                             f"got {self.teacher_cache_dtype!r}")
        if self.graph not in GRAPH_MODES or not isinstance(self.graph, (str, bool)):
            raise KDLibError(f"graph must be auto, true or false, got {self.graph!r}")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise KDLibError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_device(self.device)
        if not isinstance(self.method_params, dict):
            raise KDLibError(f"method_params must be a mapping, got {self.method_params!r}")
        for name in ("out", "data_root", "teachers_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise KDLibError(f"{name} must be a path, got {value!r}")
        # hyperparameter values, and those that need the class count (ReKD's K) -> KDLibError
        methods.build(self.method, **self.method_hparams()).check_num_classes(dataset_num_classes(self.dataset))
        return self


def dataset_num_classes(dataset: str) -> int:
    from kdlib.data import NUM_CLASSES

    return NUM_CLASSES[dataset]


def field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


# -- the protocol's defaults ----------------------------------------------------------------------
def default_lr(arch: Optional[str]) -> float:
    """0.05, or 0.01 for MobileNetV2 / ShuffleNetV1 / ShuffleNetV2 (mdistiller's CIFAR-100 configs)."""
    name = (arch or "").lower()
    return 0.01 if name.startswith(("mobilenet", "shuffle")) else 0.05


def scaled_milestones(epochs: int, milestones: Iterable[int] = PAPER_MILESTONES,
                      of: int = PAPER_EPOCHS) -> List[int]:
    """The paper's milestones (150/180/210 of 240) scaled to ``epochs``: distinct decays, in order.

    Each milestone is scaled and rounded half up (at least 1); a milestone that would coincide with the
    previous one moves one epoch later, so two decays never land at once (a 100x drop in one epoch); a
    milestone that then falls on or after the last epoch is dropped, because a decay after epoch ``m``
    first acts in epoch ``m + 1`` and would change nothing. So a short run keeps the recipe's shape --
    a long phase at the full rate, then one decay per epoch at most -- with fewer decays when the run is
    too short to hold them all: 6 epochs give ``[4, 5]`` (two decays, the third has no epoch left), 20
    give ``[13, 15, 18]``, 240 give exactly 150/180/210.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        return list(milestones)
    out: List[int] = []
    for m in milestones:
        scaled = max(1, int(math.floor(m * epochs / of + 0.5)))
        if out and scaled <= out[-1]:
            scaled = out[-1] + 1
        if scaled >= epochs:
            break
        out.append(scaled)
    return out


def scaled_warmup(epochs: int, warmup: float = 20, of: int = PAPER_EPOCHS) -> Union[int, float]:
    """A warm-up of ``warmup`` epochs out of the paper's 240 (DKD, ReKD, AEKT: 20) scaled to ``epochs``.

    An integer when the scaled length is a whole number (20 in the ``paper`` profile, so that run's
    recipe, and identity, is the papers' ``warmup=20``), else a float rounded to 6 decimals (0.5 epoch
    for 6 epochs, 1/3 in the 4-epoch smoke profile, 1.67 in the 20-epoch course profile). Rounding to whole epochs would
    make a short run's warm-up 1 epoch, which by epoch is no warm-up at all;
    :func:`kdlib.methods.base.warmup_factor` ramps a fractional warm-up per step. A warm-up the user sets
    (``--set warmup=...``) is used as given.
    """
    w = warmup * epochs / of
    return int(w) if float(w).is_integer() else round(w, 6)


def kdlib_home() -> Path:
    return Path(os.environ.get("KDLIB_HOME") or Path.home() / ".cache" / "kdlib").expanduser()


def default_teachers_dir() -> Path:
    return kdlib_home() / "teachers"


# -- profiles ------------------------------------------------------------------------------------
#: named presets; every value can be overridden (``make_config(profile, **overrides)``, ``--set``)
PROFILES: Dict[str, Dict[str, Any]] = {
    # offline, seconds per epoch on a laptop CPU: exercises every code path, numbers are not CIFAR's.
    # Sized by measured power per CPU minute so that the book's four seeds decide KD against vanilla
    # within the `make book` budget (benchmarks/RESULTS.md, "Power of the smoke profile")
    "smoke": dict(dataset="synthetic", train_per_class=30, test_per_class=20, teacher="resnet20",
                  student="resnet8", epochs=4, teacher_epochs=20),
    # real CIFAR-100 images, a class-balanced 10k subset and the full test set: minutes per run on a CPU
    "course": dict(dataset="cifar100", train_per_class=100, test_per_class=None, teacher="resnet56",
                   student="resnet20", epochs=20, teacher_epochs=30),
    # the CRD/mdistiller protocol: full CIFAR-100, 240 epochs, decay at 150/180/210 (GPU)
    "paper": dict(dataset="cifar100", train_per_class=None, test_per_class=None, teacher="resnet32x4",
                  student="resnet8x4", epochs=240, teacher_epochs=240),
}


def make_config(profile: str = "smoke", overrides: Iterable[str] = (), **fields: Any) -> RunConfig:
    """A run's recipe: the profile's preset, then ``fields`` (any :class:`RunConfig` field), then the
    ``--set`` items ``overrides`` (:func:`apply_overrides`); validated. The one place every front door
    builds a config; :meth:`RunConfig.resolved` fills in the rest."""
    if profile not in PROFILES:
        raise unknown_name("profile", str(profile), PROFILES)
    valid = field_names()
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise KDLibError(f"unknown config field {', '.join(map(repr, unknown))}; valid fields: "
                         f"{', '.join(valid)}")
    values = {**PROFILES[profile], **fields, "profile": profile}
    cfg = RunConfig(**copy.deepcopy(values)).validate()
    return apply_overrides(cfg, overrides) if overrides else cfg


# -- --set key=value ------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """``"0.05"`` -> 0.05, ``"5e-4"`` -> 0.0005, ``"[150, 180]"`` -> list, ``"true"``/``"null"``, else str."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        import yaml

        return yaml.safe_load(text) if text else ""
    except Exception:  # noqa: BLE001 - anything yaml cannot read stays a string
        return text


def apply_overrides(config: RunConfig, assignments: Iterable[str]) -> RunConfig:
    """Apply ``["key=value", ...]`` (recipe fields or the method's hyperparameters) in order; validated.

    A key naming a :class:`RunConfig` field sets that field; a key naming one of the method's
    hyperparameters (``beta=2``) goes into ``method_params``; ``method_params.NAME=value`` is explicit.
    """
    from kdlib import methods

    cfg = config.replace()
    fields = field_names()
    for item in assignments or ():
        if not isinstance(item, str) or "=" not in item:
            raise KDLibError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        key = key.strip()
        value = parse_value(raw)
        hp_names = list(methods.get(cfg.method).defaults)
        if key.startswith("method_params."):
            key = key[len("method_params."):]
            if key not in hp_names:
                raise KDLibError(f"method {cfg.method!r} has no hyperparameter {key!r}; valid: "
                                 f"{', '.join(hp_names) or '(none)'}")
            cfg.method_params = {**cfg.method_params, key: value}
        elif key == "profile":
            raise KDLibError("the profile is chosen with --profile (make_config(profile=...)), not --set")
        elif key in fields and key != "method_params":
            if key == "method" and value != cfg.method:
                # hyperparameters of another method would not fit the new one
                cfg.method_params = {}
            setattr(cfg, key, value)
        elif key in hp_names:
            cfg.method_params = {**cfg.method_params, key: value}
        else:
            valid = [f for f in fields if f not in ("method_params", "profile")] + hp_names
            raise KDLibError(f"unknown --set key {key!r}; valid keys: {', '.join(valid)}")
    return cfg.validate()


# -- helpers -------------------------------------------------------------------------------------
def _model_names() -> List[str]:
    from kdlib import models

    return list(models.names())


def _check_arch(role: str, name: Any, archs: List[str]) -> None:
    if name not in archs:
        raise KDLibError(f"unknown {role} architecture {name!r}; valid architectures: {', '.join(archs)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KDLibError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise KDLibError(f"{name} must be >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KDLibError(f"{name} must be a number, got {value!r}")
    if positive and not value > 0:
        raise KDLibError(f"{name} must be > 0, got {value!r}")


def _check_milestones(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in value):
        raise KDLibError(f"{name} must be a list of epochs >= 1, e.g. [150, 180, 210], got {value!r}")
    if list(value) != sorted(value):
        raise KDLibError(f"{name} must be in increasing order, got {value!r}")


def _check_device(device: Any) -> None:
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise KDLibError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc


__all__ = ["RunConfig", "PROFILES", "DATASETS", "EXECUTION_FIELDS", "make_config", "apply_overrides",
           "parse_value", "default_lr", "scaled_milestones", "kdlib_home", "default_teachers_dir",
           "field_names"]
