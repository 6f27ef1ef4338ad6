"""Loss values against independent computations (numpy float64, and the DKD authors' formulation)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlib import losses as L

B, C = 16, 10


def logits(seed, b=B, c=C, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * scale).to(dtype)


def labels(seed, b=B, c=C):
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


# -- independent references ---------------------------------------------------------------------------
def np_softmax(x, T=1.0):
    x = np.asarray(x, dtype=np.float64) / T
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(p, q):
    """Row-wise KL(p || q) of probability rows, 0 log 0 = 0."""
    p, q = np.asarray(p), np.asarray(q)
    out = np.zeros(p.shape[0])
    for b in range(p.shape[0]):
        for i in range(p.shape[1]):
            if p[b, i] > 0:
                out[b] += p[b, i] * np.log(p[b, i] / q[b, i])
    return out


def np_kd(s, t, T):
    return T * T * np_kl(np_softmax(t, T), np_softmax(s, T)).mean()


def np_restricted(p, keep):
    """p renormalised over the True entries of ``keep`` (rows), zeros elsewhere."""
    q = np.where(keep, p, 0.0)
    return q / q.sum(axis=1, keepdims=True)


def np_set_terms(s, t, keep, T):
    ps, pt = np_softmax(s, T), np_softmax(t, T)
    Ps, Pt = (ps * keep).sum(1), (pt * keep).sum(1)
    binary = np_kl(np.stack([Pt, 1 - Pt], 1), np.stack([Ps, 1 - Ps], 1))
    inside = np_kl(np_restricted(pt, keep), np_restricted(ps, keep))
    outside = np_kl(np_restricted(pt, ~keep), np_restricted(ps, ~keep))
    return binary, inside, outside, Pt


def authors_dkd(s, t, y, alpha, beta, T):
    """Re-statement of the DKD paper's code path (mdistiller): softmax, summed masks, torch.log,
    KL with sum reduction / batch, and the target logit lowered by 1000 for NCKD. float64."""
    s, t = s.double(), t.double()
    gt = torch.zeros_like(s).scatter_(1, y.view(-1, 1), 1.0)
    other = 1.0 - gt
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / y.shape[0]
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    log_ps2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = F.kl_div(log_ps2, pt2, reduction="sum") * T**2 / y.shape[0]
    return alpha * tckd + beta * nckd, tckd, nckd


# -- KD -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 4.0, 0.5])
def test_kd_loss_matches_numpy(T):
    s, t = logits(0), logits(1)
    assert L.kd_loss(s, t, T).item() == pytest.approx(np_kd(s.numpy(), t.numpy(), T), rel=1e-5)
    assert L.kd_loss(s.double(), t.double(), T).item() == pytest.approx(np_kd(s, t, T), rel=1e-12)


def test_kd_loss_matches_kl_div_batchmean():
    s, t = logits(2), logits(3)
    ref = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    torch.testing.assert_close(L.kd_loss(s, t, 4.0), ref)


def test_losses_are_float32_under_bf16():
    s, t, y = logits(4).bfloat16(), logits(5).bfloat16(), labels(0)
    for value in (L.kd_loss(s, t, 4.0), L.dkd_loss(s, t, y, 1.0, 8.0, 4.0), L.rekd_loss(s, t, 3, 1, 8, 4)):
        assert value.dtype == torch.float32
    ref = L.kd_loss(s.float(), t.float(), 4.0)
    torch.testing.assert_close(L.kd_loss(s, t, 4.0), ref)


# -- DKD ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 6.0, 2.5)])
def test_dkd_loss_equals_authors_formulation(alpha, beta, T):
    s, t, y = logits(6), logits(7), labels(1)
    ref, ref_tckd, ref_nckd = authors_dkd(s, t, y, alpha, beta, T)
    torch.testing.assert_close(L.dkd_loss(s.double(), t.double(), y, alpha, beta, T), ref,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.dkd_loss(s, t, y, alpha, beta, T), ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L.tckd_loss(s.double(), t.double(), y, T), ref_tckd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.nckd_loss(s.double(), t.double(), y, T), ref_nckd, rtol=1e-12, atol=1e-12)


def test_dkd_parts_match_numpy():
    s, t, y = logits(8), logits(9), labels(2)
    keep = np.zeros((B, C), bool)
    keep[np.arange(B), y.numpy()] = True
    binary, _, outside, pt = np_set_terms(s.numpy(), t.numpy(), keep, 4.0)
    parts = L.dkd_parts(s.double(), t.double(), y, 4.0)
    np.testing.assert_allclose(parts.tckd.numpy(), binary, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(parts.nckd.numpy(), outside, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(parts.teacher_target_prob.numpy(), pt, rtol=1e-12)
    per = L.dkd_loss_per_sample(s.double(), t.double(), y, 1.0, 8.0, 4.0).numpy()
    np.testing.assert_allclose(per, 16 * (binary + 8 * outside), rtol=1e-10, atol=1e-14)


def test_kl_equals_tckd_plus_weighted_nckd():
    s, t, y = logits(10, dtype=torch.float64), logits(11, dtype=torch.float64), labels(3)
    parts = L.dkd_parts(s, t, y, 4.0)
    kl = L.kl_divergence(s, t, 4.0)
    torch.testing.assert_close(kl, parts.tckd + (1 - parts.teacher_target_prob) * parts.nckd)


def test_dkd_with_beta_one_minus_teacher_target_prob_is_kd():
    s, t, y = logits(12), logits(13), labels(4)
    pt = L.dkd_parts(s, t, y, 4.0).teacher_target_prob
    torch.testing.assert_close(L.dkd_loss(s, t, y, 1.0, 1.0 - pt, 4.0), L.kd_loss(s, t, 4.0))
    assert not torch.allclose(L.dkd_loss(s, t, y, 1.0, 8.0, 4.0), L.kd_loss(s, t, 4.0))


# -- ReKD ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 9])
def test_three_part_decomposition_identity(k):
    s, t = logits(14, dtype=torch.float64), logits(15, dtype=torch.float64)
    for source in ("student", "teacher"):
        d = L.topk_decomposition(s, t, k, 4.0, source)
        kl = L.kl_divergence(s, t, 4.0)
        recombined = d.binary + d.teacher_mass * d.inside + (1 - d.teacher_mass) * d.outside
        torch.testing.assert_close(kl, recombined)
    mask = torch.rand(B, C, generator=torch.Generator().manual_seed(k)) < 0.5
    mask[:, 0], mask[:, 1] = True, False  # each row needs both sides
    d = L.set_decomposition(s, t, mask, 2.0)
    torch.testing.assert_close(L.kl_divergence(s, t, 2.0),
                               d.binary + d.teacher_mass * d.inside + (1 - d.teacher_mass) * d.outside)


def test_topk_terms_match_numpy():
    s, t = logits(16), logits(17)
    keep = np.zeros((B, C), bool)
    top = np.argsort(-s.numpy(), axis=1)[:, :3]
    np.put_along_axis(keep, top, True, axis=1)
    assert (L.topk_mask(s, t, 3, "student").numpy() == keep).all()
    binary, inside, outside, _ = np_set_terms(s.numpy(), t.numpy(), keep, 4.0)
    d = L.topk_decomposition(s.double(), t.double(), 3, 4.0, "student")
    np.testing.assert_allclose(d.inside.numpy(), inside, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d.outside.numpy(), outside, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d.binary.numpy(), binary, rtol=1e-10, atol=1e-14)
    ref = 16 * (1.0 * inside.mean() + 8.0 * outside.mean())
    assert L.rekd_loss(s.double(), t.double(), 3, 1.0, 8.0, 4.0).item() == pytest.approx(ref, rel=1e-10)
    ref_b = ref + 16 * 1.0 * binary.mean()
    assert L.rekd_loss(s.double(), t.double(), 3, 1.0, 8.0, 4.0, include_binary_term=True).item() == \
        pytest.approx(ref_b, rel=1e-10)


def test_rekd_k1_teacher_top1_is_label_reduces_to_dkd():
    s, t = logits(18, dtype=torch.float64), logits(19, dtype=torch.float64)
    y = t.argmax(dim=1)
    d = L.topk_decomposition(s, t, 1, 4.0, "teacher")
    parts = L.dkd_parts(s, t, y, 4.0)
    torch.testing.assert_close(d.inside, torch.zeros_like(d.inside))
    torch.testing.assert_close(d.binary, parts.tckd)
    torch.testing.assert_close(d.outside, parts.nckd)
    torch.testing.assert_close(L.rekd_loss(s, t, 1, 1.5, 6.0, 4.0, "teacher", include_binary_term=True),
                               L.dkd_loss(s, t, y, 1.5, 6.0, 4.0))


# -- CLKD ---------------------------------------------------------------------------------------------
def np_normalize_rows(x):
    return x / np.sqrt((x**2).sum(1, keepdims=True))


def test_clkd_terms_match_numpy():
    s, t = logits(20).numpy().astype(np.float64), logits(21).numpy().astype(np.float64)
    S, T = torch.from_numpy(s), torch.from_numpy(t)
    ins = ((np_normalize_rows(s) - np_normalize_rows(t)) ** 2).sum(1)
    cla = ((np_normalize_rows(s.T) - np_normalize_rows(t.T)) ** 2).sum(1)
    assert L.clkd_instance_loss(S, T, "vector_sum").item() == pytest.approx(ins.mean(), rel=1e-12)
    assert L.clkd_instance_loss(S, T).item() == pytest.approx(ins.mean() / C, rel=1e-12)
    assert L.clkd_class_loss(S, T, "vector_sum").item() == pytest.approx(cla.mean(), rel=1e-12)
    assert L.clkd_class_loss(S, T).item() == pytest.approx(cla.mean() / B, rel=1e-12)
    cov = ((np.cov(s, rowvar=False) - np.cov(t, rowvar=False)) ** 2).sum() / C**2
    assert L.class_correlation_loss(S, T, "cov").item() == pytest.approx(cov, rel=1e-10)
    gs, gt = s.T @ s, t.T @ t
    gram = ((np_normalize_rows(gs) - np_normalize_rows(gt)) ** 2).mean() / C**2
    assert L.class_correlation_loss(S, T, "gram").item() == pytest.approx(gram, rel=1e-10)
    sample = ((np.cov(s) - np.cov(t)) ** 2).sum() / B**2  # np.cov rows = samples, over classes
    assert L.class_correlation_loss(S, T, "sample").item() == pytest.approx(sample, rel=1e-10)


# -- AEKT ---------------------------------------------------------------------------------------------
def test_aekt_weight_and_loss_match_numpy():
    s, t, y = logits(22), logits(23), labels(5)
    ps, pt = np_softmax(s.numpy(), 4.0), np_softmax(t.numpy(), 4.0)
    idx = (np.arange(B), y.numpy())
    ratio = np.clip(pt[idx] / ps[idx], 0.5, 3.0)
    r = L.adaptive_weight(s.double(), t.double(), y, 4.0, "ratio", 0.5, 3.0)
    np.testing.assert_allclose(r.numpy(), ratio, rtol=1e-10)
    np.testing.assert_allclose(L.adaptive_weight(s, t, y, 4.0, "inv_student", 0.0, 50.0).numpy(),
                               np.clip(1 / ps[idx], 0, 50), rtol=1e-5)
    keep = np.zeros((B, C), bool)
    keep[idx] = True
    binary, _, outside, _ = np_set_terms(s.numpy(), t.numpy(), keep, 4.0)
    ref = 16 * (2.0 * ratio * binary + 8.0 * outside).mean()
    got = L.aekt_loss(s.double(), t.double(), y, 2.0, 8.0, 4.0, "ratio", 0.5, 3.0)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    only_implicit = L.aekt_loss(s.double(), t.double(), y, 2.0, 8.0, 4.0, explicit=False)
    assert only_implicit.item() == pytest.approx(16 * 8.0 * outside.mean(), rel=1e-10)
    assert L.aekt_explicit_loss(s.double(), t.double(), y, 4.0, r).item() == \
        pytest.approx(16 * (ratio * binary).mean(), rel=1e-10)


def test_aekt_without_weight_is_dkd():
    s, t, y = logits(24), logits(25), labels(6)
    torch.testing.assert_close(L.aekt_loss(s, t, y, 1.0, 8.0, 4.0, weight_mode="none"),
                               L.dkd_loss(s, t, y, 1.0, 8.0, 4.0))


# -- DLKD ---------------------------------------------------------------------------------------------
def test_per_sample_temperature_kd_matches_loop():
    s, t = logits(26), logits(27)
    temps = torch.tensor([2.0, 4.0, 6.0, 3.0] * 4)
    ref = np.mean([temps[b].item() ** 2 * np_kl(np_softmax(t[b:b + 1].numpy(), temps[b].item()),
                                                 np_softmax(s[b:b + 1].numpy(), temps[b].item()))[0]
                   for b in range(B)])
    assert L.kd_loss_per_sample_temperature(s, t, temps).item() == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(L.kd_loss_per_sample_temperature(s, t, torch.full((B,), 4.0)),
                               L.kd_loss(s, t, 4.0))


def test_prediction_difficulty_matches_numpy():
    a, b = logits(28), logits(29)
    ref = np.sqrt(((np_softmax(a.numpy(), 2.0) - np_softmax(b.numpy(), 2.0)) ** 2).sum(1))
    np.testing.assert_allclose(L.prediction_difficulty(a, b, 2.0).numpy(), ref, rtol=1e-5, atol=1e-7)


# -- numerics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.05, 1.0, 4.0])
def test_every_loss_is_finite_for_extreme_logits(T):
    g = torch.Generator().manual_seed(30)
    s = (torch.randint(0, 2, (B, C), generator=g).float() * 2 - 1) * 1e4
    t = (torch.randint(0, 2, (B, C), generator=g).float() * 2 - 1) * 1e4
    s[0], t[0] = 0.0, 0.0
    y = labels(7)
    s.requires_grad_(True)
    values = [L.kd_loss(s, t, T), L.dkd_loss(s, t, y, 1.0, 8.0, T), L.tckd_loss(s, t, y, T),
              L.nckd_loss(s, t, y, T), L.rekd_loss(s, t, 3, 1.0, 8.0, T, include_binary_term=True),
              L.rekd_loss(s, t, 3, 1.0, 8.0, T, "teacher"), L.aekt_loss(s, t, y, 1.0, 8.0, T),
              L.aekt_loss(s, t, y, 1.0, 8.0, T, "inv_student"), L.clkd_instance_loss(s, t),
              L.clkd_class_loss(s, t), L.class_correlation_loss(s, t, "cov"),
              L.class_correlation_loss(s, t, "gram"), L.class_correlation_loss(s, t, "sample"),
              L.kd_loss_per_sample_temperature(s, t, torch.full((B,), T))]
    for v in values:
        assert torch.isfinite(v), v
        (grad,) = torch.autograd.grad(v, s)
        assert torch.isfinite(grad).all()
    assert torch.isfinite(L.prediction_difficulty(s.detach(), t, T)).all()
