"""The registered methods: defaults, validation, neutral settings, state, setup hooks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlib import losses as L
from kdlib.errors import KDLibError
from kdlib.methods import build, names
from kdlib.methods.base import SetupContext, StepContext
from kdlib.methods.dkd import PER_PAIR_BETA, default_beta

B, C = 12, 10


def logits(seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g) * scale).to(dtype)


def labels(seed):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


def step(epoch=1, indices=None):
    return StepContext(epoch=epoch, step=0, steps_per_epoch=1, epochs=240, indices=indices)


def total(terms):
    return sum(terms.values())


S, T_, Y = logits(0), logits(1), labels(0)


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert set(names()) == {"vanilla", "kd", "dkd", "cwkd", "clkd", "rekd", "aekt", "dlkd", "dist", "nkd",
                            "ctkd", "mlkd"}
    with pytest.raises(KDLibError, match="unknown method 'dkdd'.*valid methods"):
        build("dkdd")
    with pytest.raises(KDLibError, match="no hyperparameter 'gamma'"):
        build("dkd", gamma=1.0)


def test_defaults_follow_methods_md():
    assert build("dkd").hparams == {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                    "warmup": 20, "standardize": False}
    rekd = build("rekd").hparams
    assert (rekd["k"], rekd["alpha"], rekd["beta"], rekd["temperature"], rekd["warmup"], rekd["ce_weight"],
            rekd["topk_source"], rekd["include_binary_term"]) == (3, 1.0, 8.0, 4.0, 20, 1.0, "student", False)
    clkd = build("clkd").hparams
    assert (clkd["ce_weight"], clkd["kd_weight"], clkd["cla_weight"], clkd["cc_weight"], clkd["corr"],
            clkd["variant"], clkd["normalization"]) == (0.1, 0.5, 2.0, 0.4, "cov", "streamlined", "vector_sum")
    cwkd = build("cwkd").hparams
    assert (cwkd["temperature"], cwkd["ce_weight"], cwkd["kd_weight"], cwkd["num_hard"], cwkd["gamma_h"]) == \
        (4.0, 0.1, 0.9, 10, 1.0)
    dlkd = build("dlkd").hparams
    assert (dlkd["pruning_ratio"], dlkd["quantile"], dlkd["t_low"], dlkd["t_mid"], dlkd["t_high"]) == \
        (0.1, 0.2, 2.0, 4.0, 6.0)


INVALID = [
    ("kd", {"temperature": 0}), ("dkd", {"temperature": -1.0}), ("dkd", {"beta": -1.0}),
    ("dkd", {"warmup": -1}), ("dkd", {"temperature": "4"}), ("kd", {"ce_weight": None}),
    ("cwkd", {"gamma_h": -0.5}), ("cwkd", {"num_hard": 0}), ("cwkd", {"num_hard": 2.5}),
    ("cwkd", {"num_hard": True}), ("cwkd", {"rule": "median"}), ("cwkd", {"statistic": "loss"}),
    ("cwkd", {"weighting": "hard"}), ("cwkd", {"rho": 0}), ("cwkd", {"normalize": "yes"}),
    ("clkd", {"corr": "pearson"}), ("clkd", {"cc_weight": -0.1}), ("clkd", {"normalization": "sum"}),
    ("rekd", {"k": 0}), ("rekd", {"k": 1.5}), ("rekd", {"k": "3"}), ("rekd", {"topk_source": "label"}),
    ("rekd", {"temperature": 0.0}), ("rekd", {"alpha": -1.0}), ("aekt", {"weight_mode": "inverse"}),
    ("aekt", {"r_min": 5.0, "r_max": 1.0}), ("aekt", {"r_max": float("inf")}), ("aekt", {"r_min": -1.0}),
    ("aekt", {"separate": "parallel"}), ("aekt", {"separate": "both"}), ("aekt", {"num_classes": 1}),
    ("aekt", {"temperature": 0}), ("dlkd", {"pruning_ratio": 1.0}), ("dlkd", {"pruning_ratio": -0.1}),
    ("dlkd", {"quantile": 0.0}), ("dlkd", {"quantile": 0.6}), ("dlkd", {"mode": "steps"}),
    ("dlkd", {"direction": "up"}), ("dlkd", {"pruning": "random"}), ("dlkd", {"t_high": 0.0}),
    ("dlkd", {"t_min": 7.0, "t_max": 6.0}), ("dlkd", {"tau_d": -1.0}),
]


@pytest.mark.parametrize("method,hp", INVALID, ids=[f"{m}-{next(iter(h))}" for m, h in INVALID])
def test_invalid_hyperparameters_raise(method, hp):
    with pytest.raises(KDLibError):
        build(method, **hp)


def test_class_count_is_checked_when_known():
    with pytest.raises(KDLibError, match="k must be < the number of classes"):
        build("rekd", k=C)(S, T_, Y, step())
    with pytest.raises(KDLibError, match="num_hard must be < the number of classes"):
        build("cwkd", num_hard=C)(S, T_, Y, step())
    with pytest.raises(KDLibError, match="serial layer has 100 classes"):
        build("aekt")(S, T_, Y, step())


# -- DKD ----------------------------------------------------------------------------------------------
def test_dkd_terms_and_warmup():
    m = build("dkd", beta=6.0)
    for epoch, w in [(1, 1 / 20), (10, 0.5), (20, 1.0), (200, 1.0)]:
        terms = m(S, T_, Y, step(epoch))
        assert set(terms) == {"loss_ce", "loss_tckd", "loss_nckd"}
        torch.testing.assert_close(terms["loss_tckd"] + terms["loss_nckd"],
                                   w * L.dkd_loss(S, T_, Y, 1.0, 6.0, 4.0))
        torch.testing.assert_close(terms["loss_nckd"], w * 6.0 * L.nckd_loss(S, T_, Y, 4.0))
        torch.testing.assert_close(terms["loss_ce"], F.cross_entropy(S, Y))
    assert build("dkd", warmup=0)(S, T_, Y, step(1))["loss_nckd"] == pytest.approx(
        8.0 * L.nckd_loss(S, T_, Y, 4.0).item(), rel=1e-6)


def test_dkd_per_pair_beta():
    assert default_beta("resnet56", "resnet20") == 2.0
    assert default_beta("resnet110", "resnet32") == 2.0
    assert default_beta("wrn_40_2", "wrn_16_2") == 6.0
    assert default_beta("vgg13", "MobileNetV2") == 6.0
    assert default_beta("resnet32x4", "ShuffleV2") == 8.0
    assert default_beta("ResNet50", "MobileNetV2") == 8.0
    assert default_beta("resnet32x4", "wrn_16_2") == 8.0  # not tuned by the authors: DKD's default
    assert len(PER_PAIR_BETA) == 11


# -- CWKD ---------------------------------------------------------------------------------------------
def cwkd_hard_set_weights(z, y, num_hard):
    """Default CWKD's per-sample weights, computed here from its definition: the ``num_hard`` seen classes
    of lowest training accuracy (ties to the lower class) count twice, normalised to a batch mean of 1."""
    correct = (z.argmax(dim=1) == y).double()
    seen = sorted(set(y.tolist()))
    accuracy = {c: correct[y == c].mean().item() for c in seen}
    hard = sorted(seen, key=lambda c: (accuracy[c], c))[:num_hard]
    w = torch.tensor([2.0 if c in hard else 1.0 for c in y.tolist()])
    return w / w.mean(), hard


def test_cwkd_is_kd_with_gamma_zero_and_in_epoch_one_then_weights_its_hard_classes():
    kd = build("kd")
    w, hard = cwkd_hard_set_weights(S, Y, num_hard=3)
    assert 0 < int(sum(w > 1)) < len(Y)  # the batch holds hard and easy samples: the weights matter
    for hp in ({"gamma_h": 0.0}, {"gamma_h": 0.0, "weighting": "soft", "apply_to_ce": True}, {}):
        m = build("cwkd", num_hard=3, **hp)
        for epoch in (1, 2, 3):
            a, b = m(S, T_, Y, step(epoch)), kd(S, T_, Y, step(epoch))
            torch.testing.assert_close(a["loss_ce"], b["loss_ce"])  # CE is never weighted by default
            if hp or epoch == 1:
                torch.testing.assert_close(a["loss_kd"], b["loss_kd"])
            else:  # defaults from epoch 2: the hard set of the epoch before (same batch) weighs twice
                expected = 0.9 * (w * L.kl_divergence(S, T_, 4.0) * 16.0).mean()
                torch.testing.assert_close(a["loss_kd"], expected)
                assert not torch.allclose(a["loss_kd"], b["loss_kd"])
                assert m.end_epoch(epoch)["hard_classes"] == hard
                continue
            m.end_epoch(epoch)


def test_the_cwkd_default_check_fails_when_hard_classes_are_not_weighted(monkeypatch):
    from kdlib.methods.cwkd import CWKD

    monkeypatch.setattr(CWKD, "_refresh", lambda self, stat, valid: None)  # the hard set is never found
    with pytest.raises(AssertionError):
        test_cwkd_is_kd_with_gamma_zero_and_in_epoch_one_then_weights_its_hard_classes()


def crafted_batch(wrong_class=3):
    """Every class twice; the student is right on all but ``wrong_class`` (and half of class 7)."""
    y = torch.arange(C).repeat(2)
    z = torch.full((2 * C, C), -2.0)
    z[torch.arange(2 * C), y] = 2.0
    z[y == wrong_class] = torch.roll(z[y == wrong_class], 1, dims=1)
    z[torch.nonzero(y == 7)[0]] = torch.roll(z[torch.nonzero(y == 7)[0]], 1, dims=1)
    return z, y


def test_cwkd_always_wrong_class_becomes_hard_and_is_weighted():
    m = build("cwkd", num_hard=1, gamma_h=1.0)
    z, y = crafted_batch()
    t = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        m(z, t, y, step(1))
    facts = m.end_epoch(1)
    assert facts["hard_classes"] == [3]
    expected = [1.0] * C
    expected[3], expected[7] = 0.0, 0.5
    assert facts["class_stat"] == pytest.approx(expected)
    out = m(z, t, y, step(2))
    w = torch.where(y == 3, 2.0, 1.0)
    w = w / w.mean()
    kl = L.kl_divergence(z, t, 4.0) * 16.0
    torch.testing.assert_close(out["loss_kd"], 0.9 * (w * kl).mean())
    torch.testing.assert_close(out["loss_ce"], 0.1 * F.cross_entropy(z, y))
    m2 = build("cwkd", num_hard=2, rule="lowest_k")
    m2(z, t, y, step(1))
    assert m2.end_epoch(1)["hard_classes"] == [3, 7]


def test_cwkd_rules_weightings_and_statistics():
    z, y = crafted_batch()
    t = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    m = build("cwkd", rule="below_mean_std", weighting="soft", rho=2.0, gamma_h=1.5, normalize=False,
              apply_to_ce=True)
    m(z, t, y, step(1))
    acc = np.ones(C)
    acc[3], acc[7] = 0.0, 0.5
    facts = m.end_epoch(1)
    assert facts["hard_classes"] == [int(c) for c in np.nonzero(acc < acc.mean() - acc.std())[0]] == [3, 7]
    soft = (1 - acc) ** 2
    soft = soft / soft.mean()
    w = torch.tensor(1.0 + 1.5 * soft[y.numpy()], dtype=torch.float32)
    out = m(z, t, y, step(2))
    torch.testing.assert_close(out["loss_kd"], 0.9 * (w * L.kl_divergence(z, t, 4.0) * 16).mean())
    torch.testing.assert_close(out["loss_ce"], 0.1 * (w * F.cross_entropy(z, y, reduction="none")).mean())
    p = build("cwkd", statistic="student_target_prob", num_hard=1)
    p(z, t, y, step(1))
    facts = p.end_epoch(1)
    probs = F.softmax(z, 1)[torch.arange(2 * C), y]
    ref = [float(probs[y == c].mean()) for c in range(C)]
    assert facts["class_stat"] == pytest.approx(ref, rel=1e-6)
    assert facts["hard_classes"] == [int(np.argmin(ref))]


def test_cwkd_teacher_accuracy_statistic_from_setup():
    y = torch.arange(C).repeat(3)
    images = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    teacher_logits = F.one_hot(y, C).float()
    teacher_logits[y == 5] = F.one_hot(torch.full((3,), 6), C).float()  # the teacher misses class 5
    ctx = SetupContext(num_classes=C, student=nn.Identity(), teacher=nn.Identity(), train_images=images,
                       train_labels=y, predict=lambda model, imgs: teacher_logits)
    m = build("cwkd", statistic="teacher_acc", num_hard=1)
    facts = m.setup(ctx)
    assert facts["hard_classes"] == [5]
    assert m.end_epoch(1)["hard_classes"] == [5]  # static


def test_cwkd_state_dict_round_trip():
    m = build("cwkd", num_hard=2)
    z, y = crafted_batch()
    t = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    m(z, t, y, step(1))
    m.end_epoch(1)
    m(z[:7], t[:7], y[:7], step(2))  # half an epoch of counts
    state = {k: v.clone() for k, v in m.state_dict().items()}
    fresh = build("cwkd", num_hard=2)
    fresh.load_state_dict(state)
    for key, value in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.seen.sum().item() == 7
    torch.testing.assert_close(total(fresh(z, t, y, step(2))), total(m(z, t, y, step(2))))
    assert fresh.end_epoch(2) == m.end_epoch(2)


# -- CLKD ---------------------------------------------------------------------------------------------
def test_clkd_terms():
    m = build("clkd", variant="recon")
    terms = m(S, T_, Y, step())
    torch.testing.assert_close(terms["loss_ins"], 0.5 * L.clkd_instance_loss(S, T_, "vector_sum"))
    torch.testing.assert_close(terms["loss_cla"], 0.5 * 2.0 * L.clkd_class_loss(S, T_, "vector_sum"))
    torch.testing.assert_close(terms["loss_cc"], 0.4 * L.class_correlation_loss(S, T_, "cov"))
    torch.testing.assert_close(terms["loss_ce"], 0.1 * F.cross_entropy(S, Y))
    gram = build("clkd", variant="recon", corr="gram", normalization="element_mean")(S, T_, Y, step())
    torch.testing.assert_close(gram["loss_cc"], 0.4 * L.class_correlation_loss(S, T_, "gram"))
    torch.testing.assert_close(gram["loss_ins"], 0.5 * L.clkd_instance_loss(S, T_, "element_mean"))


# -- ReKD ---------------------------------------------------------------------------------------------
def test_rekd_terms_and_binary_switch():
    m = build("rekd", k=2, topk_source="teacher", include_binary_term=True)
    terms = m(S, T_, Y, step(10))
    assert set(terms) == {"loss_ce", "loss_tisd", "loss_ntid", "loss_binary"}
    torch.testing.assert_close(terms["loss_tisd"] + terms["loss_ntid"] + terms["loss_binary"],
                               0.5 * L.rekd_loss(S, T_, 2, 1.0, 8.0, 4.0, "teacher", True))
    assert "loss_binary" not in build("rekd")(S, T_, Y, step())


# -- AEKT ---------------------------------------------------------------------------------------------
def test_aekt_layer_is_identity_and_registered():
    m = build("aekt", num_classes=C)
    torch.testing.assert_close(m.serial(S), S)
    params = dict(m.named_parameters())
    assert set(params) == {"serial.delta.weight", "serial.delta.bias"}
    assert params["serial.delta.weight"].shape == (C, C)
    assert "serial.delta.weight" in m.state_dict()
    torch.testing.assert_close(m.serial.weight, torch.eye(C))  # W = I + sV starts as the identity
    with torch.no_grad():
        params["serial.delta.weight"].normal_()
    torch.testing.assert_close(m.serial(S), S @ m.serial.weight.T + m.serial.bias)
    assert list(build("aekt", separate="none").parameters()) == []


def test_aekt_neutral_settings_equal_dkd():
    aekt = build("aekt", weight_mode="none", separate="none")
    dkd = build("dkd")
    for epoch in (1, 25):
        torch.testing.assert_close(total(aekt(S, T_, Y, step(epoch))), total(dkd(S, T_, Y, step(epoch))))
    # the serial layer at its initial identity gives the same numbers too
    serial = build("aekt", weight_mode="none", num_classes=C)
    torch.testing.assert_close(total(serial(S, T_, Y, step(5))), total(dkd(S, T_, Y, step(5))))


def test_aekt_distils_through_the_serial_layer_and_summarises_r():
    m = build("aekt", num_classes=C, r_max=3.0).double()
    with torch.no_grad():
        m.serial.delta.weight.add_(0.1 * torch.randn(C, C, generator=torch.Generator().manual_seed(8),
                                               dtype=torch.float64))
    s, t = S.double(), T_.double()
    z_kd = m.serial(s)
    terms = m(s, t, Y, step(20))
    r = L.adaptive_weight(z_kd, t, Y, 4.0, "ratio", 0.0, 3.0)
    torch.testing.assert_close(terms["loss_explicit"], L.aekt_explicit_loss(z_kd, t, Y, 4.0, r))
    torch.testing.assert_close(terms["loss_implicit"], 8.0 * L.nckd_loss(z_kd, t, Y, 4.0))
    torch.testing.assert_close(terms["loss_ce"], F.cross_entropy(s, Y))  # CE on z_cls
    total(terms).backward()
    assert m.serial.delta.weight.grad is not None and m.serial.delta.weight.grad.abs().sum() > 0
    m(s[:5], t[:5], Y[:5], step(20))
    rs = torch.cat([r, L.adaptive_weight(m.serial(s[:5]), t[:5], Y[:5], 4.0, "ratio", 0.0, 3.0)]).detach()
    facts = m.end_epoch(20)
    q = np.quantile(rs.numpy(), [0.1, 0.5, 0.9])
    assert facts["r_mean"] == pytest.approx(rs.mean().item(), rel=1e-6)
    assert [facts["r_q10"], facts["r_q50"], facts["r_q90"]] == pytest.approx(q.tolist(), rel=1e-5)
    assert facts["r_at_max"] == pytest.approx((rs >= 3.0).double().mean().item())
    art = m.artifacts()
    assert art["serial_weight"].shape == (C, C) and art["r_last_epoch"].shape == (B + 5,)


def test_aekt_setup_resizes_layer_for_the_dataset():
    m = build("aekt")
    ctx = SetupContext(num_classes=C, student=nn.Identity(), teacher=nn.Identity(),
                       train_images=torch.zeros(1, 3, 32, 32, dtype=torch.uint8), train_labels=Y[:1],
                       predict=lambda model, imgs: None)
    assert m.setup(ctx) == {"serial_layer_classes": C}
    torch.testing.assert_close(m.serial(S), S)


def test_method_gradients_match_gradcheck():
    """Each method's summed loss is differentiable w.r.t. the student logits (float64 gradcheck)."""
    s, t = S[:4].double(), T_[:4].double()
    y = Y[:4]
    dlkd = build("dlkd")
    dlkd.temperature = torch.tensor([2.0, 4.0, 6.0, 4.0], dtype=torch.float64)
    cases = {"kd": build("kd"), "dkd": build("dkd"), "cwkd": build("cwkd", num_hard=2),
             "clkd": build("clkd"), "rekd": build("rekd", include_binary_term=True),
             "aekt": build("aekt", num_classes=C, r_min=1.5, r_max=1.5).double(), "dlkd": dlkd}
    for name, m in cases.items():
        fn = lambda z, m=m: total(m(z, t, y, step(5, torch.arange(4))))
        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(True),), eps=1e-6, atol=1e-7), name


# -- DLKD ---------------------------------------------------------------------------------------------
def tiny_teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, C))


def predict(model, images):
    with torch.no_grad():
        return model.eval()(images.float() / 255.0)


def dlkd_ctx(teacher, n=40):
    g = torch.Generator().manual_seed(9)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return SetupContext(num_classes=C, student=nn.Identity(), teacher=teacher, train_images=images,
                        train_labels=torch.randint(0, C, (n,), generator=g), predict=predict)


def np_prune(teacher, ratio, global_):
    """Independent magnitude pruning: zero the round(ratio * n) smallest |w| per layer or overall."""
    import copy
    model = copy.deepcopy(teacher)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = [m.weight.detach().numpy().copy() for m in layers]
    if global_:
        flat = np.concatenate([np.abs(w).ravel() for w in weights])
        cut = np.sort(flat)[int(round(ratio * flat.size)) - 1]
        weights = [np.where(np.abs(w) <= cut, 0.0, w) for w in weights]
    else:
        out = []
        for w in weights:
            cut = np.sort(np.abs(w).ravel())[int(round(ratio * w.size)) - 1]
            out.append(np.where(np.abs(w) <= cut, 0.0, w))
        weights = out
    with torch.no_grad():
        for m, w in zip(layers, weights):
            m.weight.copy_(torch.from_numpy(w.astype(np.float32)))
    return model


def np_difficulty(teacher, pruned, images):
    def sm(x):
        x = x.numpy().astype(np.float64)
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    return np.linalg.norm(sm(predict(teacher, images)) - sm(predict(pruned, images)), axis=1)


@pytest.mark.parametrize("pruning", ["layerwise", "global"])
def test_dlkd_setup_difficulty_and_levels(pruning):
    teacher = tiny_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ctx = dlkd_ctx(teacher)
    m = build("dlkd", pruning_ratio=0.3, pruning=pruning, quantile=0.25)
    facts = m.setup(ctx)
    for k, v in teacher.state_dict().items():  # the teacher itself is untouched
        assert torch.equal(v, before[k])
    d = np_difficulty(teacher, np_prune(teacher, 0.3, pruning == "global"), ctx.train_images)
    assert d.min() > 0
    np.testing.assert_allclose(m.difficulty.numpy(), d, rtol=1e-4, atol=1e-7)
    lo, hi = np.quantile(m.difficulty.numpy(), [0.25, 0.75])
    expected = np.where(m.difficulty.numpy() < lo, 2.0, np.where(m.difficulty.numpy() > hi, 6.0, 4.0))
    np.testing.assert_array_equal(m.temperature.numpy(), expected)
    assert facts["thresholds"] == pytest.approx([lo, hi], rel=1e-6)
    assert facts["n_easy"] == facts["n_hard"] == 10
    assert facts["difficulty_mean"] == pytest.approx(d.mean(), rel=1e-4)
    art = m.artifacts()
    np.testing.assert_array_equal(art["temperature"], expected)
    # forward looks the temperatures up by dataset index
    idx = torch.tensor([3, 0, 17, 39, 8, 21, 5, 11, 30, 2, 14, 27])
    terms = m(S, T_, Y, step(1, idx))
    torch.testing.assert_close(terms["loss_kd"],
                               0.9 * L.kd_loss_per_sample_temperature(S, T_, m.temperature[idx]))
    # inverse direction and continuous mode
    inv = build("dlkd", pruning_ratio=0.3, pruning=pruning, quantile=0.25, direction="inverse")
    inv.setup(ctx)
    np.testing.assert_array_equal(inv.temperature.numpy(), 8.0 - expected)
    cont = build("dlkd", pruning_ratio=0.3, pruning=pruning, mode="continuous", t_min=1.0, t_max=5.0)
    cont.setup(ctx)
    rank = np.argsort(np.argsort(cont.difficulty.numpy(), kind="stable"), kind="stable")
    np.testing.assert_allclose(cont.temperature.numpy(), 1.0 + 4.0 * rank / (len(rank) - 1), rtol=1e-6)


def test_dlkd_prunes_a_channels_last_teacher():
    teacher = tiny_teacher()
    fast = tiny_teacher().to(memory_format=torch.channels_last)
    assert not fast[0].weight.is_contiguous()
    a, b = build("dlkd", pruning_ratio=0.3), build("dlkd", pruning_ratio=0.3, pruning="global")
    ref_a, ref_b = build("dlkd", pruning_ratio=0.3), build("dlkd", pruning_ratio=0.3, pruning="global")
    for m, ref in ((a, ref_a), (b, ref_b)):
        m.setup(dlkd_ctx(fast))
        ref.setup(dlkd_ctx(teacher))
        torch.testing.assert_close(m.difficulty, ref.difficulty, rtol=1e-4, atol=1e-6)
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)  # the teacher is untouched


def test_dlkd_equal_temperatures_is_kd_and_state_round_trip():
    ctx = dlkd_ctx(tiny_teacher())
    m = build("dlkd", t_low=4.0, t_mid=4.0, t_high=4.0)
    m.setup(ctx)
    idx = torch.arange(B)
    a, b = m(S, T_, Y, step(1, idx)), build("kd")(S, T_, Y, step(1))
    torch.testing.assert_close(a["loss_kd"], b["loss_kd"])
    torch.testing.assert_close(a["loss_ce"], b["loss_ce"])
    fresh = build("dlkd", t_low=4.0, t_mid=4.0, t_high=4.0)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.difficulty, m.difficulty) and torch.equal(fresh.temperature, m.temperature)
    with pytest.raises(KDLibError, match="indices"):
        m(S, T_, Y, step(1))
    with pytest.raises(KDLibError, match="setup"):
        build("dlkd")(S, T_, Y, step(1, idx))


# -- every method, any logits -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "dkd", "cwkd", "clkd", "rekd", "aekt", "dlkd"])
@pytest.mark.parametrize("temperature", [0.05, 4.0])
def test_terms_finite_for_extreme_logits(name, temperature):
    g = torch.Generator().manual_seed(10)
    s = ((torch.randint(0, 2, (B, C), generator=g).float() * 2 - 1) * 1e4).requires_grad_(True)
    t = (torch.randint(0, 2, (B, C), generator=g).float() * 2 - 1) * 1e4
    hp = {"kd": {"temperature": temperature}, "dkd": {"temperature": temperature},
          "cwkd": {"temperature": temperature, "num_hard": 2}, "clkd": {},
          "rekd": {"temperature": temperature, "include_binary_term": True},
          "aekt": {"temperature": temperature, "num_classes": C},
          "dlkd": {"t_low": temperature, "t_mid": temperature, "t_high": temperature}}[name]
    m = build(name, **hp)
    if name == "dlkd":
        m.setup(dlkd_ctx(tiny_teacher(), n=B))
    for epoch in (1, 2):
        terms = m(s, t, Y, step(epoch, torch.arange(B)))
        for key, value in terms.items():
            assert torch.isfinite(value), (key, value)
        (grad,) = torch.autograd.grad(total(terms), s)
        assert torch.isfinite(grad).all()
        m.end_epoch(epoch)


# -- warm-up ------------------------------------------------------------------------------------------
def test_warmup_is_the_papers_by_epoch_on_the_paper_profile():
    """W = 20 (the paper profile): exactly min(e / 20, 1) by epoch, at every step of the epoch."""
    from kdlib.methods.base import warmup_factor

    spe = 7
    for epoch in range(1, 26):
        for s in range(spe):
            ctx = StepContext(epoch=epoch, step=s, steps_per_epoch=spe, epochs=240)
            assert warmup_factor(ctx, 20) == min(epoch / 20, 1.0)
            t = warmup_factor(torch.tensor((epoch - 1) + (s + 1) / spe, dtype=torch.float32).reshape(()), 20)
            assert isinstance(t, torch.Tensor) and t.item() == pytest.approx(min(epoch / 20, 1.0))
        assert warmup_factor(epoch, 20) == min(epoch / 20, 1.0)  # the old call with an epoch number
    assert warmup_factor(StepContext(epoch=1, step=0, steps_per_epoch=5, epochs=6), 0) == 1.0


def test_scaled_warmup_ramps_per_step_in_short_runs():
    """The smoke recipe's 0.5-epoch warm-up: the weight grows step by step through the first epoch, float and
    tensor progress agree, and it reaches 1 (at the step that completes half an epoch)."""
    from kdlib.experiments import scaled_warmup
    from kdlib.methods.base import warmup_factor

    w = scaled_warmup(6)
    spe = 63  # 4000 smoke training images in batches of 64
    ctx = [StepContext(epoch=1, step=s, steps_per_epoch=spe, epochs=6) for s in range(spe)]
    f = [warmup_factor(c, w) for c in ctx]
    assert f[0] == pytest.approx(1 / (spe * w)) and f[0] < 1
    assert all(a < b for a, b in zip(f[:31], f[1:32]))  # strictly increasing until the ramp ends
    assert f[30] < 1 and f[31] == 1.0 and f[-1] == 1.0  # (31 + 1) / 63 > 0.5 >= 31 / 63
    tens = [warmup_factor(torch.tensor(c.epoch - 1 + (c.step + 1) / spe), w).item() for c in ctx]
    assert tens == pytest.approx(f)
    # a progress given by the engine (seam S1) wins over epoch and step
    class WithProgress:
        progress = 0.25
    assert warmup_factor(WithProgress(), w) == pytest.approx(0.5)


@pytest.mark.parametrize("method,kd_terms", [("dkd", ("loss_tckd", "loss_nckd")),
                                             ("rekd", ("loss_tisd", "loss_ntid")),
                                             ("aekt", ("loss_explicit", "loss_implicit"))])
def test_smoke_distillation_weight_ramps_in_the_first_epoch(method, kd_terms):
    """With the smoke profile's scaled warm-up the distillation terms are below full weight in epoch 1
    and at full weight from the step that completes the warm-up on (the ratio to a run without warm-up)."""
    from kdlib.experiments import scaled_warmup

    spe = 63
    extra = {"num_classes": C} if method == "aekt" else {}
    ramped = build(method, warmup=scaled_warmup(6), **extra)
    full = build(method, warmup=0, **extra)
    ramped.load_state_dict(full.state_dict())
    for s, expected in [(0, 1 / 31.5), (15, 16 / 31.5), (31, 1.0), (62, 1.0)]:
        ctx = StepContext(epoch=1, step=s, steps_per_epoch=spe, epochs=6)
        a, b = ramped(S, T_, Y, ctx), full(S, T_, Y, ctx)
        for name in kd_terms:
            assert name in a
            torch.testing.assert_close(a[name], expected * b[name])
        torch.testing.assert_close(a["loss_ce"], b["loss_ce"])
    ctx = StepContext(epoch=2, step=0, steps_per_epoch=spe, epochs=6)
    for name in kd_terms:
        torch.testing.assert_close(ramped(S, T_, Y, ctx)[name], full(S, T_, Y, ctx)[name])
