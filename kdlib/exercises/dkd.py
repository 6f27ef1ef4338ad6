"""Exercises of the DKD chapter: TCKD and NCKD."""
from __future__ import annotations


from kdlib import losses
from kdlib.exercises.core import Exercise, Mistake, kl_rows, label_groups, log_soft, logit_cases, register


def _nckd_unmasked(student_logits, teacher_logits, targets, temperature):
    log_s, log_t = log_soft(student_logits, temperature), log_soft(teacher_logits, temperature)
    return kl_rows(log_t.exp(), log_t, log_s).mean() * temperature**2


def _nckd_not_renormalised(student_logits, teacher_logits, targets, temperature):
    keep = ~losses.target_mask(student_logits, targets)
    log_s, log_t = log_soft(student_logits, temperature), log_soft(teacher_logits, temperature)
    return (keep * log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


def _nckd_kd_weight(student_logits, teacher_logits, targets, temperature):
    nckd = losses.dkd_parts(student_logits, teacher_logits, targets, temperature)
    return ((1 - nckd.teacher_target_prob) * nckd.nckd).mean() * temperature**2


register(Exercise(
    name="nckd_loss", chapter="dkd", title="DKD's non-target term (NCKD)",
    practises="a softmax restricted to the non-target classes (a mask), and DKD's decoupling of KD's weight",
    args=("student_logits", "teacher_logits", "targets", "temperature"),
    reference=lambda student_logits, teacher_logits, targets, temperature: losses.nckd_loss(
        student_logits, teacher_logits, targets, temperature),
    reference_name="kdlib.losses.nckd_loss",
    cases=lambda seed: logit_cases(seed),
    groups=label_groups,
    mistakes=[
        Mistake("label not masked", _nckd_unmasked,
                "you compared the full distributions (that is KD's KL): NCKD leaves the label out, a softmax "
                "over the C − 1 non-target classes only (mask the label's logit with -inf, or drop its column)"),
        Mistake("not renormalised", _nckd_not_renormalised,
                "you dropped the label's term from the full softmax's KL but did not renormalise: NCKD "
                "compares p̂, the softmax over the non-target classes alone (they sum to 1 without the label)"),
        Mistake("KD's weight", _nckd_kd_weight,
                "you multiplied by (1 − p^t_y): that is the weight KD gives NCKD; DKD's NCKD term has no "
                "such weight (DKD replaces it with the constant β)"),
    ],
    factor_hints={"1/T²": "multiply the KL divergence by T²", "1/T": "multiply by T², not by T",
                  "B": "you summed over the batch: average over it",
                  "1/C": "sum over the classes, average over the samples only"},
))


def _tckd_unsoftened(student_logits, teacher_logits, targets, temperature):
    return losses.tckd_loss(student_logits * temperature, teacher_logits * temperature, targets, temperature)


def _tckd_target_only(student_logits, teacher_logits, targets, temperature):
    y = targets[:, None]
    log_s, log_t = log_soft(student_logits, temperature).gather(1, y), log_soft(teacher_logits, temperature).gather(1, y)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


register(Exercise(
    name="tckd_loss", chapter="dkd", title="DKD's target term (TCKD)",
    practises="the binary distribution [p_y, 1 − p_y] and its KL divergence",
    args=("student_logits", "teacher_logits", "targets", "temperature"),
    reference=lambda student_logits, teacher_logits, targets, temperature: losses.tckd_loss(
        student_logits, teacher_logits, targets, temperature),
    reference_name="kdlib.losses.tckd_loss",
    cases=lambda seed: logit_cases(seed),
    groups=label_groups,
    mistakes=[
        Mistake("no temperature", _tckd_unsoftened,
                "your probabilities are taken at T = 1: TCKD compares the binary distributions of the "
                "softened softmax, p = softmax(z / T)"),
        Mistake("target term only", _tckd_target_only,
                "you kept only the label's term p^t_y log(p^t_y / p^s_y): the binary KL has a second term, "
                "(1 − p^t_y) log((1 − p^t_y) / (1 − p^s_y)), for the mass on all other classes"),
    ],
    factor_hints={"1/T²": "multiply the KL divergence by T²", "1/T": "multiply by T², not by T",
                  "B": "you summed over the batch: average over it"},
))
