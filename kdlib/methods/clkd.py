r"""Class-aware logit KD, CLKD (Zhang, Liu, Hopcroft and He, arXiv 2211.14773). **[RECON, corroborated
structure]**: only the abstract could be read; the loss structure is the one three unofficial
re-implementations agree on (see the CLKD chapter), the details below are kdlib's choices.

.. math:: \mathcal{L} = \lambda\,\mathrm{CE}(z^s, y) + \mu\,(L_{ins} + \beta\,L_{cla}) + \nu\,L_{cc}

.. math:: L_{ins} = \frac{1}{B}\sum_n \Big\| \frac{z^s_n}{\|z^s_n\|} - \frac{z^t_n}{\|z^t_n\|} \Big\|^2,\quad
          L_{cla} = \frac{1}{C}\sum_c \Big\| \frac{z^s_{:,c}}{\|z^s_{:,c}\|}
          - \frac{z^t_{:,c}}{\|z^t_{:,c}\|} \Big\|^2,\quad
          L_{cc} = \frac{1}{C^2}\,\| M^s - M^t \|_F,\quad M = \frac{1}{C-1} Z_c^\top Z_c

on raw logits (no softmax, no temperature, as in every re-implementation); :math:`z_n \in \mathbb{R}^C` is
image n's logit vector (a row of the B x C batch), :math:`z_{:,c} \in \mathbb{R}^B` class c's logits across
the batch (a column), :math:`Z_c` the batch-centred B x C logits, and the Frobenius norm is **unsquared**
(:func:`kdlib.losses.streamlined_correlation_loss`). Weights lambda = 0.1, mu = 0.5, beta = 2.0, nu = 0.4:
the only values seen (re-implementations), unverified against the paper. L_cla and L_cc are batch
statistics (they depend on the batch size, 64 in the recipe).

The default is these equations literally: ``normalization="vector_sum"`` (L_ins and L_cla as written, a
squared distance per vector averaged over vectors) with ``variant="streamlined"`` (the L_cc of the
"Streamlined KD" group's re-implementation, HyunJunSik/StreamLined ``Distiller/CLKD.py``). The
reconstruction leaves the scale open; kdlib states this one (how it was chosen is in the CLKD chapter).
That code itself is ``variant="streamlined", normalization="element_mean"``: ``F.mse_loss`` element means,
which divide L_ins by C and L_cla by B relative to the equations, so their gradients are C and B times
smaller. ``variant="recon"`` is kdlib's first reading of L_cc (:math:`\frac{1}{C^2}\|M^s - M^t\|_F^2`,
squared, of the B - 1 covariance; ``corr`` in {cov, gram, sample}, see
:func:`kdlib.losses.class_correlation_loss`), kept for the ablation.
Terms: ``loss_ce``, ``loss_ins`` (mu), ``loss_cla`` (mu * beta), ``loss_cc`` (nu).
"""
import torch.nn.functional as F

from kdlib.errors import KDLibError
from kdlib.losses import (CLKD_NORMALIZATIONS, CORRELATIONS, as_float, class_correlation_loss,
                          clkd_class_loss, clkd_instance_loss, streamlined_correlation_loss)
from kdlib.methods import register
from kdlib.methods.base import Method, check_choice, check_nonnegative


VARIANTS = ("streamlined", "recon")


@register
class CLKD(Method):
    name = "clkd"
    defaults = {"ce_weight": 0.1, "kd_weight": 0.5, "cla_weight": 2.0, "cc_weight": 0.4,
                "variant": "streamlined", "corr": "cov", "normalization": "vector_sum"}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])  # lambda
        self.kd_weight = check_nonnegative("kd_weight", hp["kd_weight"])  # mu
        self.cla_weight = check_nonnegative("cla_weight", hp["cla_weight"])  # beta
        self.cc_weight = check_nonnegative("cc_weight", hp["cc_weight"])  # nu
        self.corr = check_choice("corr", hp["corr"], CORRELATIONS)
        self.normalization = check_choice("normalization", hp["normalization"], CLKD_NORMALIZATIONS)
        self.variant = check_choice("variant", hp["variant"], VARIANTS)
        if self.variant == "streamlined" and self.corr != "cov":
            raise KDLibError(f"corr={self.corr!r} applies to variant='recon' only; the streamlined variant "
                             f"has its own correlation term")

    def forward(self, student_logits, teacher_logits, targets, ctx):
        z = as_float(student_logits)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(z, targets),
            "loss_ins": self.kd_weight * clkd_instance_loss(z, teacher_logits, self.normalization),
            "loss_cla": self.kd_weight * self.cla_weight * clkd_class_loss(z, teacher_logits,
                                                                           self.normalization),
            "loss_cc": self.cc_weight * (streamlined_correlation_loss(z, teacher_logits)
                                         if self.variant == "streamlined"
                                         else class_correlation_loss(z, teacher_logits, self.corr)),
        }
