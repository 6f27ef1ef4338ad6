"""Exercises of the logit-family chapter: logit standardisation and DIST's intra-class term."""
from __future__ import annotations

import torch.nn.functional as F

from kdlib import losses
from kdlib.exercises.core import Case, Exercise, Mistake, logit_cases, register


def _ls_population(logits):
    z = logits
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True, correction=0) + losses.LS_EPS)


def _ls_batch(logits):
    z = logits
    return (z - z.mean(0, keepdim=True)) / (z.std(0, keepdim=True) + losses.LS_EPS)


def _ls_not_centred(logits):
    return logits / (logits.std(1, keepdim=True) + losses.LS_EPS)


register(Exercise(
    name="standardize", chapter="logit_family", title="Logit standardisation",
    practises="a per-sample z-score of the logits (the LS authors' unbiased standard deviation)",
    args=("logits",),
    reference=lambda logits: losses.standardize(logits),
    reference_name="kdlib.losses.standardize",
    cases=lambda seed: [Case({"logits": c.inputs["student_logits"] * 3 + 1.5}, c.B, c.C, 1.0)
                        for c in logit_cases(seed, targets=False)],
    what="standardised logits", wrt="logits", scalar=False,
    mistakes=[
        Mistake("population std", _ls_population,
                "you divided by the population standard deviation (÷ C); the LS authors' code uses the unbiased "
                "one (÷ (C − 1)), torch's default z.std(dim=1)"),
        Mistake("over the batch", _ls_batch,
                "you standardised each class over the batch (dim=0); standardise each sample over its classes "
                "(dim=1, keepdim=True)"),
        Mistake("not centred", _ls_not_centred,
                "subtract each sample's mean logit before dividing by the standard deviation"),
    ],
    parts=("values", "gradients"),
))


def _pearson(a, b, dim):
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + losses.DIST_EPS)


def _dist_inter(student_logits, teacher_logits, temperature):
    ys, yt = F.softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1)
    return (1 - _pearson(ys, yt, 1).mean()) * temperature**2


def _dist_cosine(student_logits, teacher_logits, temperature):
    ys, yt = F.softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1)
    return (1 - F.cosine_similarity(ys, yt, dim=0).mean()) * temperature**2


register(Exercise(
    name="dist_intra", chapter="logit_family", title="DIST's intra-class relation",
    practises="a Pearson correlation per class across the batch, the other axis of DIST's inter-class term",
    args=("student_logits", "teacher_logits", "temperature"),
    reference=lambda student_logits, teacher_logits, temperature: losses.dist_terms(
        student_logits, teacher_logits, temperature)[1],
    reference_name="kdlib.losses.dist_terms(...)[1] (intra)",
    cases=lambda seed: logit_cases(seed, targets=False),
    mistakes=[
        Mistake("inter instead of intra", _dist_inter,
                "you correlated each sample's row across the classes (DIST's inter-class term); the intra-class "
                "term correlates each class's column across the batch (dim=0)"),
        Mistake("cosine, not Pearson", _dist_cosine,
                "a Pearson correlation centres each column first (subtract its mean over the batch); the cosine "
                "similarity does not"),
    ],
    factor_hints={"1/T²": "multiply by τ² (DIST's terms carry the temperature squared)",
                  "1/T": "multiply by τ², not by τ", "C": "average over the classes, not sum"},
))
