r"""Difficulty level-based KD, DLKD (Neurocomputing 2024, 128375). **[RECON]**: only the abstract could be
read (difficulty = Euclidean distance between the predictions of the teacher and of a pruned teacher; a
per-sample temperature by difficulty). Pruning (layer-wise L1 magnitude, 10 %, no fine-tuning) follows the
sibling R2KD code and the level mapping (2 / 4 / 6, 20 % quantiles) the sibling Energy-KD code
(see the DLKD chapter); they are kdlib's choices, not read in DLKD. Exact part: per-sample-T KD with T_b^2.

.. math:: d_n = \big\| \sigma(z^t_n/\tau_d) - \sigma(z^{tp}_n/\tau_d) \big\|_2,\qquad
          \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y) + \lambda_{KD}\,\frac{1}{B}\sum_n T_n^2\,
          \mathrm{KL}\big(\sigma(z^t_n/T_n) \,\|\, \sigma(z^s_n/T_n)\big)

(n indexes images.) ``setup`` deep-copies the teacher, prunes every Conv2d and Linear weight
(``pruning="layerwise"``: ``l1_unstructured`` per layer; ``"global"``: ``global_unstructured`` over all of
them) at ``pruning_ratio``, makes it permanent, and scores every (un-augmented) training image once
(:func:`difficulty_scores`, in float32 whatever the run's autocast: the temperatures rank these scores,
so they must not be ranked by bf16 rounding); the difficulties and temperatures are buffers indexed by
dataset index (``ctx.indices``). Mapping, with hard -> high T for ``direction="hard_high"``
(``"inverse"`` swaps):

* ``mode="levels"``: :math:`d < Q(q)` (easy) -> T_low = 2, :math:`d > Q(1-q)` (hard) -> T_high = 6, else
  T_mid = 4; Q the linear-interpolation quantile over the training set, q = 0.2;
* ``mode="continuous"``: :math:`T_b = T_{min} + (T_{max} - T_{min})\,\mathrm{rank}(d_b)/(N-1)`, rank 0 the
  easiest (ties by index), so the extremes get exactly T_min and T_max.

Defaults: lambda_CE = 0.1, lambda_KD = 0.9, r = 0.1, tau_d = 1. All temperatures equal gives KD exactly.
Terms: ``loss_ce``, ``loss_kd``. ``artifacts()``: ``difficulty``, ``temperature`` per training image.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from kdlib.errors import KDLibError
from kdlib.losses import as_float, kd_loss_per_sample_temperature, prediction_difficulty
from kdlib.methods import register
from kdlib.methods.base import (Method, check_choice, check_nonnegative, check_positive,
                                resize_buffers_for_load)

_STATE = ("difficulty", "temperature")


def pruned_copy(model: nn.Module, ratio: float, pruning: str = "layerwise") -> nn.Module:
    """A deep copy of ``model`` with the L1-smallest ``ratio`` of every Conv2d/Linear weight set to 0."""
    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise KDLibError("dlkd: the teacher has no Conv2d or Linear layer to prune")
    if ratio > 0:
        # torch's pruning flattens weights with .view(-1): prune NCHW-contiguous copies, then give each
        # weight its memory format back (the engine keeps channels_last teachers on the GPU)
        formats = [torch.channels_last if m.weight.dim() == 4 and not m.weight.is_contiguous()
                   and m.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
                   for m in layers]
        for m in layers:
            m.weight.data = m.weight.data.contiguous()
        if pruning == "global":
            prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=ratio)
        else:
            for m in layers:
                prune.l1_unstructured(m, "weight", amount=ratio)
        for m, memory_format in zip(layers, formats):
            prune.remove(m, "weight")
            m.weight.data = m.weight.data.contiguous(memory_format=memory_format)
    return model


def difficulty_scores(teacher: nn.Module, images, predict, pruning_ratio: float = 0.1,
                      pruning: str = "layerwise", tau_d: float = 1.0):
    """Every image's difficulty: the distance between the softmax of the teacher and of its pruned copy.

    ``predict(model, uint8 images) -> logits`` is the engine's setup-time predict (float32); a chapter that
    passes the same function (:func:`kdlib.experiments.setup_predict`) gets the very same scores.
    """
    pruned = pruned_copy(teacher, pruning_ratio, pruning)
    return prediction_difficulty(predict(teacher, images), predict(pruned, images), tau_d).float()


def difficulty_to_temperature(d, mode="levels", quantile=0.2, t_low=2.0, t_mid=4.0, t_high=6.0,
                              t_min=2.0, t_max=6.0, direction="hard_high"):
    """Per-sample temperatures (same shape as ``d``) and facts about the mapping (JSON-serialisable)."""
    d = d.float()
    if mode == "levels":
        lo, hi = torch.quantile(d, torch.tensor([quantile, 1.0 - quantile], device=d.device)).tolist()
        easy, hard = d < lo, d > hi
        t_easy, t_hard = (t_low, t_high) if direction == "hard_high" else (t_high, t_low)
        temps = torch.full_like(d, t_mid)
        temps[easy], temps[hard] = t_easy, t_hard
        return temps, {"thresholds": [lo, hi], "n_easy": int(easy.sum()), "n_hard": int(hard.sum())}
    n = d.numel()
    rank = torch.empty_like(d)
    rank[torch.argsort(d, stable=True)] = torch.arange(n, dtype=d.dtype, device=d.device)
    frac = rank / max(n - 1, 1)
    if direction == "inverse":
        frac = 1.0 - frac
    return t_min + (t_max - t_min) * frac, {}


@register
class DLKD(Method):
    name = "dlkd"
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "pruning_ratio": 0.1, "pruning": "layerwise",
                "tau_d": 1.0, "mode": "levels", "quantile": 0.2, "t_low": 2.0, "t_mid": 4.0,
                "t_high": 6.0, "t_min": 2.0, "t_max": 6.0, "direction": "hard_high"}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", hp["kd_weight"])
        self.pruning_ratio = check_nonnegative("pruning_ratio", hp["pruning_ratio"])
        if not self.pruning_ratio < 1:
            raise KDLibError(f"pruning_ratio must be in [0, 1), got {self.pruning_ratio!r}")
        self.pruning = check_choice("pruning", hp["pruning"], ("layerwise", "global"))
        self.tau_d = check_positive("tau_d", hp["tau_d"])
        self.mode = check_choice("mode", hp["mode"], ("levels", "continuous"))
        self.quantile = check_positive("quantile", hp["quantile"])
        if not self.quantile <= 0.5:
            raise KDLibError(f"quantile must be in (0, 0.5], got {self.quantile!r}")
        self.temps = {k: check_positive(k, hp[k]) for k in ("t_low", "t_mid", "t_high", "t_min", "t_max")}
        if self.temps["t_min"] > self.temps["t_max"]:
            raise KDLibError(f"t_min must be <= t_max, got {self.temps['t_min']} > {self.temps['t_max']}")
        self.direction = check_choice("direction", hp["direction"], ("hard_high", "inverse"))
        for name in _STATE:  # one value per training image, filled by setup
            self.register_buffer(name, torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_buffers_for_load(self, state_dict, prefix, _STATE)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def setup(self, ctx):
        if ctx.teacher is None:
            raise KDLibError("dlkd needs a teacher")
        d = difficulty_scores(ctx.teacher, ctx.train_images, ctx.predict, self.pruning_ratio, self.pruning,
                              self.tau_d)
        temps, facts = difficulty_to_temperature(d, self.mode, self.quantile, direction=self.direction,
                                                 **self.temps)
        if self.difficulty.shape == d.shape:  # in place when sized already (a captured graph keeps reading it)
            self.difficulty.copy_(d)
            self.temperature.copy_(temps)
        else:
            self.difficulty, self.temperature = d.to(ctx.device), temps.to(ctx.device)
        return {"difficulty_mean": float(d.mean()), "difficulty_max": float(d.max()),
                "temperature_mean": float(temps.mean()), **facts}

    def forward(self, student_logits, teacher_logits, targets, ctx):
        if ctx.indices is None:
            raise KDLibError("dlkd needs the dataset indices of each batch (StepContext.indices)")
        if self.temperature.numel() == 0:
            raise KDLibError("dlkd: setup() has not run (no per-sample temperatures)")
        z = as_float(student_logits)
        temps = self.temperature.to(z.device)[ctx.indices.to(z.device)]
        return {"loss_ce": self.ce_weight * F.cross_entropy(z, targets),
                "loss_kd": self.kd_weight * kd_loss_per_sample_temperature(z, teacher_logits, temps)}

    def artifacts(self):
        return {"difficulty": self.difficulty.cpu().numpy(), "temperature": self.temperature.cpu().numpy()}
