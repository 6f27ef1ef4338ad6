"""Analytic gradients w.r.t. the student logits against autograd, and gradcheck of every loss."""
import numpy as np
import pytest
import torch

from kdlib import gradients as G
from kdlib import losses as L

B, C = 8, 7


def logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g, dtype=torch.float64) * scale


def labels(seed):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


S, T_, Y = logits(0), logits(1), labels(0)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def autograd(fn):
    return G.logit_gradient(fn, S, T_, Y)


@pytest.mark.parametrize("temp", [1.0, 4.0, 0.7])
def test_kd_grad_is_T_times_prob_gap_over_B(temp):
    ps = np.exp(S.numpy() / temp)
    ps /= ps.sum(1, keepdims=True)
    pt = np.exp(T_.numpy() / temp)
    pt /= pt.sum(1, keepdims=True)
    np.testing.assert_allclose(G.kd_grad(S, T_, temp).numpy(), temp * (ps - pt) / B, rtol=1e-12)
    close(G.kd_grad(S, T_, temp), autograd(lambda s, t, y: L.kd_loss(s, t, temp)))
    close(G.kd_grad(S, T_, temp, per_sample=True), B * G.kd_grad(S, T_, temp))


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_decoupled_grads_match_autograd(temp):
    close(G.tckd_grad(S, T_, Y, temp), autograd(lambda s, t, y: L.tckd_loss(s, t, y, temp)))
    close(G.nckd_grad(S, T_, Y, temp), autograd(lambda s, t, y: L.nckd_loss(s, t, y, temp)))
    close(G.dkd_grad(S, T_, Y, 1.0, 8.0, temp), autograd(lambda s, t, y: L.dkd_loss(s, t, y, 1.0, 8.0, temp)))
    beta = torch.linspace(0.5, 3.0, B, dtype=torch.float64)
    close(G.dkd_grad(S, T_, Y, 2.0, beta, temp),
          autograd(lambda s, t, y: L.dkd_loss(s, t, y, 2.0, beta, temp)))


def test_nckd_grad_vanishes_on_target_and_kd_splits():
    g_target, g_rest = G.split_target_nontarget(G.nckd_grad(S, T_, Y, 4.0), Y)
    assert g_rest.shape == (B, C - 1)
    close(g_target, torch.zeros(B, dtype=torch.float64))
    full = G.kd_grad(S, T_, 4.0)
    target, rest = G.split_target_nontarget(full, Y)
    close(target, full[torch.arange(B), Y])
    w = G.effective_weights(T_, Y, 4.0, beta=8.0)
    # KD = TCKD + (1 - p^t_t) NCKD on the gradients, per sample
    close(full, G.tckd_grad(S, T_, Y, 4.0) + w["kd_implicit"].unsqueeze(1) * G.nckd_grad(S, T_, Y, 4.0))
    close(G.dkd_grad(S, T_, Y, 1.0, w["kd_implicit"], 4.0), full)
    close(w["dkd_implicit"], torch.full((B,), 8.0, dtype=torch.float64))


@pytest.mark.parametrize("source", ["student", "teacher"])
@pytest.mark.parametrize("binary", [False, True])
def test_rekd_grad_matches_autograd(source, binary):
    close(G.rekd_grad(S, T_, 3, 1.5, 8.0, 4.0, source, binary),
          autograd(lambda s, t, y: L.rekd_loss(s, t, 3, 1.5, 8.0, 4.0, source, binary)))
    mask = L.topk_mask(S, T_, 2, source)
    parts = G.set_decomposition_grads(S, T_, mask, 3.0)
    for name in ("binary", "inside", "outside"):
        fn = lambda s, t, y, n=name: getattr(L.set_decomposition(s, t, mask, 3.0), n).mean() * 9.0
        close(parts[name], autograd(fn))


@pytest.mark.parametrize("mode", ["ratio", "inv_student", "none"])
def test_aekt_grad_matches_autograd(mode):
    fn = lambda s, t, y: L.aekt_loss(s, t, y, 1.0, 8.0, 4.0, mode, 0.2, 5.0)
    close(G.aekt_grad(S, T_, Y, 1.0, 8.0, 4.0, mode, 0.2, 5.0), autograd(fn))
    fn = lambda s, t, y: L.aekt_loss(s, t, y, 1.0, 8.0, 4.0, mode, 0.2, 5.0, implicit=False)
    close(G.aekt_grad(S, T_, Y, 1.0, 8.0, 4.0, mode, 0.2, 5.0, implicit=False), autograd(fn))
    # through the serial layer z_kd = W z + b: gradient w.r.t. z_cls
    g = torch.Generator().manual_seed(3)
    W = torch.eye(C, dtype=torch.float64) + 0.1 * torch.randn(C, C, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(C, generator=g, dtype=torch.float64)
    z_kd = S @ W.t() + b
    fn = lambda s, t, y: L.aekt_loss(s @ W.t() + b, t, y, 1.0, 8.0, 4.0, mode, 0.2, 5.0)
    close(G.aekt_grad(z_kd, T_, Y, 1.0, 8.0, 4.0, mode, 0.2, 5.0, serial_weight=W), autograd(fn))
    w = G.effective_weights(T_, Y, 4.0, student_logits=S, weight_mode=mode, r_min=0.2, r_max=5.0)
    close(w["aekt_explicit"], L.adaptive_weight(S, T_, Y, 4.0, mode, 0.2, 5.0))


def test_per_sample_temperature_grad_matches_autograd():
    temps = torch.tensor([2.0, 4.0, 6.0, 4.0, 2.0, 3.0, 5.0, 6.0], dtype=torch.float64)
    close(G.kd_grad(S, T_, temps), autograd(lambda s, t, y: L.kd_loss_per_sample_temperature(s, t, temps)))


def test_split_target_nontarget_keeps_class_order():
    grad = torch.arange(B * C, dtype=torch.float64).reshape(B, C)
    target, rest = G.split_target_nontarget(grad, Y)
    for b in range(B):
        assert target[b] == grad[b, Y[b]]
        assert rest[b].tolist() == [v for i, v in enumerate(grad[b].tolist()) if i != Y[b]]


LOSSES = {
    "kd": lambda s: L.kd_loss(s, T_, 4.0),
    "dkd": lambda s: L.dkd_loss(s, T_, Y, 1.0, 8.0, 4.0),
    "rekd": lambda s: L.rekd_loss(s, T_, 3, 1.0, 8.0, 4.0, include_binary_term=True),
    "rekd_teacher": lambda s: L.rekd_loss(s, T_, 2, 1.0, 8.0, 2.0, "teacher"),
    "clkd_ins": lambda s: L.clkd_instance_loss(s, T_),
    "clkd_cla": lambda s: L.clkd_class_loss(s, T_, "vector_sum"),
    "cc_cov": lambda s: L.class_correlation_loss(s, T_, "cov"),
    "cc_gram": lambda s: L.class_correlation_loss(s, T_, "gram"),
    "cc_sample": lambda s: L.class_correlation_loss(s, T_, "sample"),
    # r is a stop-gradient weight, which finite differences cannot see: check with r held constant
    "aekt_r_const": lambda s: L.aekt_loss(s, T_, Y, 1.0, 8.0, 4.0, "ratio", 2.0, 2.0),
    "aekt_none": lambda s: L.aekt_loss(s, T_, Y, 0.5, 8.0, 4.0, "none"),
    "dlkd": lambda s: L.kd_loss_per_sample_temperature(s, T_, torch.linspace(2, 6, B, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name):
    s = S.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(LOSSES[name], (s,), eps=1e-6, atol=1e-7, rtol=1e-5)
