r"""ReKD: Top-K Inter-class Similar Distillation (TISD) + Non-Top-K Inter-class Discriminability (NTID)
(Xu, Ren, Huang, Zheng and Chen, IEEE TCSVT 2023). **[RECON]**: only the abstract could be read. The
decomposition is exact mathematics; the loss follows public code of uncertain provenance (Top-K chosen
from the student, no binary term, DKD-style warm-up); every default is kdlib's choice (see the ReKD chapter).

For a class set K with teacher mass :math:`P^t_K`, :math:`\tilde p` renormalised inside K and
:math:`\check p` outside (exact identity, tested):

.. math:: \mathrm{KL}(p^t\|p^s) = \mathrm{KL}(b^t_K\|b^s_K) + P^t_K\,\mathrm{KL}(\tilde p^t\|\tilde p^s)
          + (1 - P^t_K)\,\mathrm{KL}(\check p^t\|\check p^s)

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y) + \min(e/w, 1)\,T^2\big(\alpha\,\mathrm{TISD}
          + \beta\,\mathrm{NTID}\big),\quad \mathrm{TISD} = \mathrm{KL}(\tilde p^t\|\tilde p^s),\;
          \mathrm{NTID} = \mathrm{KL}(\check p^t\|\check p^s)

Defaults [RECON]: K = 3 (the follow-up code's value), alpha = 1, beta = 8, T = 4, w = 20 warm-up epochs,
lambda_CE = 1 (DKD's settings). ``include_binary_term=True`` adds
:math:`\alpha\,T^2\,\mathrm{KL}(b^t_K\|b^s_K)`
(``loss_binary``), so K = 1 with the label as Top-1 is DKD. K is checked against the class count on the
first batch (1 <= K < C). Terms: ``loss_ce``, ``loss_tisd``, ``loss_ntid`` [, ``loss_binary``].
"""
import torch.nn.functional as F

from kdlib.errors import KDLibError
from kdlib.losses import TOPK_SOURCES, as_float, topk_decomposition
from kdlib.methods import register
from kdlib.methods.base import (Method, check_choice, check_int, check_nonnegative, check_positive,
                                warmup_factor)


@register
class ReKD(Method):
    name = "rekd"
    defaults = {"ce_weight": 1.0, "k": 3, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20,
                "topk_source": "student", "include_binary_term": False}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.alpha = check_nonnegative("alpha", hp["alpha"])
        self.beta = check_nonnegative("beta", hp["beta"])
        self.temperature = check_positive("temperature", hp["temperature"])
        self.warmup = check_nonnegative("warmup", hp["warmup"])
        self.topk_source = check_choice("topk_source", hp["topk_source"], TOPK_SOURCES)
        self.include_binary_term = check_choice("include_binary_term", hp["include_binary_term"],
                                                (True, False))
        self.k = check_int("k", hp["k"], 1)

    def setup(self, ctx):
        self.check_num_classes(ctx.num_classes)
        return {}

    def check_num_classes(self, num_classes: int) -> None:
        if not self.k < num_classes:
            raise KDLibError(f"k must be < the number of classes ({num_classes}), got {self.k}")

    def forward(self, student_logits, teacher_logits, targets, ctx):
        z = as_float(student_logits)
        self.check_num_classes(z.shape[1])
        d = topk_decomposition(z, teacher_logits, self.k, self.temperature, self.topk_source)
        scale = warmup_factor(ctx, self.warmup) * self.temperature**2
        terms = {"loss_ce": self.ce_weight * F.cross_entropy(z, targets),
                 "loss_tisd": scale * self.alpha * d.inside.mean(),
                 "loss_ntid": scale * self.beta * d.outside.mean()}
        if self.include_binary_term:
            terms["loss_binary"] = scale * self.alpha * d.binary.mean()
        return terms
