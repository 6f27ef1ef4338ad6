r"""Functional distillation losses, the equations of the book in code.

Every function takes raw logits of shape (B, C). The losses return a scalar averaged over the batch (sum
over classes, mean over samples, i.e. ``batchmean``); functions named ``*_per_sample`` or ``*_parts``
return one value per sample. Logits are upcast to at least float32 first (:func:`as_float`), so the losses
stay exact under bf16 autocast; float64 inputs stay float64, which is what ``torch.autograd.gradcheck``
needs.

Numerics: every log-probability comes from ``log_softmax`` or from a ``logsumexp`` over a boolean mask
(restricted softmaxes such as DKD's non-target distribution drop the masked columns exactly, no "-1000"
trick), so every term is finite for any finite logits, including ``1e4`` at ``T = 0.1``.

Notation: ``p = softmax(z / T)``; ``KL(a || b) = sum_i a_i log(a_i / b_i)``; teacher first, student second.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Scalar = Union[float, Tensor]  # a float, or a per-sample tensor of shape (B,)


def as_float(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32; float32 and float64 are returned unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _scaled(logits: Tensor, temperature: Scalar) -> Tensor:
    """``z / T`` in float32 (or float64); ``temperature`` may be a float or a (B,) tensor."""
    z = as_float(logits)
    if isinstance(temperature, Tensor):
        return z / temperature.to(z).reshape(-1, 1)
    return z / temperature


def _per_sample(value: Scalar, like: Tensor) -> Scalar:
    return value.to(like).reshape(-1) if isinstance(value, Tensor) else value


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """``sum_i p^t_i (log p^t_i - log p^s_i)`` per row; a zero teacher probability contributes 0."""
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


# -- KD ---------------------------------------------------------------------------------------------
def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: Scalar) -> Tensor:
    r"""Per-sample :math:`\mathrm{KL}(\sigma(z^t/T) \| \sigma(z^s/T))`, shape (B,), without :math:`T^2`.

    ``temperature`` may be a float or a (B,) tensor of per-sample temperatures.
    """
    log_p_student = F.log_softmax(_scaled(student_logits, temperature), dim=1)
    log_p_teacher = F.log_softmax(_scaled(teacher_logits, temperature), dim=1)
    return _kl_rows(log_p_teacher, log_p_student)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Hinton et al.'s distillation loss (exact: mdistiller's ``kd_loss``).

    .. math:: \mathcal{L}_{KD} = \frac{T^2}{B} \sum_b \sum_i p^t_{b,i} \log \frac{p^t_{b,i}}{p^s_{b,i}},
              \qquad p = \mathrm{softmax}(z / T)

    KL(teacher || student) of the softened distributions, summed over classes, averaged over the batch,
    multiplied by :math:`T^2` so that its gradients keep their scale when T changes.
    """
    return kl_divergence(student_logits, teacher_logits, temperature).mean() * temperature**2


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: Scalar) -> Tensor:
    r"""Per-sample :math:`T_b^2\,\mathrm{KL}_b` (B,); ``temperature`` a float or a (B,) tensor."""
    kl = kl_divergence(student_logits, teacher_logits, temperature)
    return kl * _per_sample(temperature, kl) ** 2


def kd_loss_per_sample_temperature(student_logits: Tensor, teacher_logits: Tensor,
                                   temperatures: Tensor) -> Tensor:
    r"""KD with one temperature per sample (DLKD, Energy-KD):
    :math:`\frac{1}{B}\sum_b T_b^2\,\mathrm{KL}(\sigma(z^t_b/T_b) \| \sigma(z^s_b/T_b))`."""
    return kd_per_sample(student_logits, teacher_logits, temperatures).mean()


# -- decomposition of KL over a set of classes (DKD: the target; ReKD: the Top-K) -------------------
class SetDecomposition(NamedTuple):
    r"""Per-sample terms (B,) of :math:`\mathrm{KL}(p^t\|p^s) = \mathrm{KL}(b^t\|b^s)
    + P^t\,\mathrm{KL}(\hat p^t\|\hat p^s) + (1-P^t)\,\mathrm{KL}(\check p^t\|\check p^s)`, no :math:`T^2`."""

    binary: Tensor  # KL of the two-bin distributions [P, 1 - P]
    inside: Tensor  # KL of the distributions renormalised inside the set
    outside: Tensor  # KL of the distributions renormalised outside the set
    teacher_mass: Tensor  # P^t = teacher probability of the set
    student_mass: Tensor  # P^s


def _restricted_log_softmax(z: Tensor, keep: Tensor) -> Tensor:
    """log-softmax over the columns where ``keep`` is True; 0 (never used) elsewhere. Rows need a True."""
    lse = torch.logsumexp(z.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    return (z - lse).masked_fill(~keep, 0.0)


def _restricted_kl(zt: Tensor, zs: Tensor, keep: Tensor) -> Tensor:
    log_t = _restricted_log_softmax(zt, keep)
    log_s = _restricted_log_softmax(zs, keep)
    return (log_t.exp().masked_fill(~keep, 0.0) * (log_t - log_s)).sum(dim=1)


def _log_masses(z: Tensor, mask: Tensor):
    """``(log P, log(1 - P))`` of the set ``mask`` under softmax(z), from logsumexps (no log of a sum)."""
    lse_all = torch.logsumexp(z, dim=1)
    lse_in = torch.logsumexp(z.masked_fill(~mask, float("-inf")), dim=1)
    lse_out = torch.logsumexp(z.masked_fill(mask, float("-inf")), dim=1)
    return lse_in - lse_all, lse_out - lse_all


def set_decomposition(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                      temperature: Scalar) -> SetDecomposition:
    """Split KL(teacher || student) at temperature T over the class set ``mask`` (bool, (B, C)).

    Every row of ``mask`` needs at least one True and one False. Exact identity (tested):
    ``KL = binary + teacher_mass * inside + (1 - teacher_mass) * outside``.
    """
    zs, zt = _scaled(student_logits, temperature), _scaled(teacher_logits, temperature)
    mask = mask.bool()
    log_in_t, log_out_t = _log_masses(zt, mask)
    log_in_s, log_out_s = _log_masses(zs, mask)
    binary = log_in_t.exp() * (log_in_t - log_in_s) + log_out_t.exp() * (log_out_t - log_out_s)
    return SetDecomposition(
        binary=binary,
        inside=_restricted_kl(zt, zs, mask),
        outside=_restricted_kl(zt, zs, ~mask),
        teacher_mass=log_in_t.exp(),
        student_mass=log_in_s.exp(),
    )


def target_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Boolean (B, C) mask, True at each sample's label."""
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(1, targets.reshape(-1, 1).long(), True)


# -- DKD --------------------------------------------------------------------------------------------
class DKDParts(NamedTuple):
    """Per-sample (B,) TCKD and NCKD (no :math:`T^2`) and the target probabilities at temperature T."""

    tckd: Tensor
    nckd: Tensor
    teacher_target_prob: Tensor
    student_target_prob: Tensor


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: Scalar) -> DKDParts:
    r"""TCKD = KL([p^t_t, 1-p^t_t] || [p^s_t, 1-p^s_t]); NCKD = KL(\hat p^t || \hat p^s) over the C-1
    non-target classes. Identity: ``KL = tckd + (1 - teacher_target_prob) * nckd``."""
    d = set_decomposition(student_logits, teacher_logits, target_mask(student_logits, targets),
                          temperature)
    return DKDParts(d.binary, d.outside, d.teacher_mass, d.student_mass)


def tckd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: float) -> Tensor:
    r""":math:`T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}(b^t_b \| b^s_b)` (DKD's target-class term)."""
    return dkd_parts(student_logits, teacher_logits, targets, temperature).tckd.mean() * temperature**2


def nckd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: float) -> Tensor:
    r""":math:`T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}(\hat p^t_b \| \hat p^s_b)` (DKD's non-target term)."""
    return dkd_parts(student_logits, teacher_logits, targets, temperature).nckd.mean() * temperature**2


def dkd_loss_per_sample(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                        alpha: Scalar, beta: Scalar, temperature: Scalar) -> Tensor:
    """Per-sample ``T^2 (alpha * TCKD_b + beta * NCKD_b)``; alpha, beta, T floats or (B,) tensors."""
    parts = dkd_parts(student_logits, teacher_logits, targets, temperature)
    a, b = _per_sample(alpha, parts.tckd), _per_sample(beta, parts.tckd)
    return (a * parts.tckd + b * parts.nckd) * _per_sample(temperature, parts.tckd) ** 2


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
             alpha: Scalar, beta: Scalar, temperature: float) -> Tensor:
    r"""Decoupled KD (Zhao et al., CVPR 2022); equal to mdistiller's ``dkd_loss`` (no warm-up, no CE).

    .. math:: \mathcal{L}_{DKD} = \frac{T^2}{B}\sum_b \Big(\alpha\,\mathrm{KL}(b^t_b\|b^s_b)
              + \beta\,\mathrm{KL}(\hat p^t_b\|\hat p^s_b)\Big)

    ``alpha``/``beta`` may be (B,) tensors (e.g. ``beta = 1 - p^t_t`` gives back KD exactly).
    """
    return dkd_loss_per_sample(student_logits, teacher_logits, targets, alpha, beta, temperature).mean()


# -- ReKD (Top-K / non-Top-K) ------------------------------------------------------------------------
TOPK_SOURCES = ("student", "teacher")


def topk_mask(student_logits: Tensor, teacher_logits: Tensor, k: int, topk_source: str = "student"):
    """Boolean (B, C) mask of each sample's K largest logits of the student or of the teacher."""
    source = {"student": student_logits, "teacher": teacher_logits}[topk_source]
    index = as_float(source).detach().topk(int(k), dim=1).indices
    mask = torch.zeros(source.shape, dtype=torch.bool, device=source.device)
    return mask.scatter_(1, index, True)


def topk_decomposition(student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: Scalar,
                       topk_source: str = "student") -> SetDecomposition:
    """:func:`set_decomposition` over the Top-K set (``inside`` = TISD, ``outside`` = NTID)."""
    mask = topk_mask(student_logits, teacher_logits, k, topk_source)
    return set_decomposition(student_logits, teacher_logits, mask, temperature)


def rekd_terms(student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: float,
               topk_source: str = "student") -> dict:
    """Unweighted batch-mean terms ``{"tisd", "ntid", "binary"}``, each times :math:`T^2`."""
    d = topk_decomposition(student_logits, teacher_logits, k, temperature, topk_source)
    t2 = temperature**2
    return {"tisd": d.inside.mean() * t2, "ntid": d.outside.mean() * t2, "binary": d.binary.mean() * t2}


def rekd_loss(student_logits: Tensor, teacher_logits: Tensor, k: int, alpha: float, beta: float,
              temperature: float, topk_source: str = "student",
              include_binary_term: bool = False) -> Tensor:
    r"""ReKD [RECON from code of uncertain provenance]:
    :math:`T^2\,[\alpha\,\mathrm{TISD} + \beta\,\mathrm{NTID}\,(+\,\alpha\,\mathrm{KL}(b^t_K\|b^s_K))]`.

    The optional binary Top-K-vs-rest term shares ``alpha`` with TISD, so K = 1 with the label as the
    Top-1 gives DKD(alpha, beta) exactly.
    """
    terms = rekd_terms(student_logits, teacher_logits, k, temperature, topk_source)
    loss = alpha * terms["tisd"] + beta * terms["ntid"]
    return loss + alpha * terms["binary"] if include_binary_term else loss


# -- CLKD (instance, class and class-correlation terms on raw logits) ------------------------------
CLKD_NORMALIZATIONS = ("element_mean", "vector_sum")
CORRELATIONS = ("cov", "gram", "sample")


def nmse(student: Tensor, teacher: Tensor, normalization: str = "element_mean") -> Tensor:
    """Squared distance of the L2-normalised rows: element mean ("element_mean", the re-implementations'
    ``F.mse_loss``) or sum over each row then mean over rows ("vector_sum" = element_mean x columns)."""
    diff = F.normalize(as_float(student), dim=1) - F.normalize(as_float(teacher), dim=1)
    sq = diff.pow(2)
    return sq.mean() if normalization == "element_mean" else sq.sum(dim=1).mean()


def clkd_instance_loss(student_logits: Tensor, teacher_logits: Tensor,
                       normalization: str = "element_mean") -> Tensor:
    r""":math:`L_{ins} = \frac{1}{B}\sum_b \| z^s_b/\|z^s_b\| - z^t_b/\|z^t_b\| \|^2`
    (divided further by C with ``normalization="element_mean"``)."""
    return nmse(student_logits, teacher_logits, normalization)


def clkd_class_loss(student_logits: Tensor, teacher_logits: Tensor,
                    normalization: str = "element_mean") -> Tensor:
    r""":math:`L_{cla} = \frac{1}{C}\sum_c \| \hat z^s_c/\|\hat z^s_c\| - \hat z^t_c/\|\hat z^t_c\| \|^2`,
    :math:`\hat z_c \in \mathbb{R}^B` the batch's logits of class c (divided further by B with
    ``"element_mean"``). A batch statistic."""
    return nmse(as_float(student_logits).t(), as_float(teacher_logits).t(), normalization)


def class_correlation_matrix(logits: Tensor, corr: str = "cov") -> Tensor:
    """``cov``: C x C class covariance over the batch (unbiased, B - 1 clamped to >= 1); ``gram``: C x C
    uncentred ``Z^T Z``; ``sample``: B x B covariance between samples across classes (divided by C - 1)."""
    z = as_float(logits)
    if corr == "cov":
        zc = z - z.mean(dim=0, keepdim=True)
        return zc.t() @ zc / max(z.shape[0] - 1, 1)
    if corr == "gram":
        return z.t() @ z
    zc = z - z.mean(dim=1, keepdim=True)
    return zc @ zc.t() / max(z.shape[1] - 1, 1)


def class_correlation_loss(student_logits: Tensor, teacher_logits: Tensor, corr: str = "cov") -> Tensor:
    r"""Class correlation loss. ``cov`` (default):
    :math:`L_{cc} = \frac{1}{C^2}\|M^s - M^t\|_F^2` with M the class covariance over the batch;
    ``gram``: NMSE (element mean) of the Gram matrices divided by :math:`C^2` (re-implementation (c));
    ``sample``: :math:`\frac{1}{B^2}\|M^s - M^t\|_F^2` of the B x B sample covariances."""
    m_s, m_t = class_correlation_matrix(student_logits, corr), class_correlation_matrix(teacher_logits, corr)
    if corr == "gram":
        return nmse(m_s, m_t, "element_mean") / m_s.shape[0] ** 2
    return (m_s - m_t).pow(2).mean()


# -- AEKT (explicit = target confidence with an adaptive weight, implicit = NCKD) -----------------
WEIGHT_MODES = ("ratio", "inv_student", "none")


def adaptive_weight(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
                    mode: str = "ratio", r_min: float = 0.0, r_max: float = 10.0) -> Tensor:
    r"""AEKT's stop-gradient weight (B,) [RECON]: ``ratio`` :math:`r = \mathrm{clip}(p^t_t/p^s_t,
    r_{min}, r_{max})`, ``inv_student`` :math:`\mathrm{clip}(1/p^s_t, \dots)`, ``none`` 1; probabilities
    at temperature T, ratio taken in log space (no division by an underflowed probability)."""
    zs = _scaled(student_logits, temperature).detach()
    if mode == "none":
        return torch.ones(zs.shape[0], dtype=zs.dtype, device=zs.device)
    y = targets.reshape(-1, 1).long()
    log_ps = F.log_softmax(zs, dim=1).gather(1, y).squeeze(1)
    log_pt = (F.log_softmax(_scaled(teacher_logits, temperature).detach(), dim=1).gather(1, y).squeeze(1)
              if mode == "ratio" else torch.zeros_like(log_ps))
    return (log_pt - log_ps).exp().clamp(min=r_min, max=r_max)


def aekt_explicit_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                       temperature: float, weight: Scalar = 1.0) -> Tensor:
    r"""Explicit knowledge: :math:`\frac{T^2}{B}\sum_b r_b\,\mathrm{KL}(b^t_b\|b^s_b)` (weighted TCKD)."""
    tckd = dkd_parts(student_logits, teacher_logits, targets, temperature).tckd
    return (_per_sample(weight, tckd) * tckd).mean() * temperature**2


def aekt_implicit_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                       temperature: float) -> Tensor:
    """Implicit (dark) knowledge: DKD's NCKD, :math:`T^2` times the batch mean."""
    return nckd_loss(student_logits, teacher_logits, targets, temperature)


def aekt_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, beta: float,
              temperature: float, weight_mode: str = "ratio", r_min: float = 0.0, r_max: float = 10.0,
              explicit: bool = True, implicit: bool = True) -> Tensor:
    r""":math:`\frac{T^2}{B}\sum_b(\alpha\,r_b\,\mathrm{TCKD}_b + \beta\,\mathrm{NCKD}_b)` on the logits
    given (AEKT distils the serial layer's output :math:`z_{kd}`); no warm-up, no CE."""
    parts = dkd_parts(student_logits, teacher_logits, targets, temperature)
    r = adaptive_weight(student_logits, teacher_logits, targets, temperature, weight_mode, r_min, r_max)
    per_sample = torch.zeros_like(parts.tckd)
    if explicit:
        per_sample = per_sample + alpha * r * parts.tckd
    if implicit:
        per_sample = per_sample + beta * parts.nckd
    return per_sample.mean() * temperature**2


# -- DLKD difficulty -------------------------------------------------------------------------------
def prediction_difficulty(teacher_logits: Tensor, pruned_logits: Tensor, tau: float = 1.0) -> Tensor:
    r"""DLKD's per-sample difficulty [RECON]:
    :math:`d_b = \|\sigma(z^t_b/\tau) - \sigma(z^{tp}_b/\tau)\|_2`."""
    p = F.softmax(_scaled(teacher_logits, tau), dim=1)
    q = F.softmax(_scaled(pruned_logits, tau), dim=1)
    return (p - q).norm(dim=1)


# -- logit standardisation (Sun et al., CVPR 2024) -------------------------------------------------
LS_EPS = 1e-7


def standardize(logits: Tensor) -> Tensor:
    r"""Per-sample z-score of the logits, :math:`(z - \bar z) / (\mathrm{std}(z) + 10^{-7})`.

    The LS authors' code uses the unbiased std (divide by C - 1) plus an absolute 1e-7 (the paper writes
    the population std). The temperature is applied afterwards by the caller."""
    z = as_float(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + LS_EPS)


def maybe_standardize(student_logits: Tensor, teacher_logits: Tensor, enabled: bool):
    """Both logit tensors z-scored when ``enabled`` (for the KD-type terms; CE stays on raw logits)."""
    if not enabled:
        return student_logits, teacher_logits
    return standardize(student_logits), standardize(teacher_logits)


# -- DIST (Huang et al., NeurIPS 2022) ---------------------------------------------------------------
DIST_EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = DIST_EPS) -> Tensor:
    r"""Row-wise Pearson correlation (B,): cosine similarity of the mean-centred rows, with the DIST
    authors' absolute eps added to the product of the norms, :math:`\frac{a_c\cdot b_c}{\|a_c\|\|b_c\|+\epsilon}`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, temperature: float):
    r"""DIST's ``(inter, intra)``, each times :math:`\tau^2`, with :math:`Y = \mathrm{softmax}(z/\tau)`:
    inter :math:`= 1 - \frac{1}{B}\sum_b \rho(Y^s_{b,:}, Y^t_{b,:})` (per sample, across classes),
    intra :math:`= 1 - \frac{1}{C}\sum_c \rho(Y^s_{:,c}, Y^t_{:,c})` (per class, across the batch: a batch
    statistic)."""
    ys = F.softmax(_scaled(student_logits, temperature), dim=1)
    yt = F.softmax(_scaled(teacher_logits, temperature), dim=1)
    t2 = temperature**2
    inter = 1.0 - pearson_rows(ys, yt).mean()
    intra = 1.0 - pearson_rows(ys.t(), yt.t()).mean()
    return inter * t2, intra * t2


# -- NKD (Yang et al., ICCV 2023) --------------------------------------------------------------------
def nkd_terms(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float):
    r"""NKD's ``(target, non_target)`` batch means, as the authors' code computes them:
    target :math:`= -\frac{1}{B}\sum_b \mathrm{sg}(p^t_{b,y})\,\log p^s_{b,y}` at T = 1;
    non_target :math:`= -\frac{T^2}{B}\sum_b\sum_{i\ne y} \hat p^t_{b,i}\log \hat p^s_{b,i}` with
    :math:`\hat p` the softmax of the C - 1 non-target logits at T (a cross-entropy: its value includes
    the teacher's entropy, its gradient is the KL's). Gamma is applied by the caller."""
    zs, zt = as_float(student_logits), as_float(teacher_logits)
    y = targets.reshape(-1, 1).long()
    log_ps = F.log_softmax(zs, dim=1).gather(1, y).squeeze(1)
    pt = F.softmax(zt, dim=1).gather(1, y).squeeze(1).detach()
    target = -(pt * log_ps).mean()
    keep = ~target_mask(zs, targets)
    log_hat_s = _restricted_log_softmax(zs / temperature, keep)
    hat_t = _restricted_log_softmax(zt / temperature, keep).exp().masked_fill(~keep, 0.0)
    non_target = -(hat_t * log_hat_s).sum(dim=1).mean() * temperature**2
    return target, non_target


# -- CTKD (Li et al., AAAI 2023) ------------------------------------------------------------------
class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``coefficient`` (CTKD's gradient reversal
    layer: the coefficient runs from 0 to -1, so the temperature ascends the loss)."""

    @staticmethod
    def forward(ctx, x, coefficient):
        ctx.save_for_backward(coefficient)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (coefficient,) = ctx.saved_tensors
        return grad * coefficient.to(grad), None


def scale_gradient(x: Tensor, coefficient: Tensor) -> Tensor:
    """``x`` unchanged; its gradient times ``coefficient`` (a 0-dim tensor, read at backward time)."""
    return _ScaleGradient.apply(x, coefficient)


def ctkd_reversal(epoch: int, ramp_epochs: int) -> float:
    r"""CTKD's gradient-reversal coefficient for epoch e (from 1): the authors' cosine schedule from 0
    to -1, :math:`\lambda_e = -\frac{1}{2}\big(1 - \cos(\pi\,\min(e, E)/E)\big)` (-1 when E = 0)."""
    if ramp_epochs <= 0:
        return -1.0
    e = min(max(epoch, 0), ramp_epochs)
    return -0.5 * (1.0 - math.cos(math.pi * e / ramp_epochs))


# -- MLKD (Jin et al., CVPR 2023) -----------------------------------------------------------------
def mlkd_class_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Class level: :math:`\|G^t - G^s\|_F^2 / C` with :math:`G = P^\top P` (C x C), P = softmax(z/T)."""
    ps = F.softmax(_scaled(student_logits, temperature), dim=1)
    pt = F.softmax(_scaled(teacher_logits, temperature), dim=1)
    return (pt.t() @ pt - ps.t() @ ps).pow(2).sum() / ps.shape[1]


def mlkd_batch_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Batch level: :math:`\|G^t - G^s\|_F^2 / B` with :math:`G = P P^\top` (B x B), P = softmax(z/T)."""
    ps = F.softmax(_scaled(student_logits, temperature), dim=1)
    pt = F.softmax(_scaled(teacher_logits, temperature), dim=1)
    return (pt @ pt.t() - ps @ ps.t()).pow(2).sum() / ps.shape[0]


def below_median_fraction(values: Tensor) -> Tensor:
    """Fraction of ``values`` <= their median (numpy's linearly interpolated 50th percentile): what
    MLKD's confidence masks amount to once multiplied onto an already averaged loss."""
    v = as_float(values.detach()).reshape(-1)
    return (v <= torch.quantile(v, 0.5)).to(v.dtype).mean()


# -- CLKD, the StreamLined re-implementation's correlation term --------------------------------------
def streamlined_correlation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r""":math:`\frac{1}{C^2}\|M^s - M^t\|_F` (Frobenius norm, **not** squared) with
    :math:`M = \frac{1}{C-1} Z_c^\top Z_c` (C x C), :math:`Z_c` the batch-centred logits; divided by
    C - 1 (classes), as in the HyunJunSik/StreamLined re-implementation."""
    zs, zt = as_float(student_logits), as_float(teacher_logits)
    c = zs.shape[1]
    ds, dt = zs - zs.mean(dim=0, keepdim=True), zt - zt.mean(dim=0, keepdim=True)
    diff = (ds.t() @ ds - dt.t() @ dt) / max(c - 1, 1)
    return torch.linalg.matrix_norm(diff) / c**2
