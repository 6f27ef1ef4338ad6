"""The self-checking exercises: right answers pass however they are written, each typical mistake gets its
own sentence, the untouched stub gets a clear message and never a traceback, and the grader raises.

Every correct variant below is written differently from kdlib (F.kl_div, the -1000 mask of the DKD
authors' code, loops, numpy), so a check that merely compared code paths would fail them.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlib import exercises, losses
from kdlib.exercises import core


# -- correct answers written another way ---------------------------------------------------------------
def kd_loss_kl_div(student_logits, teacher_logits, temperature):
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature * temperature


def kd_grad_by_hand(student_logits, teacher_logits, temperature):
    b = student_logits.shape[0]
    return (torch.softmax(student_logits / temperature, 1) - torch.softmax(teacher_logits / temperature, 1)) \
        * temperature / b


def nckd_minus_1000(student_logits, teacher_logits, targets, temperature):
    # the DKD authors' way: push the label's logit down by 1000 before the softmax
    gt = F.one_hot(targets, student_logits.shape[1]).float()
    log_s = F.log_softmax(student_logits / temperature - 1000.0 * gt, dim=1)
    p_t = F.softmax(teacher_logits / temperature - 1000.0 * gt, dim=1)
    return F.kl_div(log_s, p_t, reduction="sum") * temperature**2 / targets.shape[0]


def tckd_two_bins(student_logits, teacher_logits, targets, temperature):
    y = targets[:, None]
    p_s = F.softmax(student_logits / temperature, 1).gather(1, y).squeeze(1)
    p_t = F.softmax(teacher_logits / temperature, 1).gather(1, y).squeeze(1)
    b_s, b_t = torch.stack([p_s, 1 - p_s], 1), torch.stack([p_t, 1 - p_t], 1)
    return (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temperature**2


def cwkd_loop(student_logits, teacher_logits, targets, hard_classes, gamma, temperature):
    weights = torch.tensor([1.0 + gamma if int(y) in hard_classes else 1.0 for y in targets])
    weights = weights / weights.mean()
    per_sample = [kd_loss_kl_div(student_logits[i:i + 1], teacher_logits[i:i + 1], temperature)
                  for i in range(len(targets))]
    return sum(w * l for w, l in zip(weights, per_sample)) / len(targets)


def clkd_instance_norms(student_logits, teacher_logits):
    s = student_logits / student_logits.norm(dim=1, keepdim=True)
    t = teacher_logits / teacher_logits.norm(dim=1, keepdim=True)
    return ((s - t) ** 2).sum() / student_logits.shape[0]


def clkd_class_transposed(student_logits, teacher_logits):
    return clkd_instance_norms(student_logits.T, teacher_logits.T)


def tisd_gather(student_logits, teacher_logits, k, temperature):
    top = student_logits.topk(k, dim=1).indices
    s, t = student_logits.gather(1, top) / temperature, teacher_logits.gather(1, top) / temperature
    return kd_loss_kl_div(s * temperature, t * temperature, temperature)


def aekt_log_space(student_logits, teacher_logits, targets, temperature):
    with torch.no_grad():
        y = targets[:, None]
        log_ratio = (F.log_softmax(teacher_logits / temperature, 1).gather(1, y)
                     - F.log_softmax(student_logits / temperature, 1).gather(1, y)).squeeze(1)
        r = log_ratio.exp().clamp(max=10.0)
    return (r * tckd_two_bins(student_logits, teacher_logits, targets, temperature) * 0 + r *
            _tckd_per_sample(student_logits, teacher_logits, targets, temperature)).mean()


def _tckd_per_sample(student_logits, teacher_logits, targets, temperature):
    y = targets[:, None]
    p_s = F.softmax(student_logits / temperature, 1).gather(1, y).squeeze(1)
    p_t = F.softmax(teacher_logits / temperature, 1).gather(1, y).squeeze(1)
    return (p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()) * temperature**2


def dlkd_numpy(difficulty):
    d = difficulty.numpy()
    lo, hi = np.quantile(d, [0.2, 0.8])
    return torch.tensor(np.select([d < lo, d > hi], [2.0, 6.0], 4.0))


def dlkd_loop(student_logits, teacher_logits, temperatures):
    total = 0
    for i, t in enumerate(temperatures.tolist()):
        total = total + kd_loss_kl_div(student_logits[i:i + 1], teacher_logits[i:i + 1], t)
    return total / len(temperatures)


def standardize_var(logits):
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (torch.var(logits, dim=1, keepdim=True, unbiased=True).sqrt() + 1e-7)


def dist_intra_loop(student_logits, teacher_logits, temperature):
    ys, yt = F.softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1)
    rho = []
    for c in range(ys.shape[1]):  # one class at a time, with the DIST authors' eps on the norms' product
        a, b = ys[:, c] - ys[:, c].mean(), yt[:, c] - yt[:, c].mean()
        rho.append(torch.dot(a, b) / (a.norm() * b.norm() + 1e-8))
    return (1 - torch.stack(rho).mean()) * temperature**2


#: Student's t, 97.5 % quantile, from a printed table (df: value), not from kdlib's own t
T_TABLE = {1: 12.706205, 2: 4.302653, 3: 3.182446, 5: 2.570582, 9: 2.262157}


def paired_interval_numpy(method_acc, baseline_acc):
    d = np.asarray(method_acc, dtype=np.float64) - np.asarray(baseline_acc, dtype=np.float64)
    half = T_TABLE[len(d) - 1] * np.sqrt(((d - d.mean()) ** 2).sum() / (len(d) - 1) / len(d))
    return [d.mean() - half, d.mean() + half]


CORRECT = {"paired_interval": paired_interval_numpy, "kd_loss": kd_loss_kl_div, "kd_grad": kd_grad_by_hand, "nckd_loss": nckd_minus_1000,
           "tckd_loss": tckd_two_bins, "cwkd_kd_term": cwkd_loop, "clkd_instance_loss": clkd_instance_norms,
           "clkd_class_loss": clkd_class_transposed, "rekd_tisd": tisd_gather,
           "aekt_explicit_loss": aekt_log_space, "dlkd_temperatures": dlkd_numpy, "dlkd_kd_loss": dlkd_loop,
           "standardize": standardize_var, "dist_intra": dist_intra_loop}


def test_every_method_chapter_has_an_exercise():
    chapters = {e.chapter for e in exercises.EXERCISES.values()}
    assert {"kd", "dkd", "cwkd", "clkd", "rekd", "aekt", "dlkd", "logit_family"} <= chapters
    assert set(CORRECT) == set(exercises.names()), "every exercise needs a correct variant in this test"


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_answers_written_differently_pass(name):
    verdict = exercises.check(name, CORRECT[name])
    assert verdict.passed, verdict.message
    assert "agree with" in verdict.message
    for seed in (1, 7):  # the grader's hidden cases too, every part
        for part in exercises.get(name).parts:
            exercises.grade(name, CORRECT[name], part=part, seed=seed)


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_the_stub_fails_with_a_message_not_a_traceback(name):
    def untouched(**kwargs):
        # YOUR CODE HERE
        raise NotImplementedError()

    verdict = exercises.check(name, exercises.stub(name))
    assert not verdict.passed and verdict.message.startswith("Not done yet")
    assert "Traceback" not in str(verdict) and "NotImplementedError" in verdict.message
    assert not exercises.check(name, untouched).passed
    with pytest.raises(exercises.ExerciseFailed, match="Not done yet"):
        exercises.grade(name, exercises.stub(name), part=exercises.get(name).parts[0])


@pytest.mark.parametrize("name,mistake", [(e.name, m) for e in exercises.EXERCISES.values() for m in e.mistakes],
                         ids=lambda v: getattr(v, "name", v))
def test_each_known_mistake_gets_its_own_sentence(name, mistake):
    verdict = exercises.check(name, mistake.fn)
    assert not verdict.passed
    assert verdict.message.rstrip(".").lower() == mistake.sentence.rstrip(".").lower()


# -- the typical mistakes of the brief, written as a student writes them, and what the check says ---------
def kd_no_t2(student_logits, teacher_logits, temperature):
    return kd_loss_kl_div(student_logits, teacher_logits, temperature) / temperature**2


def kd_t_not_t2(student_logits, teacher_logits, temperature):
    return kd_loss_kl_div(student_logits, teacher_logits, temperature) / temperature


def kd_sum_over_batch(student_logits, teacher_logits, temperature):
    return kd_loss_kl_div(student_logits, teacher_logits, temperature) * student_logits.shape[0]


def kd_mean_reduction(student_logits, teacher_logits, temperature):
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    with warnings.catch_warnings():  # torch warns about reduction="mean": the mistake this test plants
        warnings.simplefilter("ignore")
        return F.kl_div(log_p_s, F.softmax(teacher_logits / temperature, 1), reduction="mean") * temperature**2


def kd_reverse(student_logits, teacher_logits, temperature):
    return kd_loss_kl_div(teacher_logits, student_logits, temperature)


def kd_dim0(student_logits, teacher_logits, temperature):
    log_p_s = F.log_softmax(student_logits / temperature, dim=0)
    return F.kl_div(log_p_s, F.softmax(teacher_logits / temperature, 0), reduction="batchmean") * temperature**2


def kd_per_sample_only(student_logits, teacher_logits, temperature):
    return losses.kd_per_sample(student_logits, teacher_logits, temperature)


def kd_item(student_logits, teacher_logits, temperature):
    return kd_loss_kl_div(student_logits, teacher_logits, temperature).item()


def kd_detached(student_logits, teacher_logits, temperature):
    return kd_loss_kl_div(student_logits.detach(), teacher_logits, temperature)


def kd_typo(student_logits, teacher_logits, temperature):
    p = F.softmax(student_logits / temperature, dim=1)
    return p.sum(dim=3)


def grad_t2(student_logits, teacher_logits, temperature):
    return kd_grad_by_hand(student_logits, teacher_logits, temperature) * temperature


def grad_no_batch_mean(student_logits, teacher_logits, temperature):
    return kd_grad_by_hand(student_logits, teacher_logits, temperature) * student_logits.shape[0]


def grad_wrong_sign(student_logits, teacher_logits, temperature):
    return -kd_grad_by_hand(student_logits, teacher_logits, temperature)


def nckd_label_leaks_into_gradient(student_logits, teacher_logits, targets, temperature):
    # the right value, plus a term worth 0 whose gradient reaches the label's logit
    label_logit = student_logits.gather(1, targets[:, None])
    return nckd_minus_1000(student_logits, teacher_logits, targets, temperature) \
        + 1e-2 * (label_logit - label_logit.detach()).sum()


def dlkd_kd_without_reshape(student_logits, teacher_logits, temperatures):
    log_p_s = F.log_softmax(student_logits / temperatures, dim=1)
    return log_p_s.sum()


def interval_welch(method_acc, baseline_acc):
    n = len(method_acc)
    half = T_TABLE[n - 1] * (method_acc.var() / n + baseline_acc.var() / n).sqrt()
    diff = method_acc.mean() - baseline_acc.mean()
    return diff - half, diff + half


def interval_all_runs_sd(method_acc, baseline_acc):
    d = method_acc - baseline_acc
    half = T_TABLE[len(d) - 1] * torch.cat([method_acc, baseline_acc]).std() / len(d) ** 0.5
    return d.mean() - half, d.mean() + half


def interval_z2(method_acc, baseline_acc):
    d = method_acc - baseline_acc
    half = 2 * d.std() / len(d) ** 0.5
    return torch.stack([d.mean() - half, d.mean() + half])


def interval_swapped(method_acc, baseline_acc):
    low, high = paired_interval_numpy(method_acc, baseline_acc)
    return high, low


INTERVAL_MISTAKES = [
    ("paired_interval", interval_welch, "each method's own spread over the seeds (an unpaired interval)"),
    ("paired_interval", interval_all_runs_sd, "the pooled standard deviation of both methods' accuracies, not that "
                                              "of the paired differences"),
    ("paired_interval", interval_z2, "you used a z of 2 instead of the t quantile with n − 1 degrees of freedom"),
    ("paired_interval", interval_swapped, "return (low, high)"),
]


@pytest.mark.parametrize("name,fn,expected", INTERVAL_MISTAKES, ids=lambda v: getattr(v, "__name__", None))
def test_noise_aware_verdict_mistakes_are_named(name, fn, expected):
    verdict = exercises.check(name, fn)
    assert not verdict.passed and expected.lower() in verdict.message.lower(), verdict.message


def test_the_interval_reference_is_the_paired_t_interval():
    """kdlib.stats' interval against one computed by hand: d = (1, 2, 3, 6), mean 3, sd √(14/3), t(3)."""
    case = core.Case({"method_acc": torch.tensor([51.0, 52.0, 53.0, 56.0], dtype=torch.float64),
                      "baseline_acc": torch.full((4,), 50.0, dtype=torch.float64)}, 4, 1, 1.0, counts="seeds")
    got = exercises.get("paired_interval").reference(**case.inputs)
    half = T_TABLE[3] * (14 / 3) ** 0.5 / 2
    assert torch.allclose(got, torch.tensor([3 - half, 3 + half], dtype=torch.float64), atol=1e-6)
    assert case.describe() == "4 seeds"


@pytest.mark.parametrize("name,fn,expected", [
    ("kd_loss", kd_no_t2, "Your loss is T² times too small: multiply the KL divergence by T²."),
    ("kd_loss", kd_t_not_t2, "Your loss is T times too small: multiply by T², not by T."),
    ("kd_loss", kd_sum_over_batch, "Your loss is B times too large (B the batch size): you summed over the batch"),
    ("kd_loss", kd_mean_reduction, "Your loss is C times too small (C the number of classes): you averaged over "
                                   "the classes too"),
    ("kd_loss", kd_reverse, "You computed KL(p^s ‖ p^t); KD uses KL(p^t ‖ p^s)"),
    ("kd_loss", kd_dim0, "Your softmax runs over the batch (dim=0)"),
    ("kd_loss", kd_per_sample_only, "Your loss has one value per sample (shape (8,)) but is one number, the batch "
                                    "mean: finish with .mean()."),
    ("kd_loss", kd_item, "Your function returns a float, not a torch tensor"),
    ("kd_loss", kd_detached, "Your loss does not depend on student_logits through autograd"),
    ("kd_loss", kd_typo, "Your function raised IndexError: Dimension out of range"),
    ("kd_grad", grad_t2, "Your gradient is T times too large: the loss's T² and the chain rule's 1/T (from z / T) "
                         "leave one factor T, not T²."),
    ("kd_grad", grad_no_batch_mean, "Your gradient is B times too large (B the batch size): the loss is a batch mean"),
    ("kd_grad", grad_wrong_sign, "Your gradient is of the wrong sign: it is p^s − p^t"),
    ("nckd_loss", nckd_label_leaks_into_gradient, "Your values are right but their gradient is not"),
    ("nckd_loss", nckd_label_leaks_into_gradient, "The gradient is wrong only for the label's column; e.g. at ["),
    ("dlkd_kd_loss", dlkd_kd_without_reshape, "reshape them to (B, 1) (temperatures[:, None])"),
])
def test_typical_mistakes_are_named(name, fn, expected):
    verdict = exercises.check(name, fn)
    assert not verdict.passed
    assert expected in verdict.message, verdict.message


def test_a_raising_answer_names_the_line_of_the_cell():
    verdict = exercises.check("kd_loss", kd_typo)
    assert "of your cell: `return p.sum(dim=3)`" in verdict.message


def test_a_gradient_wrong_in_some_classes_says_which():
    def nckd_grad_leaks(student_logits, teacher_logits, targets, temperature):
        return nckd_minus_1000(student_logits, teacher_logits, targets, temperature) \
            + 1e-2 * student_logits.gather(1, targets[:, None]).mean()

    verdict = exercises.check("nckd_loss", nckd_grad_leaks)
    assert not verdict.passed

    def grad_wrong_at_label(student_logits, teacher_logits, temperature):
        g = kd_grad_by_hand(student_logits, teacher_logits, temperature).clone()
        g[:, 0] = 0
        return g

    verdict = exercises.check("kd_grad", grad_wrong_at_label)
    assert "differs from kdlib's; e.g. at [" in verdict.message and "expected" in verdict.message

    def tisd_outside_too(student_logits, teacher_logits, k, temperature):
        return tisd_gather(student_logits, teacher_logits, k, temperature) + 1e-2 * (
            student_logits * ~losses.topk_mask(student_logits, teacher_logits, k)).sum()

    verdict = exercises.check("rekd_tisd", tisd_outside_too)
    assert not verdict.passed


def test_localisation_names_the_group_of_entries():
    def temps_wrong_for_hard(difficulty):
        t = dlkd_numpy(difficulty)
        return torch.where(t == 6.0, 5.0, t)

    verdict = exercises.check("dlkd_temperatures", temps_wrong_for_hard)
    assert "only for the hardest images (above the 80 % quantile)" in verdict.message, verdict.message


def test_grade_raises_with_the_sentence_and_uses_other_cases():
    with pytest.raises(exercises.ExerciseFailed, match=r"kd_loss \(values\): Your loss is T² times too small"):
        exercises.grade("kd_loss", kd_no_t2, part="values", seed=3)
    # the part "T = 1" passes a missing T² (partial marks), the others do not
    exercises.grade("kd_loss", kd_no_t2, part="T = 1", seed=3)
    visible = exercises.get("kd_loss").cases(core.CHECK_SEED)[0].inputs["student_logits"]
    hidden = exercises.get("kd_loss").cases(3)[0].inputs["student_logits"]
    assert not torch.equal(visible, hidden)


def test_wrong_argument_names_and_non_functions_are_explained():
    def kd(s, t, T):
        return kd_loss_kl_div(s, t, T)

    assert "keep those argument names" in exercises.check("kd_loss", kd).message
    assert "Pass your function itself" in exercises.check("kd_loss", 3.0).message


def test_the_verdict_shows_itself_in_a_notebook():
    good, bad = exercises.check("kd_loss", kd_loss_kl_div), exercises.check("kd_loss", kd_no_t2)
    assert str(good).startswith("✔ right (kd_loss)") and str(bad).startswith("✘ not yet (kd_loss)")
    assert "kdlib-exercise-verdict" in good._repr_html_() and "T² times too small" in bad._repr_html_()
    assert bool(good) and not bool(bad)
