"""Exercises of the CWKD chapter: the class-wise weighting rule."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from kdlib import losses
from kdlib.exercises.core import Case, Exercise, Mistake, logit_cases, register


def _cwkd_reference(student_logits, teacher_logits, targets, hard_classes, gamma, temperature):
    """The CWKD method's own KD term (``loss_kd`` with kd_weight 1), its hard set made by its own hooks:
    one pass in which the hard classes are always misclassified and the others always right."""
    from kdlib.methods import StepContext
    from kdlib.methods.cwkd import CWKD

    c = student_logits.shape[1]
    hard = torch.as_tensor(hard_classes, dtype=torch.long)
    method = CWKD(temperature=temperature, ce_weight=0.0, kd_weight=1.0, gamma_h=gamma,
                   num_hard=len(hard))
    labels = torch.arange(c)
    wrong = torch.zeros(c, dtype=torch.bool)
    wrong[hard] = True
    seen_logits = F.one_hot(torch.where(wrong, (labels + 1) % c, labels), c).to(student_logits.dtype)
    step = StepContext(epoch=1, step=0, steps_per_epoch=1, epochs=2)
    method(seen_logits, seen_logits, labels, step)
    method.end_epoch(1)
    step = StepContext(epoch=2, step=0, steps_per_epoch=1, epochs=2)
    return method(student_logits, teacher_logits, targets, step)["loss_kd"]


def _cwkd_cases(seed: int) -> List[Case]:
    cases = logit_cases(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for case, gamma in zip(cases, (1.0, 2.0, 0.5, 3.0)):
        hard = torch.randperm(case.C, generator=gen)[:max(1, case.C // 5)]
        hard[0] = case.inputs["targets"][0]  # at least one sample of a hard class in every batch
        case.inputs = {"student_logits": case.inputs["student_logits"],
                       "teacher_logits": case.inputs["teacher_logits"], "targets": case.inputs["targets"],
                       "hard_classes": sorted({int(v) for v in hard}), "gamma": gamma, "temperature": case.T}
    return cases


def _cwkd_term(student_logits, teacher_logits, temperature, w):
    return (w * losses.kd_per_sample(student_logits, teacher_logits, temperature)).mean()


def _cwkd_unnormalised(student_logits, teacher_logits, targets, hard_classes, gamma, temperature):
    w = 1.0 + gamma * torch.isin(targets, torch.tensor(hard_classes)).float()
    return _cwkd_term(student_logits, teacher_logits, temperature, w)


def _cwkd_gamma_only(student_logits, teacher_logits, targets, hard_classes, gamma, temperature):
    w = torch.where(torch.isin(targets, torch.tensor(hard_classes)), gamma, 1.0)
    return _cwkd_term(student_logits, teacher_logits, temperature, w / w.mean())


def _cwkd_by_prediction(student_logits, teacher_logits, targets, hard_classes, gamma, temperature):
    w = 1.0 + gamma * torch.isin(student_logits.argmax(1), torch.tensor(hard_classes)).float()
    return _cwkd_term(student_logits, teacher_logits, temperature, w / w.mean())


register(Exercise(
    name="cwkd_kd_term", chapter="cwkd", title="CWKD's class-wise weights",
    practises="a per-class weighting rule: more weight on the samples of hard classes, normalised to mean 1",
    args=("student_logits", "teacher_logits", "targets", "hard_classes", "gamma", "temperature"),
    reference=_cwkd_reference, reference_name="the KD term of kdlib's CWKD method (kdlib.methods.cwkd)",
    cases=_cwkd_cases,
    mistakes=[
        Mistake("not normalised", _cwkd_unnormalised,
                "your weights are not divided by their batch mean: CWKD normalises w_n = 1 + γ[y_n ∈ H] so "
                "that they average 1 over the batch and the total KD weight stays that of KD"),
        Mistake("gamma instead of 1 + gamma", _cwkd_gamma_only,
                "a hard class's sample gets 1 + γ before the normalisation, not γ (γ = 0 must give KD back)"),
        Mistake("hard by prediction", _cwkd_by_prediction,
                "you looked up the student's predicted class; the weight follows each sample's label y_n"),
    ],
    factor_hints={"1/T²": "use losses.kd_per_sample, which includes T², or multiply by T²",
                  "T²": "losses.kd_per_sample already includes T²: do not multiply again",
                  "B": "you summed over the batch: average over it"},
))
