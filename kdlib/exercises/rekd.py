"""Exercises of the ReKD chapter: the Top-K term."""
from __future__ import annotations


from kdlib import losses
from kdlib.exercises.core import Exercise, Mistake, log_soft, logit_cases, register, topk_groups


def _tisd_teacher_topk(student_logits, teacher_logits, k, temperature):
    return losses.rekd_terms(student_logits, teacher_logits, k, temperature, "teacher")["tisd"]


def _tisd_full(student_logits, teacher_logits, k, temperature):
    return losses.kd_loss(student_logits, teacher_logits, temperature)


def _tisd_not_renormalised(student_logits, teacher_logits, k, temperature):
    inside = losses.topk_mask(student_logits, teacher_logits, k)
    log_s, log_t = log_soft(student_logits, temperature), log_soft(teacher_logits, temperature)
    return (inside * log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


register(Exercise(
    name="rekd_tisd", chapter="rekd", title="ReKD's Top-K term (TISD)",
    practises="a class set chosen per sample (the student's Top-K) and a softmax renormalised inside it",
    args=("student_logits", "teacher_logits", "k", "temperature"),
    reference=lambda student_logits, teacher_logits, k, temperature: losses.rekd_terms(
        student_logits, teacher_logits, k, temperature, "student")["tisd"],
    reference_name="kdlib.losses.rekd_terms(...)['tisd'] (Top-K of the student)",
    cases=lambda seed: logit_cases(seed, targets=False, k=3),
    groups=topk_groups,
    mistakes=[
        Mistake("teacher's Top-K", _tisd_teacher_topk,
                "you took the teacher's Top-K classes; this reconstruction of ReKD takes the student's "
                "(student_logits.topk(k, dim=1))"),
        Mistake("no mask", _tisd_full,
                "you compared the full distributions (KD's KL): TISD compares only the Top-K classes, with "
                "both softmaxes renormalised over those K classes"),
        Mistake("not renormalised", _tisd_not_renormalised,
                "you kept the full softmax's probabilities of the Top-K classes: TISD renormalises them over "
                "the K classes (a softmax over the Top-K logits alone)"),
    ],
    factor_hints={"1/T²": "multiply the KL divergence by T²", "1/T": "multiply by T², not by T",
                  "B": "you summed over the batch: average over it"},
))
