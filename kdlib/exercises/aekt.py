"""Exercises of the AEKT chapter: the adaptive stop-gradient weight."""
from __future__ import annotations

import torch.nn.functional as F

from kdlib import losses
from kdlib.exercises.core import Exercise, Mistake, label_groups, logit_cases, register


def _aekt_reference(student_logits, teacher_logits, targets, temperature):
    r = losses.adaptive_weight(student_logits, teacher_logits, targets, temperature, "ratio", 0.0, 10.0)
    return losses.aekt_explicit_loss(student_logits, teacher_logits, targets, temperature, weight=r)


def _aekt_with(student_logits, teacher_logits, targets, temperature, weight):
    tckd = losses.dkd_parts(student_logits, teacher_logits, targets, temperature).tckd
    return (weight * tckd).mean() * temperature**2


def _aekt_probs(z, targets, t):
    return F.softmax(z / t, 1).gather(1, targets[:, None]).squeeze(1)


def _aekt_not_detached(student_logits, teacher_logits, targets, temperature):
    r = (_aekt_probs(teacher_logits, targets, temperature) / _aekt_probs(student_logits, targets, temperature))
    return _aekt_with(student_logits, teacher_logits, targets, temperature, r.clamp(0, 10))


def _aekt_inverted(student_logits, teacher_logits, targets, temperature):
    r = (_aekt_probs(student_logits, targets, temperature) / _aekt_probs(teacher_logits, targets, temperature))
    return _aekt_with(student_logits, teacher_logits, targets, temperature, r.clamp(0, 10).detach())


def _aekt_not_clipped(student_logits, teacher_logits, targets, temperature):
    r = (_aekt_probs(teacher_logits, targets, temperature) / _aekt_probs(student_logits, targets, temperature))
    return _aekt_with(student_logits, teacher_logits, targets, temperature, r.detach())


def _aekt_at_t1(student_logits, teacher_logits, targets, temperature):
    r = (_aekt_probs(teacher_logits, targets, 1.0) / _aekt_probs(student_logits, targets, 1.0))
    return _aekt_with(student_logits, teacher_logits, targets, temperature, r.clamp(0, 10).detach())


register(Exercise(
    name="aekt_explicit_loss", chapter="aekt", title="AEKT's adaptive weight on the explicit knowledge",
    practises="a per-sample stop-gradient weight r = clip(p^t_y / p^s_y, 0, 10) on the target term (TCKD)",
    args=("student_logits", "teacher_logits", "targets", "temperature"),
    reference=_aekt_reference,
    reference_name="kdlib.losses.aekt_explicit_loss with kdlib.losses.adaptive_weight (ratio, clip [0, 10])",
    cases=lambda seed: logit_cases(seed, confident_teacher=True),
    groups=label_groups,
    mistakes=[
        Mistake("weight not detached", _aekt_not_detached,
                "your weight r carries a gradient: it is a stop-gradient weight, computed from detached "
                "probabilities (.detach() or torch.no_grad()), so that it only scales TCKD's gradient"),
        Mistake("inverted ratio", _aekt_inverted,
                "your ratio is upside down: r = p^t_y / p^s_y, large when the teacher is surer of the label "
                "than the student"),
        Mistake("not clipped", _aekt_not_clipped,
                "r is not clipped: AEKT's weight is clip(p^t_y / p^s_y, 0, 10) (torch.clamp(r, 0, 10)), and "
                "some of these samples have ratios above 10"),
        Mistake("ratio at T = 1", _aekt_at_t1,
                "your ratio uses probabilities at T = 1: r compares the softened probabilities, "
                "softmax(z / T), like the TCKD term it weights"),
    ],
    factor_hints={"1/T²": "multiply by T²", "1/T": "multiply by T², not by T",
                  "B": "you summed over the batch: average over it"},
))
