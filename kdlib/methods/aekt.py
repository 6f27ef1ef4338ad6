r"""Adaptive explicit knowledge transfer, AEKT (Park and Lee, arXiv 2409.01679). **[RECON]**: only the
abstract and a third-party summary could be read. Exact: the gradient analysis it builds on (the AEKT chapter,
:mod:`kdlib.gradients`). Reconstructed: the explicit loss (DKD's TCKD), the adaptive weight (the
teacher/student target-confidence ratio) and the serial C x C layer.

.. math:: z_{kd} = z_{cls} + s\,(V z_{cls} + c),\ \text{i.e.}\ W = I + sV,\ s = 0.1,\ V = 0,\ c = 0
          \text{ at init},\qquad
          r_n = \mathrm{sg}\Big[\mathrm{clip}\Big(\frac{p^t_{n,y}}{p^s_{n,y}}, r_{min}, r_{max}\Big)\Big]

.. math:: \mathcal{L} = \mathrm{CE}(z_{cls}, y) + \min(e/20, 1)\,T^2\,\frac{1}{B}\sum_n
          \Big(\alpha\,r_n\,\mathrm{KL}(b^t_n\|b^s_n) + \beta\,\mathrm{KL}(\hat p^t_n\|\hat p^s_n)\Big)

n indexes the B images of a batch, b = [p_y, 1 - p_y] is DKD's binary distribution, y the label.

Every distillation term (and r, with p^s from z_kd) is computed on :math:`z_{kd}`; CE on :math:`z_{cls}`,
which is what the student predicts at test time (the serial layer is dropped at inference).
Options: ``weight_mode`` ratio | inv_student (:math:`1/p^s_t`) | none (r = 1), ``explicit`` /
``implicit`` switch the TCKD / NCKD terms, ``separate`` serial | none. ``separate="parallel"`` (a second
head on the penultimate features) is not offered: the engine passes logits only to a method.
Defaults (kdlib's choices): alpha = 1, beta = 8 (DKD's per-pair beta when the pair is known,
:data:`kdlib.methods.dkd.PER_PAIR_BETA`), T = 4, 20 warm-up epochs,
lambda_CE = 1, r in [0, 10], ``num_classes`` = 100 (the layer's size; ``setup`` re-creates it for
another class count, so the engine must call ``setup`` before building the optimizer).
weight_mode none + separate none is DKD exactly.
Terms: ``loss_ce``, ``loss_explicit``, ``loss_implicit``. ``end_epoch`` summarises r over the epoch.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.errors import KDLibError
from kdlib.losses import WEIGHT_MODES, adaptive_weight, as_float, dkd_parts
from kdlib.methods import register
from kdlib.methods.base import (Method, check_choice, check_int, check_nonnegative, check_positive,
                                warmup_factor)
from kdlib.methods.dkd import PER_PAIR_BETA

SEPARATIONS = ("serial", "none", "parallel")


class SerialLayer(nn.Module):
    r"""The serial C x C layer, parameterised as :math:`z_{kd} = z + s\,(V z + c)` with V, c starting at 0.

    Equal to ``W z + b`` with ``W = I + sV``, ``b = sc`` (exposed as ``weight``/``bias``), so it starts as the
    identity. The optimiser trains V and c: a step on V moves W by s times the step, and V's gradient is s
    times W's, so W learns at s^2 = 0.01 times the optimiser's rate, and weight decay (on V) pulls W towards
    the identity, not towards zero. Both keep the layer from outrunning the classifier (kdlib's choice;
    the AEKT chapter shows why).
    """

    def __init__(self, num_classes: int, step: float = 0.1):
        super().__init__()
        self.step = step
        self.delta = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            self.delta.weight.zero_()
            self.delta.bias.zero_()

    @property
    def in_features(self) -> int:
        return self.delta.in_features

    @property
    def weight(self) -> torch.Tensor:
        return torch.eye(self.in_features, device=self.delta.weight.device) + self.step * self.delta.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.step * self.delta.bias

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Make the layer compute ``weight @ z + bias`` (e.g. a trained run's saved ``serial_weight``)."""
        eye = torch.eye(self.in_features, dtype=weight.dtype, device=weight.device)
        self.delta.weight.copy_((weight - eye) / self.step)
        self.delta.bias.copy_(bias / self.step)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.step * self.delta(z)


@register
class AEKT(Method):
    name = "aekt"
    defaults = {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20,
                "weight_mode": "ratio", "r_min": 0.0, "r_max": 10.0, "explicit": True, "implicit": True,
                "separate": "serial", "num_classes": 100}
    per_pair = {"beta": PER_PAIR_BETA}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.alpha = check_nonnegative("alpha", hp["alpha"])
        self.beta = check_nonnegative("beta", hp["beta"])
        self.temperature = check_positive("temperature", hp["temperature"])
        self.warmup = check_nonnegative("warmup", hp["warmup"])
        self.weight_mode = check_choice("weight_mode", hp["weight_mode"], WEIGHT_MODES)
        self.r_min = check_nonnegative("r_min", hp["r_min"])
        self.r_max = check_positive("r_max", hp["r_max"])
        if not (self.r_min <= self.r_max and math.isfinite(self.r_max)):
            raise KDLibError(f"need 0 <= r_min <= r_max < inf, got r_min={self.r_min}, r_max={self.r_max}")
        self.explicit = check_choice("explicit", hp["explicit"], (True, False))
        self.implicit = check_choice("implicit", hp["implicit"], (True, False))
        self.separate = check_choice("separate", hp["separate"], SEPARATIONS)
        if self.separate == "parallel":
            raise KDLibError("aekt: separate='parallel' needs the student's penultimate features, which the "
                             "engine does not pass to methods (logits only); use 'serial' or 'none'")
        c = check_int("num_classes", hp["num_classes"], 2)
        self.serial = SerialLayer(c) if self.separate == "serial" else None
        # r of this epoch's samples in the order they were seen, for end_epoch's summary: a buffer sized in
        # setup and a device counter, written in place (a captured CUDA graph keeps writing to them; a
        # Python list would be appended to once, at capture). Not part of checkpoints: epoch-local.
        self.register_buffer("r_values", torch.zeros(0), persistent=False)
        self.register_buffer("r_count", torch.zeros((), dtype=torch.int64), persistent=False)
        self._r_epoch = []  # without setup (no buffer): detached r of this epoch's batches
        self._r_last = None

    def setup(self, ctx):
        self.r_values = torch.zeros(int(ctx.train_images.shape[0]), device=ctx.device)  # before any capture
        self.r_count = torch.zeros((), dtype=torch.int64, device=ctx.device)
        if self.serial is not None and self.serial.in_features != ctx.num_classes:
            self.serial = SerialLayer(ctx.num_classes).to(self.serial.delta.weight.device)
            return {"serial_layer_classes": ctx.num_classes}
        return {}

    def forward(self, student_logits, teacher_logits, targets, ctx):
        z_cls = as_float(student_logits)
        z_kd = z_cls
        if self.serial is not None:
            if z_cls.shape[1] != self.serial.in_features:
                raise KDLibError(f"aekt: the serial layer has {self.serial.in_features} classes, the logits "
                                 f"{z_cls.shape[1]}; set num_classes={z_cls.shape[1]}")
            with torch.autocast(device_type=z_cls.device.type, enabled=False):
                z_kd = self.serial(z_cls.to(self.serial.delta.weight.dtype))
        parts = dkd_parts(z_kd, teacher_logits, targets, self.temperature)
        r = adaptive_weight(z_kd, teacher_logits, targets, self.temperature, self.weight_mode,
                            self.r_min, self.r_max)
        with torch.no_grad():
            if self.r_values.numel():
                # modulo: callers that run more samples than the training set between end_epoch calls
                # (benchmarks) keep the latest ones; an epoch of the engine never wraps
                at = (self.r_count + torch.arange(r.shape[0], device=r.device)) % self.r_values.numel()
                self.r_values.index_copy_(0, at, r.detach().float())
                self.r_count += r.shape[0]
            else:
                self._r_epoch.append(r.detach())
        scale = warmup_factor(ctx, self.warmup) * self.temperature**2
        zero = z_kd.new_zeros(())
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(z_cls, targets),
            "loss_explicit": scale * self.alpha * (r * parts.tckd).mean() if self.explicit else zero,
            "loss_implicit": scale * self.beta * parts.nckd.mean() if self.implicit else zero,
        }

    def end_epoch(self, epoch):
        if self.r_values.numel():
            n = min(int(self.r_count), self.r_values.numel())
            r = self.r_values[:n].clone()
            self.r_count.zero_()
        elif self._r_epoch:
            r = torch.cat(self._r_epoch).float()
            self._r_epoch = []
        else:
            return {}
        if r.numel() == 0:
            return {}
        self._r_last = r.cpu()
        q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], device=r.device)).tolist()
        return {"r_mean": float(r.mean()), "r_q10": q[0], "r_q50": q[1], "r_q90": q[2],
                "r_at_max": float((r >= self.r_max).float().mean())}

    def artifacts(self):
        out = {}
        if self.serial is not None:
            out["serial_weight"] = self.serial.weight.detach().cpu().numpy()
            out["serial_bias"] = self.serial.bias.detach().cpu().numpy()
        if self._r_last is not None:
            out["r_last_epoch"] = self._r_last.numpy()
        return out
