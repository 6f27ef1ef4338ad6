r"""Classic knowledge distillation (Hinton, Vinyals and Dean, 2015). Exact: mdistiller's ``KD``.

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y)
          + \lambda_{KD}\, T^2\, \mathrm{KL}\big(\sigma(z^t/T) \,\|\, \sigma(z^s/T)\big)

Defaults of the CIFAR-100 (CRD/mdistiller) protocol: T = 4, lambda_CE = 0.1, lambda_KD = 0.9.
"""
import torch.nn.functional as F

from kdlib.losses import as_float, kd_loss
from kdlib.methods import register
from kdlib.methods.base import Method, check_nonnegative, check_positive


@register
class KD(Method):
    name = "kd"
    defaults = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        self.temperature = check_positive("temperature", self.hparams["temperature"])
        self.ce_weight = check_nonnegative("ce_weight", self.hparams["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", self.hparams["kd_weight"])

    def forward(self, student_logits, teacher_logits, targets, batch):
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(as_float(student_logits), targets),
            "loss_kd": self.kd_weight * kd_loss(student_logits, teacher_logits, self.temperature),
        }
