r"""DIST, knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022). Exact: the authors'
``DIST`` loss (hunto/DIST_KD, hunto/image_classification_sota ``dist_kd.py``) and CIFAR config ``dist_t4``.

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y) + \lambda_{KD}\,\tau^2\Big(
          \beta\,\big(1 - \tfrac{1}{B}\textstyle\sum_n \rho(Y^s_{n,:}, Y^t_{n,:})\big)
          + \gamma\,\big(1 - \tfrac{1}{C}\textstyle\sum_c \rho(Y^s_{:,c}, Y^t_{:,c})\big)\Big)

with :math:`Y = \mathrm{softmax}(z/\tau)` and :math:`\rho(a, b) = \frac{(a-\bar a)\cdot(b-\bar b)}
{\|a-\bar a\|\,\|b-\bar b\| + 10^{-8}}` (Pearson correlation with the authors' absolute eps). The first term
(inter-class) correlates each sample's class distribution; the second (intra-class) each class's column
across the batch, a batch statistic. Defaults (CIFAR): tau = 4, beta = gamma = 1, lambda_CE = 1,
lambda_KD = 2. Recipe: the shared one (their "120 constant epochs then StepLR(30, 0.1)" decays at
150/180/210 of 240). Terms: ``loss_ce``, ``loss_inter`` (kd_weight * beta), ``loss_intra`` (kd_weight * gamma).
"""
import torch.nn.functional as F

from kdlib.losses import as_float, dist_terms
from kdlib.methods import register
from kdlib.methods.base import Method, check_nonnegative, check_positive


@register
class DIST(Method):
    name = "dist"
    defaults = {"ce_weight": 1.0, "kd_weight": 2.0, "temperature": 4.0, "beta": 1.0, "gamma": 1.0}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", hp["kd_weight"])
        self.temperature = check_positive("temperature", hp["temperature"])
        self.beta = check_nonnegative("beta", hp["beta"])
        self.gamma = check_nonnegative("gamma", hp["gamma"])

    def forward(self, student_logits, teacher_logits, targets, ctx):
        inter, intra = dist_terms(student_logits, teacher_logits, self.temperature)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(as_float(student_logits), targets),
            "loss_inter": self.kd_weight * self.beta * inter,
            "loss_intra": self.kd_weight * self.gamma * intra,
        }
