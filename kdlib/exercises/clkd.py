"""Exercises of the CLKD chapter: the instance and class terms."""
from __future__ import annotations

import torch.nn.functional as F

from kdlib import losses
from kdlib.exercises.core import Case, Exercise, Mistake, logit_cases, register


def _clkd_ins_mse(student_logits, teacher_logits):
    return F.mse_loss(F.normalize(student_logits, dim=1), F.normalize(teacher_logits, dim=1))


def _clkd_ins_unnormalised(student_logits, teacher_logits):
    return (student_logits - teacher_logits).pow(2).sum(1).mean()


def _clkd_ins_columns(student_logits, teacher_logits):
    return (F.normalize(student_logits, dim=0) - F.normalize(teacher_logits, dim=0)).pow(2).sum(1).mean()


register(Exercise(
    name="clkd_instance_loss", chapter="clkd", title="CLKD's instance term",
    practises="L2-normalised logit vectors compared sample by sample (no softmax, no temperature)",
    args=("student_logits", "teacher_logits"),
    reference=lambda student_logits, teacher_logits: losses.clkd_instance_loss(
        student_logits, teacher_logits, "vector_sum"),
    reference_name="kdlib.losses.clkd_instance_loss (the chapter's equation, normalization='vector_sum')",
    cases=lambda seed: [Case({k: v for k, v in c.inputs.items() if k != "temperature"}, c.B, c.C, 1.0)
                        for c in logit_cases(seed, targets=False)],
    mistakes=[
        Mistake("element mean", _clkd_ins_mse,
                "F.mse_loss averages over the classes too, which divides L_ins by C: the equation sums the "
                "squared differences of each sample's vector and averages over the samples"),
        Mistake("not normalised", _clkd_ins_unnormalised,
                "the logit vectors must be L2-normalised first (F.normalize(z, dim=1)): L_ins compares "
                "directions, not sizes"),
        Mistake("normalised over the batch", _clkd_ins_columns,
                "you normalised each class's column (dim=0); L_ins normalises each sample's row (dim=1)"),
    ],
    factor_hints={"1/C": "you averaged over the classes too: sum over each row, average over the rows",
                  "B": "you summed over the batch: average over the samples",
                  "1/(BC)": "you averaged over every element: sum over each row, average over the rows"},
    parts=("values", "gradients"),
))


def _clkd_cla_rows(student_logits, teacher_logits):
    return (F.normalize(student_logits, dim=1) - F.normalize(teacher_logits, dim=1)).pow(2).sum(1).mean()


def _clkd_cla_mse(student_logits, teacher_logits):
    return F.mse_loss(F.normalize(student_logits, dim=0), F.normalize(teacher_logits, dim=0))


register(Exercise(
    name="clkd_class_loss", chapter="clkd", title="CLKD's class term",
    practises="the same comparison on the other axis: each class's logits across the batch (a batch statistic)",
    args=("student_logits", "teacher_logits"),
    reference=lambda student_logits, teacher_logits: losses.clkd_class_loss(
        student_logits, teacher_logits, "vector_sum"),
    reference_name="kdlib.losses.clkd_class_loss (the chapter's equation, normalization='vector_sum')",
    cases=lambda seed: [Case({k: v for k, v in c.inputs.items() if k != "temperature"}, c.B, c.C, 1.0)
                        for c in logit_cases(seed, targets=False)],
    mistakes=[
        Mistake("rows instead of columns", _clkd_cla_rows,
                "you normalised and compared each sample's row (that is L_ins): L_cla takes each class's "
                "column, the class's logits across the batch (normalise with dim=0, sum over the batch, "
                "average over the classes)"),
        Mistake("element mean", _clkd_cla_mse,
                "F.mse_loss averages over the batch too, which divides L_cla by B: sum the squared differences "
                "of each class's column and average over the classes"),
    ],
    factor_hints={"1/B": "you averaged over the batch too: sum over each column, average over the columns",
                  "C": "you summed over the classes: average over them",
                  "1/(BC)": "you averaged over every element: sum over each column, average over the columns"},
    parts=("values", "gradients"),
))
