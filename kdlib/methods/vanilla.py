r"""Vanilla training: cross-entropy on the labels, no teacher (teachers and baseline students).

.. math:: \mathcal{L} = \mathrm{CE}(z^s, y)
"""
import torch.nn.functional as F

from kdlib.losses import as_float
from kdlib.methods import register
from kdlib.methods.base import Method


@register
class Vanilla(Method):
    name = "vanilla"
    uses_teacher = False
    defaults = {}

    def forward(self, student_logits, teacher_logits, targets, ctx):
        return {"loss_ce": F.cross_entropy(as_float(student_logits), targets)}
