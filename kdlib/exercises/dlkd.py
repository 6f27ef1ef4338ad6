"""Exercises of the DLKD chapter: temperature levels and per-sample temperatures."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from kdlib import losses
from kdlib.exercises.core import Case, Exercise, Mistake, kl_rows, log_soft, logit_cases, register


def _dlkd_temps_reference(difficulty):
    from kdlib.methods.dlkd import difficulty_to_temperature

    return difficulty_to_temperature(difficulty)[0]


def _dlkd_cases(seed: int) -> List[Case]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n in (10, 37, 200, 8):  # no quantile falls exactly on an image (q (n - 1) not whole)
        d = torch.rand(n, generator=gen) ** 2 * 0.1  # skewed, like real difficulties
        cases.append(Case({"difficulty": d}, n, 1, 1.0))
    return cases


def _dlkd_inverse(difficulty):
    t = _dlkd_temps_reference(difficulty)
    return 8.0 - t  # 2 <-> 6


def _dlkd_sorted_index(difficulty):
    n = difficulty.numel()
    order = difficulty.sort().values
    lo, hi = order[int(0.2 * n)], order[int(0.8 * n)]
    return torch.where(difficulty < lo, 2.0, torch.where(difficulty > hi, 6.0, 4.0))


def _dlkd_groups(case: Case) -> Dict[str, Tensor]:
    d = case.inputs["difficulty"]
    lo, hi = torch.quantile(d, torch.tensor([0.2, 0.8])).tolist()
    return {"the easiest images (below the 20 % quantile)": d < lo,
            "the hardest images (above the 80 % quantile)": d > hi,
            "the images in between": (d >= lo) & (d <= hi)}


register(Exercise(
    name="dlkd_temperatures", chapter="dlkd", title="DLKD's temperature levels",
    practises="a rule from a difficulty score to a temperature: quantiles, three levels, the direction",
    args=("difficulty",),
    reference=_dlkd_temps_reference,
    reference_name="kdlib.methods.dlkd.difficulty_to_temperature (mode 'levels', 2 / 4 / 6, q = 0.2)",
    cases=_dlkd_cases, what="temperatures", wrt=None, scalar=False, groups=_dlkd_groups,
    mistakes=[
        Mistake("inverse direction", _dlkd_inverse,
                "your direction is inverted: the hard images (large difficulty) get the high temperature T = 6 "
                "and the easy ones T = 2"),
        Mistake("quantile by index", _dlkd_sorted_index,
                "your cut-offs are sorted values at an index; the quantiles interpolate linearly between the "
                "two nearest values (torch.quantile(d, 0.2), as numpy's default)"),
    ],
    parts=("values",),
))


def _dlkd_mean_t(student_logits, teacher_logits, temperatures):
    t = temperatures[:, None]
    kl = kl_rows(log_soft(teacher_logits, t).exp(), log_soft(teacher_logits, t), log_soft(student_logits, t))
    return kl.mean() * temperatures.mean() ** 2


def _dlkd_no_t2(student_logits, teacher_logits, temperatures):
    return losses.kl_divergence(student_logits, teacher_logits, temperatures).mean()


def _dlkd_kd_cases(seed: int) -> List[Case]:
    cases = logit_cases(seed, targets=False)
    gen = torch.Generator().manual_seed(seed + 2)
    for case in cases:
        temps = torch.tensor([2.0, 4.0, 6.0])[torch.randint(0, 3, (case.B,), generator=gen)]
        case.inputs = {"student_logits": case.inputs["student_logits"],
                       "teacher_logits": case.inputs["teacher_logits"], "temperatures": temps}
        case.T = float(temps.mean())
    return cases


register(Exercise(
    name="dlkd_kd_loss", chapter="dlkd", title="KD with one temperature per sample",
    practises="broadcasting a per-sample temperature (B, 1) over the classes, and T_n² per sample",
    args=("student_logits", "teacher_logits", "temperatures"),
    reference=lambda student_logits, teacher_logits, temperatures: losses.kd_loss_per_sample_temperature(
        student_logits, teacher_logits, temperatures),
    reference_name="kdlib.losses.kd_loss_per_sample_temperature",
    cases=_dlkd_kd_cases,
    mistakes=[
        Mistake("square of the mean temperature", _dlkd_mean_t,
                "you multiplied by the square of the mean temperature: each sample's KL gets its own T_n², "
                "(temperatures**2 * kl).mean()"),
        Mistake("no T_n²", _dlkd_no_t2,
                "multiply each sample's KL divergence by its own T_n² before averaging"),
    ],
    factor_hints={"B": "you summed over the batch: average over it"},
    parts=("values", "gradients"),
))
