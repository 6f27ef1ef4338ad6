"""The wider logit family (DIST, NKD, CTKD, MLKD, logit standardisation) and CLKD (default and StreamLined code).

Each reference below is a float64 re-statement of the authors' formula written here from the equations
(methods.md 2.3-2.7, the issue's notes), independently of ``kdlib.losses``: plain softmaxes, explicit
column deletion, numpy percentiles. Values and gradients of kdlib's methods are compared against them.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from kdlib import augment, engine, losses as L
from kdlib.config import make_config
from kdlib.errors import KDLibError
from kdlib.methods import build
from kdlib.methods.base import StepContext
from kdlib.methods.ls import ls_settings, settings_table

B, C = 16, 10


def logits(seed, scale=3.0, b=B, c=C):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * scale).double()


def labels(seed, b=B, c=C):
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


def ctx(epoch=1, extra_logits=None):
    return StepContext(epoch=epoch, step=0, steps_per_epoch=1, epochs=240, extra_logits=dict(extra_logits or {}))


def total(terms):
    return sum(terms.values())


def grad_of(fn, z):
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z), z)
    return g


S, T, Y = logits(0), logits(1), labels(2)


def softmax(z, t=1.0):
    e = torch.exp(z / t - (z / t).max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ce(z, y):
    return -(torch.log(softmax(z))[torch.arange(len(y)), y]).mean()


def kd_ref(zs, zt, t):
    ps, pt = softmax(zs, t), softmax(zt, t)
    return (pt * (torch.log(pt) - torch.log(ps))).sum(1).mean() * t * t


# -- DIST -----------------------------------------------------------------------------------------
def pearson_ref(a, b):
    """Per row: cosine of the centred rows, eps 1e-8 added to the product of the norms (DIST code)."""
    out = []
    for r in range(a.shape[0]):
        x, y = a[r] - a[r].mean(), b[r] - b[r].mean()
        out.append((x * y).sum() / (torch.sqrt((x * x).sum()) * torch.sqrt((y * y).sum()) + 1e-8))
    return torch.stack(out)


def dist_ref(zs, zt, y, tau=4.0, beta=1.0, gamma=1.0, ce_w=1.0, kd_w=2.0):
    ys, yt = softmax(zs, tau), softmax(zt, tau)
    inter = 1 - pearson_ref(ys, yt).mean()
    intra = 1 - pearson_ref(ys.t(), yt.t()).mean()
    return ce_w * ce(zs, y) + kd_w * tau**2 * (beta * inter + gamma * intra)


def test_dist_value_and_gradient_match_the_authors_formula():
    m = build("dist")
    assert m.hparams == {"ce_weight": 1.0, "kd_weight": 2.0, "temperature": 4.0, "beta": 1.0, "gamma": 1.0}
    assert total(m(S, T, Y, ctx())).item() == pytest.approx(dist_ref(S, T, Y).item(), rel=1e-12)
    m2 = build("dist", temperature=2.0, beta=0.5, gamma=3.0)
    torch.testing.assert_close(grad_of(lambda z: total(m2(z, T, Y, ctx())), S),
                               grad_of(lambda z: dist_ref(z, T, Y, 2.0, 0.5, 3.0), S), rtol=1e-9, atol=1e-12)


def test_dist_of_identical_logits_is_zero_and_its_eps_is_absolute():
    inter, intra = L.dist_terms(S, S, 4.0)
    assert 0 <= inter.item() < 1e-4 and 0 <= intra.item() < 1e-4
    # exactly what the eps leaves: rho = |x|^2 / (|x|^2 + 1e-8) for identical centred rows x
    y = softmax(S, 4.0)
    for value, rows in ((inter, y), (intra, y.t())):
        n2 = ((rows - rows.mean(1, keepdim=True)) ** 2).sum(1)
        assert value.item() == pytest.approx(16 * (1 - n2 / (n2 + 1e-8)).mean().item(), rel=1e-6)
    # with a constant column (zero variance) the authors' absolute eps keeps rho = 0 instead of nan
    flat = torch.zeros(4, 3, dtype=torch.float64)
    assert torch.equal(L.pearson_rows(flat, flat), torch.zeros(4, dtype=torch.float64))


# -- NKD ------------------------------------------------------------------------------------------
def nkd_ref(zs, zt, y, temp=3.0, gamma=3.5, ce_w=1.0, kl=False):
    """Target term at T = 1 (teacher prob. detached); non-target softmaxes over the C-1 columns left
    after deleting the label's column, at temp; cross-entropy (kl=True: KL) times gamma temp^2."""
    n = len(y)
    pt_target = softmax(zt)[torch.arange(n), y].detach()
    target = -(pt_target * torch.log(softmax(zs))[torch.arange(n), y]).mean()
    rows = []
    for b in range(n):
        keep = [i for i in range(zs.shape[1]) if i != int(y[b])]
        ps, pt = softmax(zs[b, keep][None], temp)[0], softmax(zt[b, keep][None], temp)[0]
        rows.append((pt * (torch.log(pt) - torch.log(ps))).sum() if kl else -(pt * torch.log(ps)).sum())
    return ce_w * ce(zs, y) + target + gamma * temp**2 * torch.stack(rows).mean()


def test_nkd_value_and_gradient_match_the_authors_code():
    m = build("nkd")
    assert m.hparams == {"ce_weight": 1.0, "temperature": 3.0, "gamma": 3.5}
    assert total(m(S, T, Y, ctx())).item() == pytest.approx(nkd_ref(S, T, Y).item(), rel=1e-12)
    torch.testing.assert_close(grad_of(lambda z: total(m(z, T, Y, ctx())), S),
                               grad_of(lambda z: nkd_ref(z, T, Y), S), rtol=1e-9, atol=1e-12)


def test_nkd_value_includes_the_teacher_entropy_but_its_gradient_is_the_kl_form():
    m = build("nkd")
    value_ce, value_kl = nkd_ref(S, T, Y).item(), nkd_ref(S, T, Y, kl=True).item()
    assert value_ce > value_kl + 1.0  # gamma T^2 times the teacher's non-target entropy
    torch.testing.assert_close(grad_of(lambda z: total(m(z, T, Y, ctx())), S),
                               grad_of(lambda z: nkd_ref(z, T, Y, kl=True), S), rtol=1e-9, atol=1e-12)
    # the teacher's target probability is detached: no gradient flows to the teacher
    zt = T.clone().requires_grad_(True)
    terms = m(S.clone().requires_grad_(True), zt, Y, ctx())
    (g,) = torch.autograd.grad(terms["loss_target"], zt, allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0


# -- CTKD -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch,expected", [(1, -(1 - math.cos(math.pi / 10)) / 2), (5, -0.5), (10, -1.0),
                                            (11, -1.0), (240, -1.0)])
def test_ctkd_reversal_schedule_is_the_authors_cosine(epoch, expected):
    assert L.ctkd_reversal(epoch, 10) == pytest.approx(expected, abs=1e-12)
    if epoch == 1:
        assert expected == pytest.approx(-0.0245, abs=1e-4)


@pytest.mark.parametrize("epoch", [1, 5, 10, 30])
def test_ctkd_temperature_gradient_is_the_unreversed_gradient_times_the_schedule(epoch):
    m = build("ctkd").double()
    assert m.hparams["t_start"] + m.hparams["t_end"] / (1 + math.exp(-1)) == pytest.approx(15.62, abs=5e-3)
    m.start_epoch(epoch)
    total(m(S, T, Y, ctx(epoch))).backward()
    # the same loss without the reversal layer, written from the equation
    theta = torch.ones((), dtype=torch.float64, requires_grad=True)
    tau = 1.0 + 20.0 * torch.sigmoid(theta)
    (0.1 * ce(S, Y) + 0.9 * kd_ref(S, T, tau)).backward()
    assert m.theta.grad.item() == pytest.approx(L.ctkd_reversal(epoch, 10) * theta.grad.item(), rel=1e-10)
    assert theta.grad.item() != 0.0


def test_ctkd_student_gradient_is_kd_at_the_learned_temperature_and_history_records_it():
    m = build("ctkd").double()
    tau = 1.0 + 20.0 / (1 + math.exp(-1.0))
    torch.testing.assert_close(grad_of(lambda z: total(m(z, T, Y, ctx())), S),
                               grad_of(lambda z: 0.1 * ce(z, Y) + 0.9 * kd_ref(z, T, tau), S),
                               rtol=1e-9, atol=1e-12)
    row = m.end_epoch(1)
    assert row["temperature"] == pytest.approx(tau, rel=1e-6) and row["reversal"] == pytest.approx(-0.0245, abs=1e-4)
    assert [n for n, _ in m.named_parameters()] == ["theta"]  # the engine's SGD gets theta


# -- MLKD -----------------------------------------------------------------------------------------
TEMPS = [4.0, 3.0, 5.0, 2.0, 6.0]


def cc_ref(zs, zt, t):
    ps, pt = softmax(zs, t), softmax(zt, t)
    return ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / zs.shape[1]


def bc_ref(zs, zt, t):
    ps, pt = softmax(zs, t), softmax(zt, t)
    return ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / zs.shape[0]


def mlkd_code_ref(sw, tw, ss, ts, y, ce_w=0.1, kd_w=0.9):
    """The released KD_ours.py: masks from numpy's median multiply averaged scalars; the strong
    instance terms at T = 2 and 6 use the weak logits; strong class/batch terms never enter."""
    pw = softmax(tw).detach().numpy()
    conf = pw.max(1)
    mask = conf <= np.percentile(conf, 50)
    cconf = pw.sum(0)
    cmask = cconf <= np.percentile(cconf, 50)
    loss = ce_w * (ce(sw, y) + ce(ss, y))
    for k, t in enumerate(TEMPS):
        strong = (ss, ts) if t in (4.0, 3.0, 5.0) else (sw, tw)
        loss = loss + kd_w * (kd_ref(sw, tw, t) * torch.tensor(mask, dtype=torch.float64)).mean()
        loss = loss + kd_w * kd_ref(*strong, t)
        loss = loss + kd_w * (cc_ref(sw, tw, t) * torch.tensor(cmask, dtype=torch.float64)).mean()
        loss = loss + kd_w * (bc_ref(sw, tw, t) * torch.tensor(mask, dtype=torch.float64)).mean()
    return loss


def mlkd_paper_ref(sw, tw, ss, ts, y, ce_w=0.1, kd_w=0.9):
    loss = ce_w * (ce(sw, y) + ce(ss, y))
    for t in TEMPS:
        for zs, zt in ((sw, tw), (ss, ts)):
            loss = loss + kd_w * (kd_ref(zs, zt, t) + cc_ref(zs, zt, t) + bc_ref(zs, zt, t))
    return loss


@pytest.mark.parametrize("b", [16, 15])  # odd batch: the median is one of the values
def test_mlkd_released_code_loss_value_and_gradient(b):
    sw, tw, ss, ts, y = logits(3, b=b), logits(4, b=b), logits(5, b=b), logits(6, b=b), labels(7, b=b)
    m = build("mlkd")
    assert m.hparams == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "variant": "code",
                         "standardize": False, "standardize_levels": "instance"}
    assert_mlkd_matches(m, mlkd_code_ref, sw, tw, ss, ts, y)


def assert_mlkd_matches(m, ref, sw, tw, ss, ts, y):
    """The loss of ``m`` equals ``ref``'s in value and in its gradients w.r.t. both views' student logits."""
    got = total(m(sw, tw, y, ctx(extra_logits={"strong": (ss, ts)})))
    assert got.item() == pytest.approx(ref(sw, tw, ss, ts, y).item(), rel=1e-12)
    for which in (0, 1):  # gradient w.r.t. the weak and the strong student logits
        def views(z, which=which):
            return (z, ss) if which == 0 else (sw, z)

        def fn(z):
            a, s_ = views(z)
            return total(m(a, tw, y, ctx(extra_logits={"strong": (s_, ts)})))

        def expected(z):
            a, s_ = views(z)
            return ref(a, tw, s_, ts, y)
        torch.testing.assert_close(grad_of(fn, (sw, ss)[which]), grad_of(expected, (sw, ss)[which]),
                                   rtol=1e-9, atol=1e-12)
    return got


def test_mlkd_paper_variant_and_its_difference_from_the_code():
    sw, tw, ss, ts = logits(3), logits(4), logits(5), logits(6)
    m = build("mlkd", variant="paper")
    got = total(m(sw, tw, Y, ctx(extra_logits={"strong": (ss, ts)})))
    assert got.item() == pytest.approx(mlkd_paper_ref(sw, tw, ss, ts, Y).item(), rel=1e-12)
    code = total(build("mlkd")(sw, tw, Y, ctx(extra_logits={"strong": (ss, ts)})))
    assert abs(code.item() - got.item()) > 1e-3


def test_mlkd_without_a_second_view_is_refused():
    with pytest.raises(KDLibError, match="strong view"):
        build("mlkd")(S, T, Y, ctx())
    m = build("mlkd")
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(KDLibError, match="live teacher"):
        engine.check_extra_views(m, None, images)
    with pytest.raises(KDLibError, match="raw uint8 training images"):
        engine.check_extra_views(m, torch.nn.Identity(), images.float())
    engine.check_extra_views(m, torch.nn.Identity(), images)  # a live teacher and raw images: fine
    engine.check_extra_views(build("kd"), None, None)  # no extra views: nothing to check


def test_mlkd_recipe_lr_is_a_config_field_the_user_can_override():
    cfg = make_config("smoke", method="mlkd")
    assert cfg.resolved().lr == 0.025 and cfg.method_recipe() == {"lr": 0.025}
    assert make_config("smoke", method="mlkd", student="MobileNetV2").resolved().lr == 0.01
    assert make_config("smoke", method="mlkd", lr=0.05).resolved().lr == 0.05
    assert make_config("smoke", method="kd").resolved().lr == 0.05


# -- logit standardisation ------------------------------------------------------------------------
def zscore_ref(z):
    return (z - z.mean(1, keepdim=True)) / (torch.std(z, dim=1, unbiased=True, keepdim=True) + 1e-7)


def test_standardize_matches_the_ls_code_and_the_kd_loss():
    z = S.numpy()
    ref = (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(L.standardize(S).numpy(), ref, rtol=1e-12)
    m = build("kd", standardize=True, temperature=2.0, kd_weight=9.0, ce_weight=0.1)
    expected = 0.1 * ce(S, Y) + 9.0 * kd_ref(zscore_ref(S), zscore_ref(T), 2.0)  # CE on raw logits
    assert total(m(S, T, Y, ctx())).item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad_of(lambda z: total(m(z, T, Y, ctx())), S),
                               grad_of(lambda z: 0.1 * ce(z, Y) + 9.0 * kd_ref(zscore_ref(z), zscore_ref(T), 2.0), S),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["kd", "dkd", "ctkd", "mlkd"])
def test_standardized_kd_terms_ignore_row_shifts_and_scales(name):
    shift = torch.linspace(-5, 5, B, dtype=torch.float64)[:, None]
    scale = torch.linspace(0.5, 3.0, B, dtype=torch.float64)[:, None]
    extra = {"standardize_levels": "all"} if name == "mlkd" else {}  # kdlib's reading: every level z-scored
    m = build(name, standardize=True, **extra).double()
    views = {"strong": (logits(5), logits(6))}
    moved_views = {"strong": (logits(5) * scale + shift, logits(6) * 2.0 - shift)}
    a = m(S, T, Y, ctx(extra_logits=views))
    b = m(S * scale + shift, T * 2.0 - shift, Y, ctx(extra_logits=moved_views))
    for key in a:
        if key != "loss_ce":  # the cross-entropy stays on the raw logits
            assert b[key].item() == pytest.approx(a[key].item(), rel=1e-6, abs=1e-9), key
    assert b["loss_ce"].item() != pytest.approx(a["loss_ce"].item(), rel=1e-3)


def test_ls_settings_per_pair():
    assert ls_settings("kd", "resnet32x4", "resnet8x4") == {"standardize": True, "temperature": 2.0,
                                                            "kd_weight": 9.0, "ce_weight": 0.1}
    assert ls_settings("kd", "resnet110", "resnet20")["temperature"] == 4.0
    dkd = ls_settings("dkd", "resnet56", "resnet20", dkd_beta=2.0)
    assert (dkd["alpha"], dkd["beta"], dkd["temperature"], dkd["ce_weight"]) == (9.0, 18.0, 2.0, 1.0)
    build("dkd", **dkd)  # valid hyperparameters
    assert ls_settings("mlkd", "resnet32x4", "resnet8x4") == {"standardize": True, "temperature": 2.0,
                                                              "kd_weight": 9.0, "standardize_levels": "instance"}
    with pytest.raises(KDLibError, match="logit standardisation"):
        ls_settings("dist", "resnet56", "resnet20")


def test_ls_settings_dkd_as_the_authors_script_sets_them():
    # tools/train.py --logit-stand --base-temp 2 --kd-weight 9 on a DKD config (ALPHA 1, BETA 2, T 4):
    # ALPHA = 1 * 9 = 9; BETA = ALPHA * 9 = 81 (the config's BETA 2 is overwritten); the base temperature
    # goes to KD.TEMPERATURE, so DKD keeps its T = 4
    repo = ls_settings("dkd", "resnet56", "resnet20", dkd_beta=2.0, reading="repository")
    assert repo == {"standardize": True, "temperature": 4.0, "alpha": 9.0, "beta": 81.0, "ce_weight": 1.0}
    # alpha 0.5 in a config: ALPHA 4.5, BETA 40.5, whatever beta was
    half = ls_settings("dkd", "resnet32x4", "resnet8x4", dkd_alpha=0.5, dkd_beta=8.0, reading="repository")
    assert (half["alpha"], half["beta"]) == (4.5, 40.5)
    paper = ls_settings("dkd", "resnet56", "resnet20", dkd_beta=2.0)  # the default reading: the paper's text
    assert (paper["alpha"], paper["beta"], paper["temperature"]) == (9.0, 18.0, 2.0)
    assert build("dkd", **repo).beta == 81.0
    for method in ("kd", "mlkd", "ctkd"):  # the two readings differ for DKD only
        assert ls_settings(method, "resnet56", "resnet20", reading="repository") == ls_settings(
            method, "resnet56", "resnet20")
    with pytest.raises(KDLibError, match="reading must be one of"):
        ls_settings("dkd", "resnet56", "resnet20", reading="code")
    rows = [r for r in settings_table([("resnet56", "resnet20")]) if r["method"].startswith("dkd")]
    assert [(r["method"], r["alpha"], r["beta"], r["temperature"]) for r in rows] == [
        ("dkd", 9.0, 18.0, 2.0), ("dkd (repository)", 9.0, 81.0, 4.0)]


def mlkd_ls_ref(sw, tw, ss, ts, y, base_t=2.0, ce_w=0.1, kd_w=9.0):
    """The LS authors' MLKD.py run with ``--logit-stand --base-temp 2 --kd-weight 9``: the configuration's
    temperature replaces the first of (4, 3, 5, 2, 6), the others are written into the code; the z-score
    (unbiased std + 1e-7) happens inside the instance (KD) terms only, the class and batch terms read the
    raw logits; every term weighs kd_weight; masks from numpy percentiles of the raw weak teacher."""
    pw = softmax(tw).detach().numpy()
    conf, cconf = pw.max(1), pw.sum(0)
    mask = torch.tensor(conf <= np.percentile(conf, 50), dtype=torch.float64)
    cmask = torch.tensor(cconf <= np.percentile(cconf, 50), dtype=torch.float64)
    z = zscore_ref
    loss = ce_w * (ce(sw, y) + ce(ss, y))
    for k, t in enumerate([base_t, 3.0, 5.0, 2.0, 6.0]):
        strong = (ss, ts) if k < 3 else (sw, tw)
        loss = loss + kd_w * (kd_ref(z(sw), z(tw), t) * mask).mean() + kd_w * kd_ref(z(strong[0]), z(strong[1]), t)
        loss = loss + kd_w * (cc_ref(sw, tw, t) * cmask).mean() + kd_w * (bc_ref(sw, tw, t) * mask).mean()
    return loss


@pytest.mark.parametrize("b", [16, 15])
def test_mlkd_with_logit_standardisation_is_the_ls_authors_code(b):
    sw, tw, ss, ts, y = logits(3, b=b), logits(4, b=b), logits(5, b=b), logits(6, b=b), labels(7, b=b)
    m = build("mlkd", **ls_settings("mlkd", "resnet32x4", "resnet8x4"))
    got = assert_mlkd_matches(m, mlkd_ls_ref, sw, tw, ss, ts, y)
    # kdlib's own reading (every level z-scored) is another loss, and a labelled variant
    every = build("mlkd", **{**ls_settings("mlkd", "resnet32x4", "resnet8x4"), "standardize_levels": "all"})
    assert abs(total(every(sw, tw, y, ctx(extra_logits={"strong": (ss, ts)}))).item() - got.item()) > 1e-3


# -- CLKD: the default (methods.md 3.2's equations + StreamLined L_cc) and the StreamLined code exactly ---
def unit_rows(z):
    return torch.stack([row / torch.sqrt((row * row).sum()) for row in z])


def clkd_ref(zs, zt, y, per_vector):
    """lambda CE + mu (L_ins + beta L_cla) + nu L_cc with L_cc = ||M^s - M^t||_F / C^2, M = Z_c^T Z_c / (C - 1).
    ``per_vector``: L_ins, L_cla as methods.md 3.2 writes them (squared distance of each unit row / column,
    averaged over rows / columns); otherwise the StreamLined code's F.mse_loss, an element mean."""
    n, c = zs.shape

    def dist(a, b):
        sq = (unit_rows(a) - unit_rows(b)) ** 2
        return sq.sum(1).mean() if per_vector else sq.sum() / sq.numel()

    def m(z):
        d = z - z.mean(0, keepdim=True)
        return d.t() @ d / (c - 1)
    cc = torch.sqrt(((m(zs) - m(zt)) ** 2).sum()) / c**2
    return 0.1 * ce(zs, y) + 0.5 * (dist(zs, zt) + 2.0 * dist(zs.t(), zt.t())) + 0.4 * cc


def clkd_grad(zs, zt, y, per_vector):
    """The same loss's gradient by hand: d||u - t||^2/dz = -2/||z|| (t - (u.t) u) per row / column,
    (softmax - onehot)/B for the CE, and 2 Z_c D / ((C - 1) ||D||_F C^2) for L_cc (D = M^s - M^t)."""
    n, c = zs.shape

    def rows(z, t):
        norm = z.norm(dim=1, keepdim=True)
        u, v = z / norm, t / t.norm(dim=1, keepdim=True)
        return -2 / norm * (v - (u * v).sum(1, keepdim=True) * u)
    ins = rows(zs, zt) / (n if per_vector else n * c)
    cla = rows(zs.t(), zt.t()).t() / (c if per_vector else c * n)
    g_ce = (softmax(zs) - F.one_hot(y, c).double()) / n
    ds, dt = zs - zs.mean(0), zt - zt.mean(0)
    d = (ds.t() @ ds - dt.t() @ dt) / (c - 1)
    g_cc = 2 * ds @ d / ((c - 1) * d.norm() * c**2)
    return 0.1 * g_ce + 0.5 * (ins + 2.0 * cla) + 0.4 * g_cc


def test_clkd_default_hyperparameters():
    hp = build("clkd").hparams
    assert (hp["variant"], hp["normalization"], hp["corr"]) == ("streamlined", "vector_sum", "cov")
    assert (hp["ce_weight"], hp["kd_weight"], hp["cla_weight"], hp["cc_weight"]) == (0.1, 0.5, 2.0, 0.4)


@pytest.mark.parametrize("hp,per_vector", [({}, True),  # the default: methods.md's equations
                                           ({"variant": "streamlined", "normalization": "element_mean"}, False)],
                         ids=["default-vector_sum", "streamlined-code-element_mean"])
def test_clkd_equals_its_restatement_value_and_gradient(hp, per_vector):
    m = build("clkd", **hp)
    assert total(m(S, T, Y, ctx())).item() == pytest.approx(clkd_ref(S, T, Y, per_vector).item(), rel=1e-12)
    autograd = grad_of(lambda z: total(m(z, T, Y, ctx())), S)
    torch.testing.assert_close(autograd, grad_of(lambda z: clkd_ref(z, T, Y, per_vector), S), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(autograd, clkd_grad(S, T, Y, per_vector), rtol=1e-9, atol=1e-12)


def test_clkd_element_mean_divides_the_terms_by_c_and_b():
    """The two normalisations differ exactly by the factors the chapter names (C for L_ins, B for L_cla)."""
    a, b = build("clkd")(S, T, Y, ctx()), build("clkd", normalization="element_mean")(S, T, Y, ctx())
    assert a["loss_ins"].item() == pytest.approx(C * b["loss_ins"].item(), rel=1e-12)
    assert a["loss_cla"].item() == pytest.approx(B * b["loss_cla"].item(), rel=1e-12)
    assert (a["loss_ce"].item(), a["loss_cc"].item()) == (b["loss_ce"].item(), b["loss_cc"].item())


def test_clkd_streamlined_cc_is_finite_where_student_and_teacher_agree():
    # the unsquared norm is finite with a zero gradient where student and teacher agree
    z = T.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L.streamlined_correlation_loss(z, T), z)
    assert torch.isfinite(g).all()
    with pytest.raises(KDLibError, match="variant='recon'"):
        build("clkd", corr="gram")


def test_clkd_streamlined_is_small_where_the_recon_term_dominates():
    """The failure the issue reports: on logits of CIFAR scale the recon L_cc dwarfs the CE."""
    zs, zt, y = logits(8, scale=1.0, b=64, c=100), logits(9, scale=6.0, b=64, c=100), labels(10, 64, 100)
    recon = build("clkd", variant="recon")(zs, zt, y, ctx())
    new = build("clkd")(zs, zt, y, ctx())
    assert recon["loss_cc"] > 10 * recon["loss_ce"]
    assert new["loss_cc"] < new["loss_ce"]


# -- bad hyperparameters ----------------------------------------------------------------------------
BAD = [("dist", {"kd_weight": -1.0}), ("dist", {"beta": -0.1}), ("dist", {"temperature": 0.0}),
       ("nkd", {"gamma": -1.0}), ("nkd", {"temperature": -3.0}), ("nkd", {"ce_weight": -1}),
       ("ctkd", {"t_start": 0.0, "t_end": 0.0}), ("ctkd", {"kd_weight": -0.9}), ("ctkd", {"t_end": -1.0}),
       ("ctkd", {"ramp_epochs": 2.5}), ("mlkd", {"variant": "both"}), ("mlkd", {"kd_weight": -1.0}),
       ("kd", {"standardize": "yes"}), ("dkd", {"standardize": 1}), ("clkd", {"variant": "squared"})]


@pytest.mark.parametrize("method,hp", BAD, ids=[f"{m}-{next(iter(h))}" for m, h in BAD])
def test_bad_hyperparameters_are_refused_before_training(method, hp):
    with pytest.raises(KDLibError) as err:
        make_config("smoke", method=method, method_params=hp)
    assert "\n" not in str(err.value)


# -- MLKD's strong augmentation -------------------------------------------------------------------
IMAGES = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_strong_augment_is_reproducible_uint8_and_changes_the_images():
    a = augment.strong_augment(IMAGES, torch.Generator().manual_seed(1))
    b = augment.strong_augment(IMAGES, torch.Generator().manual_seed(1))
    c = augment.strong_augment(IMAGES, torch.Generator().manual_seed(2))
    assert a.dtype == torch.uint8 and a.shape == IMAGES.shape
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, IMAGES)
    with pytest.raises(KDLibError, match="uint8"):
        augment.strong_augment(IMAGES.float(), torch.Generator())


@pytest.mark.parametrize("name,fn", [("Brightness", TF.adjust_brightness), ("Color", TF.adjust_saturation),
                                     ("Contrast", TF.adjust_contrast), ("Sharpness", TF.adjust_sharpness)])
def test_batched_enhancements_equal_torchvision_per_image(name, fn):
    v = torch.linspace(0.05, 0.95, len(IMAGES), dtype=torch.float64)
    expected = torch.stack([fn(IMAGES[i], float(v[i])) for i in range(len(IMAGES))])
    assert torch.equal(augment.apply_op(name, IMAGES, v), expected)


def test_geometric_ops_follow_pil_conventions():
    zero = torch.zeros(len(IMAGES), dtype=torch.float64)
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert torch.equal(augment.apply_op(name, IMAGES, zero), IMAGES), name
    # TranslateX by +1/32 of the width: output column x reads input column x + 1, last column black
    moved = augment.apply_op("TranslateX", IMAGES, torch.full((len(IMAGES),), 1 / 32, dtype=torch.float64))
    assert torch.equal(moved[..., :-1], IMAGES[..., 1:]) and (moved[..., -1] == 0).all()
    # a 90 degree rotation (counter-clockwise, as PIL) equals torch.rot90 on a square image
    rot = augment.apply_op("Rotate", IMAGES, torch.full((len(IMAGES),), 90.0, dtype=torch.float64))
    assert torch.equal(rot, torch.rot90(IMAGES, 1, dims=(2, 3)))
    post = augment.apply_op("Posterize", IMAGES, torch.full((len(IMAGES),), 4.7, dtype=torch.float64))
    assert torch.equal(post, IMAGES & 0xF0)
    sol = augment.apply_op("Solarize", IMAGES, torch.full((len(IMAGES),), 128.0, dtype=torch.float64))
    assert torch.equal(sol, torch.where(IMAGES >= 128, 255 - IMAGES, IMAGES))


def test_cutout_square_position_and_fill():
    side, ux, uy = torch.tensor([8.0]), torch.tensor([1.0]), torch.tensor([0.0])  # centre x = 1, y = 32
    out = augment.cutout(IMAGES[:1], side, ux, uy)
    # x0 = int(max(0, 1 - 4)) = 0, x1 = 8; y0 = int(32 - 4) = 28, y1 = min(32, 36) = 32; both ends filled
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[28:, 0:9] = True
    fill = torch.tensor(augment.CUTOUT_FILL, dtype=torch.uint8).view(3, 1)
    assert torch.equal(out[0][:, box], fill.expand(3, int(box.sum())))
    assert torch.equal(out[0][:, ~box], IMAGES[0][:, ~box])
    assert torch.equal(augment.cutout(IMAGES[:1], torch.tensor([0.0]), ux, uy), IMAGES[:1])


# -- through the engine ---------------------------------------------------------------------------
def test_ctkd_and_mlkd_train_through_the_engine(tiny_config, tmp_path):
    """CTKD's temperature is recorded per epoch and follows its reversal schedule's start; MLKD's strong
    view reaches the method (its terms are finite) and the recipe lr is recorded in the run."""
    cfg = tiny_config(method="ctkd", epochs=2)
    metrics = engine.train(cfg, progress=False, verbose=False)
    rows = [r["method"] for r in metrics["history"]]
    assert [r["reversal"] for r in rows] == pytest.approx([L.ctkd_reversal(1, 10), L.ctkd_reversal(2, 10)])
    assert all(1.0 < r["temperature"] < 21.0 for r in rows)
    metrics = engine.train(tiny_config(method="mlkd", epochs=1, out=str(tmp_path / "mlkd")), progress=False, verbose=False)
    row = metrics["history"][0]
    assert all(np.isfinite(row[k]) for k in ("loss_ce", "loss_kd", "loss_cc", "loss_bc"))
    assert metrics["config"]["run"]["lr"] == 0.025 and metrics["config"]["method"]["recipe"] == {"lr": 0.025}
