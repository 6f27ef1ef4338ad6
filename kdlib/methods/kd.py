r"""Classic knowledge distillation (Hinton, Vinyals and Dean, 2015). Exact: mdistiller's ``KD``.

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y)
          + \lambda_{KD}\, T^2\, \mathrm{KL}\big(\sigma(z^t/T) \,\|\, \sigma(z^s/T)\big)

Defaults of the CIFAR-100 (CRD/mdistiller) protocol: T = 4, lambda_CE = 0.1, lambda_KD = 0.9.

``standardize=True`` is logit standardisation (Sun et al., CVPR 2024; exact: their ``KD.py``): both logit
vectors z-scored per sample (:func:`kdlib.losses.standardize`) before the temperature, CE on raw logits.
The LS paper's KD settings (T = 2, kd_weight = 9, ce_weight = 0.1; per pair in
:func:`kdlib.methods.ls.ls_settings`) are not the defaults: set them with ``--set``.
"""
import torch.nn.functional as F

from kdlib.losses import as_float, kd_loss, maybe_standardize
from kdlib.methods import register
from kdlib.methods.base import Method, check_bool, check_nonnegative, check_positive


@register
class KD(Method):
    name = "kd"
    defaults = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        self.temperature = check_positive("temperature", self.hparams["temperature"])
        self.ce_weight = check_nonnegative("ce_weight", self.hparams["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", self.hparams["kd_weight"])
        self.standardize = check_bool("standardize", self.hparams["standardize"])

    def forward(self, student_logits, teacher_logits, targets, ctx):
        zs, zt = maybe_standardize(student_logits, teacher_logits, self.standardize)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(as_float(student_logits), targets),
            "loss_kd": self.kd_weight * kd_loss(zs, zt, self.temperature),
        }
