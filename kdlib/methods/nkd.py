r"""NKD, normalized knowledge distillation (Yang et al., ICCV 2023). Exact: the authors' ``NKDLoss``
(yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py``) with their CIFAR-100 config (temp 3, gamma 3.5).

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y)
          - \frac{1}{B}\sum_n \mathrm{sg}(p^t_{n,y})\log p^s_{n,y}
          - \gamma\,\frac{T^2}{B}\sum_n \sum_{i \ne y} \hat p^t_{n,i}(T)\,\log \hat p^s_{n,i}(T)

The target part at T = 1 with the teacher's target probability detached (sg); the non-target part a
cross-entropy between the distributions renormalised over the C - 1 non-target classes at temperature T,
as their code computes it: its value includes the teacher's non-target entropy (so it does not reach 0),
its gradient is that of the KL. Terms: ``loss_ce``, ``loss_target``, ``loss_non_target`` (gamma included).
"""
import torch.nn.functional as F

from kdlib.losses import as_float, nkd_terms
from kdlib.methods import register
from kdlib.methods.base import Method, check_nonnegative, check_positive


@register
class NKD(Method):
    name = "nkd"
    defaults = {"ce_weight": 1.0, "temperature": 3.0, "gamma": 3.5}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.temperature = check_positive("temperature", hp["temperature"])
        self.gamma = check_nonnegative("gamma", hp["gamma"])

    def forward(self, student_logits, teacher_logits, targets, ctx):
        target, non_target = nkd_terms(student_logits, teacher_logits, targets, self.temperature)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(as_float(student_logits), targets),
            "loss_target": target,
            "loss_non_target": self.gamma * non_target,
        }
