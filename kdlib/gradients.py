r"""Gradients of the distillation losses with respect to the student logits: autograd and analytic forms.

Every analytic function returns the gradient of the *batch-mean* loss of the same name in
:mod:`kdlib.losses`, with every factor included, so that it equals :func:`logit_gradient` exactly (tested).
Pass ``per_sample=True`` to drop the ``1/B`` of the batch mean (the gradient of one sample's own loss,
which is what the book plots against the teacher's confidence).

Temperature scaling. With :math:`p = \mathrm{softmax}(z/T)` the chain rule gives a factor :math:`1/T`,
and the losses carry :math:`T^2`, so for one sample

.. math:: \frac{\partial\, T^2\,\mathrm{KL}(p^t\|p^s)}{\partial z^s_i} = T\,(p^s_i - p^t_i).

The decomposition (book chapters DKD and AEKT), with :math:`\hat p` renormalised over the non-target classes:

* TCKD: :math:`T\,(p^s_t - p^t_t)` at the target, :math:`-T\,(p^s_t - p^t_t)\,\hat p^s_i` elsewhere;
* NCKD: :math:`T\,(\hat p^s_i - \hat p^t_i)` for :math:`i \ne t`, 0 at the target;
* KD = TCKD + :math:`(1 - p^t_t)` NCKD, so KD's implicit-knowledge weight is :math:`1 - p^t_t`, DKD's is the
  constant :math:`\beta`, and AEKT multiplies the explicit (TCKD) gradient by its stop-gradient weight r.

For a general class set K (ReKD's Top-K) the binary term's gradient is :math:`T(P^s - P^t)\hat p^s_{K,i}`
inside K and :math:`-T(P^s - P^t)\check p^s_i` outside; the inside/outside KLs give
:math:`T(\hat p^s - \hat p^t)` inside and :math:`T(\check p^s - \check p^t)` outside (0 elsewhere).
The Top-K set is treated as a constant (it is a discrete choice; autograd does the same).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses import (Scalar, _log_masses, _restricted_log_softmax, _scaled, adaptive_weight,
                          target_mask, topk_mask)

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def logit_gradient(loss_fn: LossFn, student_logits: Tensor, teacher_logits: Tensor,
                   targets: Tensor) -> Tensor:
    """Autograd gradient of ``loss_fn(student, teacher, targets)`` (a scalar) w.r.t. the student logits."""
    student = student_logits.detach().clone().requires_grad_(True)
    loss = loss_fn(student, teacher_logits.detach(), targets)
    (grad,) = torch.autograd.grad(loss, student)
    return grad


def split_target_nontarget(grad: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """``(g_target (B,), g_nontarget (B, C-1))``: the label column, and the others in class order."""
    mask = target_mask(grad, targets)
    return grad[mask], grad[~mask].reshape(grad.shape[0], grad.shape[1] - 1)


# -- helpers ------------------------------------------------------------------------------------------
def _scale(grad_u: Tensor, temperature: Scalar, per_sample: bool) -> Tensor:
    """From the gradient w.r.t. u = z/T of one sample's KL to the gradient of the loss w.r.t. z:
    times T^2 (the loss) / T (the chain rule), divided by B for the batch mean."""
    t = temperature.to(grad_u).reshape(-1, 1) if isinstance(temperature, Tensor) else temperature
    g = grad_u * t
    return g if per_sample else g / grad_u.shape[0]


def _col(value: Scalar, like: Tensor) -> Scalar:
    return value.to(like).reshape(-1, 1) if isinstance(value, Tensor) else value


def _probs(logits: Tensor, temperature: Scalar) -> Tensor:
    return F.softmax(_scaled(logits, temperature).detach(), dim=1)


def _restricted_probs(z: Tensor, keep: Tensor) -> Tensor:
    """softmax(z) renormalised over ``keep`` (0 elsewhere), from a restricted log-softmax (stable)."""
    return _restricted_log_softmax(z, keep).exp() * keep


def _set_grads_u(student_logits, teacher_logits, mask, temperature):
    """Per-sample gradients w.r.t. u = z/T of (binary, inside, outside) KLs over the set ``mask``."""
    zs = _scaled(student_logits, temperature).detach()
    zt = _scaled(teacher_logits, temperature).detach()
    mask = mask.bool()
    ps_in, pt_in = _restricted_probs(zs, mask), _restricted_probs(zt, mask)
    ps_out, pt_out = _restricted_probs(zs, ~mask), _restricted_probs(zt, ~mask)
    gap = (_log_masses(zs, mask)[0].exp() - _log_masses(zt, mask)[0].exp()).unsqueeze(1)  # P^s - P^t
    binary = gap * (ps_in - ps_out)  # +gap * p_hat inside, -gap * p_check outside (disjoint supports)
    return binary, ps_in - pt_in, ps_out - pt_out


# -- KD, DKD ------------------------------------------------------------------------------------------
def kd_grad(student_logits: Tensor, teacher_logits: Tensor, temperature: Scalar,
            per_sample: bool = False) -> Tensor:
    """Gradient of :func:`kdlib.losses.kd_loss`: ``T (p^s - p^t) / B``. T may be a (B,) tensor, which
    gives the gradient of :func:`kdlib.losses.kd_loss_per_sample_temperature` (DLKD)."""
    g = _probs(student_logits, temperature) - _probs(teacher_logits, temperature)
    return _scale(g, temperature, per_sample)


def tckd_grad(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: Scalar,
              per_sample: bool = False) -> Tensor:
    """Gradient of :func:`kdlib.losses.tckd_loss`."""
    binary, _, _ = _set_grads_u(student_logits, teacher_logits, target_mask(student_logits, targets),
                                temperature)
    return _scale(binary, temperature, per_sample)


def nckd_grad(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: Scalar,
              per_sample: bool = False) -> Tensor:
    """Gradient of :func:`kdlib.losses.nckd_loss`: ``T (p_hat^s_i - p_hat^t_i) / B``, 0 at the target."""
    _, _, outside = _set_grads_u(student_logits, teacher_logits, target_mask(student_logits, targets),
                                 temperature)
    return _scale(outside, temperature, per_sample)


def dkd_grad(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: Scalar,
             beta: Scalar, temperature: Scalar, per_sample: bool = False) -> Tensor:
    """Gradient of :func:`kdlib.losses.dkd_loss` (alpha, beta floats or (B,) tensors)."""
    binary, _, outside = _set_grads_u(student_logits, teacher_logits,
                                      target_mask(student_logits, targets), temperature)
    g = _col(alpha, binary) * binary + _col(beta, binary) * outside
    return _scale(g, temperature, per_sample)


# -- ReKD ---------------------------------------------------------------------------------------------
def set_decomposition_grads(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                            temperature: Scalar, per_sample: bool = False) -> Dict[str, Tensor]:
    """Gradients of ``T^2 * mean`` of each term of :func:`kdlib.losses.set_decomposition`:
    ``{"binary", "inside", "outside"}``."""
    parts = _set_grads_u(student_logits, teacher_logits, mask, temperature)
    return {k: _scale(g, temperature, per_sample) for k, g in zip(("binary", "inside", "outside"), parts)}


def rekd_grad(student_logits: Tensor, teacher_logits: Tensor, k: int, alpha: float, beta: float,
              temperature: float, topk_source: str = "student", include_binary_term: bool = False,
              per_sample: bool = False) -> Tensor:
    """Gradient of :func:`kdlib.losses.rekd_loss` (alpha TISD + beta NTID [+ alpha binary])."""
    mask = topk_mask(student_logits, teacher_logits, k, topk_source)
    g = set_decomposition_grads(student_logits, teacher_logits, mask, temperature, per_sample)
    total = alpha * g["inside"] + beta * g["outside"]
    return total + alpha * g["binary"] if include_binary_term else total


# -- AEKT ---------------------------------------------------------------------------------------------
def aekt_grad(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float,
              beta: float, temperature: float, weight_mode: str = "ratio", r_min: float = 0.0,
              r_max: float = 10.0, explicit: bool = True, implicit: bool = True,
              serial_weight: Tensor = None, per_sample: bool = False) -> Tensor:
    """Gradient of :func:`kdlib.losses.aekt_loss` w.r.t. the logits it is given (``z_kd``); with
    ``serial_weight`` W (z_kd = W z_cls + b, the loss evaluated at z_kd) the gradient w.r.t. z_cls,
    ``g_kd @ W``. r is a stop-gradient weight, so it only scales the TCKD gradient."""
    r = adaptive_weight(student_logits, teacher_logits, targets, temperature, weight_mode, r_min, r_max)
    binary, _, outside = _set_grads_u(student_logits, teacher_logits,
                                      target_mask(student_logits, targets), temperature)
    g = torch.zeros_like(binary)
    if explicit:
        g = g + alpha * r.reshape(-1, 1) * binary
    if implicit:
        g = g + beta * outside
    g = _scale(g, temperature, per_sample)
    return g if serial_weight is None else g @ serial_weight.to(g)


def effective_weights(teacher_logits: Tensor, targets: Tensor, temperature: float, beta: float = 8.0,
                      student_logits: Tensor = None, weight_mode: str = "ratio", r_min: float = 0.0,
                      r_max: float = 10.0) -> Dict[str, Tensor]:
    """Per-sample weights (B,) that multiply the decoupled gradients (the AEKT chapter):
    ``kd_implicit = 1 - p^t_y`` (KD's NCKD factor), ``dkd_implicit = beta``, and with ``student_logits``
    ``aekt_explicit = r`` (AEKT's TCKD factor; KD's and DKD's explicit factor is 1)."""
    pt = _probs(teacher_logits, temperature).gather(1, targets.reshape(-1, 1).long()).squeeze(1)
    out = {"kd_implicit": 1.0 - pt, "dkd_implicit": torch.full_like(pt, float(beta))}
    if student_logits is not None:
        out["aekt_explicit"] = adaptive_weight(student_logits, teacher_logits, targets, temperature,
                                               weight_mode, r_min, r_max)
    return out
