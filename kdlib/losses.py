"""Functional distillation losses, the equations of the book in code.

Every function takes raw logits of shape (B, C) and returns a scalar averaged over the batch. Logits are
cast to float32 first, so the losses stay exact under bf16 autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Hinton et al.'s distillation loss.

    .. math:: \mathcal{L}_{KD} = \frac{T^2}{B} \sum_b \sum_i p^t_{b,i} \log \frac{p^t_{b,i}}{p^s_{b,i}},
              \qquad p = \mathrm{softmax}(z / T)

    KL(teacher || student) of the softened distributions, summed over classes, averaged over the batch,
    multiplied by :math:`T^2` so that its gradients keep their scale when T changes.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * temperature**2
