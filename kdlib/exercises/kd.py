"""Exercises of the KD chapter: the loss, its gradient, and the paired interval of its verdict."""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

from kdlib import gradients, losses
from kdlib.exercises.core import Case, Exercise, Mistake, kl_rows, log_soft, logit_cases, register


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


# a noise-aware verdict: the paired t interval of the chapter's verdict table ------------------------------
def _seed_cases(seed: int) -> List[Case]:
    """Accuracies (%) of a method and its baseline over n seeds: the seed moves both (shared
    initialisation and data order), so the paired differences vary less than either method's runs."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n in (4, 3, 6, 10):
        shared = 50.0 + 2.0 * torch.randn(n, generator=gen, dtype=torch.float64)
        baseline = shared + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        method = shared + 1.0 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        cases.append(Case({"method_acc": method, "baseline_acc": baseline}, n, 1, 1.0, counts="seeds per method"))
    return cases


def _paired_interval_reference(method_acc, baseline_acc):
    # imported here: pandas costs every grading kernel a second, and only this exercise needs it
    import pandas as pd

    from kdlib import stats

    d = stats.difference_of_values(pd.Series(method_acc.tolist()), pd.Series(baseline_acc.tolist()))
    return torch.tensor(d.ci, dtype=torch.float64)


def _interval(centre, half):
    return torch.stack([centre - half, centre + half])


def _pi_unpaired(method_acc, baseline_acc):
    n = len(method_acc)
    se = (method_acc.var() / n + baseline_acc.var() / n).sqrt()
    return _interval(method_acc.mean() - baseline_acc.mean(), _t(n - 1) * se)


def _pi_pooled(method_acc, baseline_acc):
    n = len(method_acc)
    sd = torch.cat([method_acc, baseline_acc]).std()
    return _interval((method_acc - baseline_acc).mean(), _t(n - 1) * sd / math.sqrt(n))


def _pi_z(z):
    def interval(method_acc, baseline_acc):
        d = method_acc - baseline_acc
        return _interval(d.mean(), z * d.std() / math.sqrt(len(d)))
    return interval


def _pi_df_n(method_acc, baseline_acc):
    d = method_acc - baseline_acc
    return _interval(d.mean(), _t(len(d)) * d.std() / math.sqrt(len(d)))


def _pi_population_sd(method_acc, baseline_acc):
    d = method_acc - baseline_acc
    return _interval(d.mean(), _t(len(d) - 1) * d.std(correction=0) / math.sqrt(len(d)))


def _pi_sd_not_se(method_acc, baseline_acc):
    d = method_acc - baseline_acc
    return _interval(d.mean(), _t(len(d) - 1) * d.std())


def _pi_over_n(method_acc, baseline_acc):
    d = method_acc - baseline_acc
    return _interval(d.mean(), _t(len(d) - 1) * d.std() / len(d))


def _pi_reversed(method_acc, baseline_acc):
    d = baseline_acc - method_acc
    return _interval(d.mean(), _t(len(d) - 1) * d.std() / math.sqrt(len(d)))


def _pi_high_first(method_acc, baseline_acc):
    return _paired_interval_reference(method_acc, baseline_acc).flip(0)


def _t(df):
    from kdlib import stats

    return stats.t_critical(df)


_T_HINT = "stats.t_critical(n - 1), the 97.5 % quantile of Student's t (3.18 for 4 seeds, 2.26 for 10)"

register(Exercise(
    name="paired_interval", chapter="kd", title="A noise-aware verdict: the paired interval",
    practises="the 95 % interval of a difference of two methods over seeds: paired differences, their "
              "standard error and the t quantile with n − 1 degrees of freedom",
    args=("method_acc", "baseline_acc"),
    reference=_paired_interval_reference,
    reference_name="kdlib.stats.difference_of_values(...).ci",
    cases=_seed_cases,
    what="interval", wrt=None, scalar=False,
    groups=lambda case: {"the lower end": torch.tensor([True, False]), "the upper end": torch.tensor([False, True])},
    mistakes=[
        Mistake("unpaired", _pi_unpaired,
                "you used each method's own spread over the seeds (an unpaired interval); the runs are paired by "
                "seed, so take the differences d = method_acc − baseline_acc first and use their standard "
                "deviation: the seed's shared part cancels in d"),
        Mistake("pooled", _pi_pooled,
                "you used the pooled standard deviation of both methods' accuracies, not that of the paired "
                "differences d = method_acc − baseline_acc"),
        Mistake("z = 2", _pi_z(2.0), f"you used a z of 2 instead of the t quantile with n − 1 degrees of freedom: "
                                     f"{_T_HINT}"),
        Mistake("z = 1.96", _pi_z(1.959963984540054),
                f"you used the normal's 1.96 instead of the t quantile with n − 1 degrees of freedom: {_T_HINT}; "
                f"with a few seeds the standard deviation is itself uncertain"),
        Mistake("n degrees of freedom", _pi_df_n,
                "you used n degrees of freedom; n paired differences have n − 1 (one is spent on their mean): "
                "stats.t_critical(n - 1)"),
        Mistake("population sd", _pi_population_sd,
                "you used the population standard deviation (÷ n); use the sample standard deviation of the "
                "differences (÷ (n − 1)), torch's default d.std()"),
        Mistake("sd, not standard error", _pi_sd_not_se,
                "your half-width uses the standard deviation of the differences; their mean varies less: divide "
                "by √n (the standard error sd / √n)"),
        Mistake("divided by n", _pi_over_n, "divide the standard deviation by √n, not by n"),
        Mistake("baseline minus method", _pi_reversed,
                "you computed baseline − method; the verdict is about method_acc − baseline_acc"),
        Mistake("high end first", _pi_high_first, "your ends are swapped: return (low, high), the lower end first"),
    ],
    parts=("values",),
))
