r"""CTKD, curriculum temperature for knowledge distillation (Li et al., AAAI 2023), global-temperature
version. Exact: the authors' zhengli97/CTKD (``train_student.py``, ``helper/loops.py``,
``distiller_zoo/KD.py``, ``scripts/run_cifar_distill.sh``).

.. math:: \tau = \tau_0 + \tau_1\,\sigma(\mathrm{GRL}_{\lambda_e}(\theta)),\qquad
          \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y)
          + \lambda_{KD}\,\tau^2\,\mathrm{KL}\big(\sigma(z^t/\tau)\,\|\,\sigma(z^s/\tau)\big)

One trainable scalar :math:`\theta` (initialised to 1, so :math:`\tau = 1 + 20\,\sigma(1) = 15.62`) sits in
the student's SGD (same lr, momentum and weight decay, as in the authors' ``trainable_list``). The gradient
reversal layer is the identity forward and multiplies :math:`\theta`'s gradient by
:math:`\lambda_e = -\frac{1}{2}\big(1 - \cos(\pi \min(e, E)/E)\big)` (their ``CosineDecay(max 0, min -1,
loops 10)`` read at epoch e from 1): 0 -> -1 over E = ``ramp_epochs`` epochs, so :math:`\theta` ascends the
KD loss (an easy-to-hard curriculum) while the student descends it. :math:`\lambda_e` is a buffer set in
place by :meth:`start_epoch`. ``standardize=True`` applies logit standardisation (CTKD then learns the LS
base temperature). Recipe: the shared one (bs 64, lr 0.05, decays 150/180/210 of 240).
Terms: ``loss_ce``, ``loss_kd``; each epoch's history row records the temperature of its last step.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.errors import KDLibError
from kdlib.losses import as_float, ctkd_reversal, kd_loss, maybe_standardize, scale_gradient
from kdlib.methods import register
from kdlib.methods.base import Method, check_bool, check_int, check_nonnegative


@register
class CTKD(Method):
    name = "ctkd"
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "t_start": 1.0, "t_end": 20.0, "ramp_epochs": 10,
                "standardize": False}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", hp["kd_weight"])
        self.t_start = check_nonnegative("t_start", hp["t_start"])
        self.t_end = check_nonnegative("t_end", hp["t_end"])
        if not self.t_start + self.t_end > 0:
            raise KDLibError(f"t_start + t_end must be > 0 (the largest temperature), got "
                             f"{self.t_start} + {self.t_end}")
        self.ramp_epochs = check_int("ramp_epochs", hp["ramp_epochs"], minimum=0)
        self.standardize = check_bool("standardize", hp["standardize"])
        self.theta = nn.Parameter(torch.ones(()))
        self.register_buffer("reversal", torch.tensor(ctkd_reversal(1, self.ramp_epochs)))
        self.register_buffer("last_temperature", torch.tensor(self.t_start + self.t_end / (1 + math.exp(-1.0))))

    def start_epoch(self, epoch: int) -> None:
        self.reversal.fill_(ctkd_reversal(epoch, self.ramp_epochs))

    def temperature(self) -> torch.Tensor:
        """The temperature the next step uses (through the reversal layer: its gradient is reversed)."""
        return self.t_start + self.t_end * torch.sigmoid(scale_gradient(self.theta, self.reversal))

    def forward(self, student_logits, teacher_logits, targets, ctx):
        t = self.temperature()
        self.last_temperature.copy_(t.detach())
        zs, zt = maybe_standardize(student_logits, teacher_logits, self.standardize)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(as_float(student_logits), targets),
            "loss_kd": self.kd_weight * kd_loss(zs, zt, t),
        }

    def end_epoch(self, epoch: int):
        return {"temperature": float(self.last_temperature), "reversal": float(self.reversal)}
