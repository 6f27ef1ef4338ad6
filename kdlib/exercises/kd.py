"""Exercises of the KD chapter: the loss and its gradient."""
from __future__ import annotations

import torch.nn.functional as F

from kdlib import gradients, losses
from kdlib.exercises.core import Exercise, Mistake, kl_rows, log_soft, logit_cases, register


def _kd_reverse(student_logits, teacher_logits, temperature):
    log_s, log_t = log_soft(student_logits, temperature), log_soft(teacher_logits, temperature)
    return kl_rows(log_s.exp(), log_s, log_t).mean() * temperature**2


def _kd_batch_softmax(student_logits, teacher_logits, temperature):
    log_s, log_t = log_soft(student_logits, temperature, 0), log_soft(teacher_logits, temperature, 0)
    return kl_rows(log_t.exp(), log_t, log_s).mean() * temperature**2


def _kd_teacher_not_softened(student_logits, teacher_logits, temperature):
    log_s, log_t = log_soft(student_logits, temperature), log_soft(teacher_logits, 1.0)
    return kl_rows(log_t.exp(), log_t, log_s).mean() * temperature**2


def _kd_student_not_softened(student_logits, teacher_logits, temperature):
    log_s, log_t = log_soft(student_logits, 1.0), log_soft(teacher_logits, temperature)
    return kl_rows(log_t.exp(), log_t, log_s).mean() * temperature**2


def _kd_probabilities_into_kl_div(student_logits, teacher_logits, temperature):
    p_s, p_t = F.softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * temperature**2


def _kd_cross_entropy(student_logits, teacher_logits, temperature):
    p_t = F.softmax(teacher_logits / temperature, 1)
    return -(p_t * log_soft(student_logits, temperature)).sum(1).mean() * temperature**2


_SUM_OVER_CLASSES = ("sum over the classes of each sample, then average over the samples (F.kl_div's "
                     "reduction='batchmean')")

register(Exercise(
    name="kd_loss", chapter="kd", title="The KD loss",
    practises="the softened KL divergence, its direction and the T² factor",
    args=("student_logits", "teacher_logits", "temperature"),
    reference=lambda student_logits, teacher_logits, temperature: losses.kd_loss(
        student_logits, teacher_logits, temperature),
    reference_name="kdlib.losses.kd_loss",
    cases=lambda seed: logit_cases(seed, targets=False),
    mistakes=[
        Mistake("reverse KL", _kd_reverse,
                "you computed KL(p^s ‖ p^t); KD uses KL(p^t ‖ p^s), the teacher's distribution first: weight "
                "the log-ratio log(p^t / p^s) by the teacher's probabilities p^t"),
        Mistake("softmax over the batch", _kd_batch_softmax,
                "your softmax runs over the batch (dim=0); each sample's distribution is over its classes: "
                "use dim=1"),
        Mistake("teacher not softened", _kd_teacher_not_softened,
                "the teacher's logits are not divided by T: soften both distributions, p^t = softmax(z^t / T)"),
        Mistake("student not softened", _kd_student_not_softened,
                "the student's logits are not divided by T: soften both distributions, p^s = softmax(z^s / T)"),
        Mistake("probabilities into F.kl_div", _kd_probabilities_into_kl_div,
                "F.kl_div expects the student's LOG-probabilities as its first argument and you gave it "
                "probabilities: use F.log_softmax(student_logits / T, dim=1)"),
        Mistake("cross-entropy", _kd_cross_entropy,
                "you computed the cross-entropy −Σ p^t log p^s: it has KD's gradient, but its value is larger "
                "by the teacher's entropy; the KL divergence is Σ p^t (log p^t − log p^s)"),
    ],
    factor_hints={
        "1/T²": "multiply the KL divergence by T²",
        "1/T": "multiply by T², not by T",
        "T": "multiply by T², not by T³",
        "T²": "multiply the KL divergence by T² once, not twice",
        "B": "you summed over the batch: " + _SUM_OVER_CLASSES,
        "1/C": "you averaged over the classes too (F.kl_div's reduction='mean' does this): " + _SUM_OVER_CLASSES,
        "1/(BC)": "you averaged over the classes too: " + _SUM_OVER_CLASSES,
        "-1": "the sign is wrong: KL(p^t ‖ p^s) = Σ p^t (log p^t − log p^s) is never negative",
    },
))


# the KD gradient -----------------------------------------------------------------------------------------
def _kdg_softmax_t1(student_logits, teacher_logits, temperature):
    return temperature * (F.softmax(student_logits, 1) - F.softmax(teacher_logits, 1)) / student_logits.shape[0]


def _kdg_columns(student_logits, teacher_logits, temperature):
    p_s, p_t = F.softmax(student_logits / temperature, 0), F.softmax(teacher_logits / temperature, 0)
    return temperature * (p_s - p_t) / student_logits.shape[0]


register(Exercise(
    name="kd_grad", chapter="kd", title="The gradient of the KD loss",
    practises="the chain rule through a softened softmax: where the T of T (p^s − p^t) comes from",
    args=("student_logits", "teacher_logits", "temperature"),
    reference=lambda student_logits, teacher_logits, temperature: gradients.kd_grad(
        student_logits, teacher_logits, temperature),
    reference_name="autograd of kdlib.losses.kd_loss (= kdlib.gradients.kd_grad)",
    cases=lambda seed: logit_cases(seed, targets=False),
    what="gradient", wrt=None, scalar=False,
    mistakes=[
        Mistake("softmax at T = 1", _kdg_softmax_t1,
                "your probabilities are taken at T = 1: the loss compares softmax(z / T), so its gradient has "
                "p^s(T) − p^t(T)"),
        Mistake("softmax over the batch", _kdg_columns,
                "your softmax runs over the batch (dim=0); each sample's distribution is over its classes: "
                "use dim=1"),
    ],
    factor_hints={
        "T": "the loss's T² and the chain rule's 1/T (from z / T) leave one factor T, not T²",
        "1/T": "the loss's T² and the chain rule's 1/T leave one factor T: multiply by T",
        "T²": "the loss's T² and the chain rule's 1/T leave one factor T",
        "B": "the loss is a batch mean, so each sample's gradient is divided by B",
        "-1": "it is p^s − p^t (student minus teacher): gradient descent must move the student toward the teacher",
        "1/B": "divide by B once (the batch mean), not twice",
    },
    parts=("T = 1", "values"),
))
