r"""MLKD, multi-level logit distillation (Jin, Wang and Lin, CVPR 2023). Default: the loss exactly as the
authors' released ``KD_ours.py`` computes it (Jin-Ying/Multi-Level-Logit-Distillation), quirks included.

Two views of every image, weak :math:`w` (crop + flip) and strong :math:`s` (crop + flip + RandAugment(2, 10)
+ Cutout, :func:`kdlib.augment.strong_augment`), both through student and teacher. With
:math:`P = \mathrm{softmax}(z/T)` and :math:`\mathcal{T} = \{4, 3, 5, 2, 6\}`:

.. math:: I_T(z^s, z^t) = \frac{T^2}{B}\sum_n \mathrm{KL}(P^t_n \| P^s_n),\quad
          K_T = \frac{1}{C}\big\|P^{t\top}P^t - P^{s\top}P^s\big\|_F^2,\quad
          R_T = \frac{1}{B}\big\|P^tP^{t\top} - P^sP^{s\top}\big\|_F^2

.. math:: \mathcal{L} = \lambda_{CE}\big(\mathrm{CE}(z^s_w, y) + \mathrm{CE}(z^s_s, y)\big)
          + \lambda_{KD}\sum_{T\in\mathcal{T}}\Big(\bar m\, I_T^w + I_T^{s*} + \bar m_c\, K_T^w + \bar m\, R_T^w\Big)

Released-code quirks (``variant="code"``, the default): (1) the confidence masks (teacher max-probability
at T = 1 <= its batch median; class mass <= its median over classes) multiply an already averaged loss, so
they only rescale it by the mask fraction :math:`\bar m` (about 1/2), they select nothing;
(2) :math:`I^{s*}` uses the strong logits at T = 4, 3, 5 but the **weak** logits at T = 2 and 6;
(3) the strong-view class and batch terms are computed there but never enter the loss.
``variant="paper"``: kdlib's reading of the paper's description, every level on both views at every
temperature, no masks (the confidence-based sample selection of the paper is not reproduced):
:math:`\lambda_{KD}\sum_{v\in\{w,s\}}\sum_T (I^v_T + K^v_T + R^v_T)`.

``temperature`` is the base temperature, the first of :math:`\mathcal{T}` (the authors' configuration
value; the other four are written into their code). ``standardize=True``: logit standardisation, as the
LS authors ran MLKD (their ``mdistiller/distillers/MLKD.py``, ``tools/train.py --logit-stand --base-temp 2
--kd-weight 9``: :func:`kdlib.methods.ls.ls_settings`): both views' logits z-scored inside the instance
terms :math:`I_T` only, the class and batch terms on the raw logits (``standardize_levels="instance"``,
the default). ``standardize_levels="all"`` is kdlib's own reading of LS, z-scoring at every level.
Recipe deviation: the authors ran MLKD with lr 0.025 for ResNet/WRN/VGG students (:meth:`MLKD.recipe`);
their epoch counts (240; 480 for MobileNetV2 and WRN-40-2 -> ShuffleV1; 960 for resnet32x4 ->
ShuffleV1/V2) are recorded in :func:`paper_epochs` and printed by the book. The engine supplies the strong
view (``extra_views``); the exact teacher-logit cache covers the weak view only, the strong view goes
through the live teacher.
Terms: ``loss_ce``, ``loss_kd`` (instance), ``loss_cc`` (class), ``loss_bc`` (batch).
"""
import torch.nn.functional as F

from kdlib.augment import strong_augment
from kdlib.errors import KDLibError
from kdlib.losses import (as_float, below_median_fraction, kd_loss, maybe_standardize, mlkd_batch_loss,
                          mlkd_class_loss)
from kdlib.methods import register
from kdlib.methods.base import Method, check_bool, check_choice, check_nonnegative, check_positive

#: the temperatures after the base one, in the authors' order (their code writes them in)
OTHER_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
VARIANTS = ("code", "paper")
#: where logit standardisation applies: the LS authors' code (instance terms) or every level
STANDARDIZE_LEVELS = ("instance", "all")


def paper_epochs(teacher: str, student: str) -> int:
    """The authors' epoch count for a pair (configs/cifar100/ours/*.yaml): 960 for resnet32x4 ->
    ShuffleV1/V2, 480 for MobileNetV2 students and WRN-40-2 -> ShuffleV1, else 240; the decay epochs stay
    150/180/210 in all of them."""
    if teacher == "resnet32x4" and student in ("ShuffleV1", "ShuffleV2"):
        return 960
    if student == "MobileNetV2" or (teacher, student) == ("wrn_40_2", "ShuffleV1"):
        return 480
    return 240


@register
class MLKD(Method):
    name = "mlkd"
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "variant": "code", "standardize": False,
                "standardize_levels": "instance"}
    extra_views = {"strong": strong_augment}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", hp["kd_weight"])
        self.temperature = check_positive("temperature", hp["temperature"])
        self.variant = check_choice("variant", hp["variant"], VARIANTS)
        self.standardize = check_bool("standardize", hp["standardize"])
        self.standardize_levels = check_choice("standardize_levels", hp["standardize_levels"], STANDARDIZE_LEVELS)

    @classmethod
    def recipe(cls, teacher, student):
        """lr 0.025 for ResNet/WRN/VGG students, 0.01 for MobileNetV2/ShuffleNets (authors' configs)."""
        small = str(student).lower().startswith(("mobilenet", "shuffle"))
        return {"lr": 0.01 if small else 0.025}

    def forward(self, student_logits, teacher_logits, targets, ctx):
        if "strong" not in ctx.extra_logits:
            raise KDLibError("mlkd needs the strong view (ctx.extra_logits['strong']); train it through kdlib's "
                             "engine, which makes that view from the raw images")
        s_strong, t_strong = ctx.extra_logits["strong"]
        zs_w, zs_s = as_float(student_logits), as_float(s_strong)
        zt_w, zt_s = as_float(teacher_logits), as_float(t_strong)
        loss_ce = self.ce_weight * (F.cross_entropy(zs_w, targets) + F.cross_entropy(zs_s, targets))
        # confidences from the raw weak teacher logits at T = 1 (before any standardisation)
        pt_w = F.softmax(zt_w.detach(), dim=1)
        m = below_median_fraction(pt_w.max(dim=1).values)
        m_c = below_median_fraction(pt_w.sum(dim=0))
        # the instance terms see standardised logits under LS; the class and batch terms only when every
        # level is standardised (kdlib's reading), the raw logits otherwise (the LS authors' code)
        inst_w = maybe_standardize(zs_w, zt_w, self.standardize)
        inst_s = maybe_standardize(zs_s, zt_s, self.standardize)
        every = self.standardize and self.standardize_levels == "all"
        rel_w = inst_w if every else (zs_w, zt_w)
        rel_s = inst_s if every else (zs_s, zt_s)
        inst = cls = bat = 0.0
        for k, t in enumerate((self.temperature,) + OTHER_TEMPERATURES):
            if self.variant == "code":
                strong = inst_s if k < 3 else inst_w  # quirk 2: T = 2 and 6 read the weak logits
                inst = inst + m * kd_loss(*inst_w, t) + kd_loss(*strong, t)
                cls = cls + m_c * mlkd_class_loss(*rel_w, t)
                bat = bat + m * mlkd_batch_loss(*rel_w, t)
            else:
                for view, rel in ((inst_w, rel_w), (inst_s, rel_s)):
                    inst = inst + kd_loss(*view, t)
                    cls = cls + mlkd_class_loss(*rel, t)
                    bat = bat + mlkd_batch_loss(*rel, t)
        w = self.kd_weight
        return {"loss_ce": loss_ce, "loss_kd": w * inst, "loss_cc": w * cls, "loss_bc": w * bat}
