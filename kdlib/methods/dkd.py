r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022). Exact: mdistiller's ``DKD`` and its configs.

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y) + \min(e/20, 1)\; T^2
          \Big(\alpha\,\mathrm{KL}(b^t \| b^s) + \beta\,\mathrm{KL}(\hat p^t \| \hat p^s)\Big)

with :math:`b = [p_t, 1 - p_t]` (TCKD, target class) and :math:`\hat p` the distribution renormalised over
the C-1 non-target classes (NCKD); both KLs summed over classes and averaged over the batch; epochs e
counted from 1. Defaults: lambda_CE = 1, alpha = 1, beta = 8, T = 4, 20 warm-up epochs. The authors' per-pair
beta is :data:`PER_PAIR_BETA` (``DKD.per_pair``). kdlib drops the target column exactly instead of
subtracting 1000 from its logit (same value, finite for any logits).
``standardize=True``: logit standardisation (Sun et al., CVPR 2024; their ``DKD.py``): both logit vectors
z-scored per sample before the temperature, CE on raw logits (LS settings: :func:`kdlib.methods.ls.ls_settings`).
Terms: ``loss_ce``, ``loss_tckd`` (alpha, warm-up included), ``loss_nckd`` (beta, warm-up included).
"""
import torch.nn.functional as F

from kdlib.losses import as_float, dkd_parts, maybe_standardize
from kdlib.methods import register
from kdlib.methods.base import Method, check_bool, check_nonnegative, check_positive, warmup_factor

#: beta of the DKD configs (configs/cifar100/dkd/*.yaml), keyed by (teacher, student) zoo names
PER_PAIR_BETA = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "ShuffleV1"): 8.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("wrn_40_2", "ShuffleV1"): 8.0,
    ("ResNet50", "MobileNetV2"): 8.0,
}
DEFAULT_BETA = 8.0


def default_beta(teacher: str, student: str) -> float:
    """DKD's beta for a teacher/student pair; 8.0 (DKD's default) for pairs the authors did not tune."""
    return PER_PAIR_BETA.get((teacher, student), DEFAULT_BETA)


@register
class DKD(Method):
    name = "dkd"
    defaults = {"ce_weight": 1.0, "alpha": 1.0, "beta": DEFAULT_BETA, "temperature": 4.0, "warmup": 20,
                "standardize": False}
    per_pair = {"beta": PER_PAIR_BETA}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        self.ce_weight = check_nonnegative("ce_weight", self.hparams["ce_weight"])
        self.alpha = check_nonnegative("alpha", self.hparams["alpha"])
        self.beta = check_nonnegative("beta", self.hparams["beta"])
        self.temperature = check_positive("temperature", self.hparams["temperature"])
        self.warmup = check_nonnegative("warmup", self.hparams["warmup"])
        self.standardize = check_bool("standardize", self.hparams["standardize"])

    def forward(self, student_logits, teacher_logits, targets, ctx):
        zs, zt = maybe_standardize(student_logits, teacher_logits, self.standardize)
        parts = dkd_parts(zs, zt, targets, self.temperature)
        scale = warmup_factor(ctx, self.warmup) * self.temperature**2
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(as_float(student_logits), targets),
            "loss_tckd": scale * self.alpha * parts.tckd.mean(),
            "loss_nckd": scale * self.beta * parts.nckd.mean(),
        }
