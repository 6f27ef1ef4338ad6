r"""Class-wise knowledge distillation, CWKD (Li and Yang, SPIE 2023). **[RECON]**: only the abstract could
be read ("find hard classes with a simple technique and make the student put more effort on them"); the
statistic, the hard-class rule, the weighting and the schedule below are kdlib's reconstruction
(the CWKD chapter lists what is read and what is chosen). Exact part: the base loss is KD (T = 4, 0.1 CE / 0.9 KD).

.. math:: \mathcal{L} = \lambda_{CE}\,\mathrm{CE}(z^s, y)
          + \lambda_{KD}\,\frac{1}{B}\sum_n w_n\, T^2\,
          \mathrm{KL}\big(\sigma(z^t_n/T) \,\|\, \sigma(z^s_n/T)\big),
          \qquad w_n = \frac{1 + \gamma_h\,[y_n \in H]}{\frac{1}{B}\sum_{m} (1 + \gamma_h\,[y_m \in H])}

* statistic ``a_c`` per class (lower = harder): ``student_acc`` (default; the student's running training
  accuracy, correct/seen counted in ``forward`` on the augmented stream, reset each epoch),
  ``student_target_prob`` (mean softmax probability of the label, T = 1), ``teacher_acc`` (the teacher's
  training accuracy, computed once in ``setup`` by :func:`teacher_class_accuracy`, in float32 whatever the
  run's autocast: the hard set ranks these accuracies).
* hard set H, refreshed in ``end_epoch``: ``lowest_k`` (the ``num_hard`` lowest a_c, ties to the lower
  class index) or ``below_mean_std`` (a_c < mean - std, population std). Classes not seen yet are never hard.
* ``weighting="soft"`` replaces [y_n in H] with :math:`h_c = (1-a_c)^\rho / \mathrm{mean}_c (1-a_c)^\rho`.
* Before the first refresh no class is hard, so **CWKD equals KD during epoch 1** (with ``teacher_acc``
  the set is known in ``setup`` and used from epoch 1). gamma_h = 0 gives KD exactly.
* ``normalize`` divides w by its batch mean (total loss scale unchanged); ``apply_to_ce`` weights CE too.
State (counts, statistic, hard mask) lives in buffers, so a checkpoint restores it exactly.
"""
import torch
import torch.nn.functional as F

from kdlib.errors import KDLibError
from kdlib.losses import as_float, kd_per_sample
from kdlib.methods import register
from kdlib.methods.base import (Method, check_choice, check_int, check_nonnegative, check_positive,
                                resize_buffers_for_load)

STATISTICS = ("student_acc", "student_target_prob", "teacher_acc")
RULES = ("lowest_k", "below_mean_std")
WEIGHTINGS = ("hard_set", "soft")
_STATE = ("seen", "correct", "prob_sum", "class_stat", "stat_valid", "hard_mask", "class_weight")


def teacher_class_accuracy(teacher, images, labels, predict, num_classes: int):
    """Per class, the share of ``images`` the teacher classifies right, and whether the class was seen.

    ``predict`` is the engine's setup-time predict (float32); a chapter passing the same function
    (:func:`kdlib.experiments.setup_predict`) gets the same accuracies.
    """
    pred = predict(teacher, images).argmax(dim=1)
    labels = labels.to(pred.device)
    seen = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=(pred == labels).double(), minlength=num_classes)
    return correct / seen.clamp(min=1), seen > 0


@register
class CWKD(Method):
    name = "cwkd"
    defaults = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "gamma_h": 1.0, "num_hard": 10,
                "rule": "lowest_k", "statistic": "student_acc", "weighting": "hard_set", "rho": 1.0,
                "normalize": True, "apply_to_ce": False}

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        hp = self.hparams
        self.temperature = check_positive("temperature", hp["temperature"])
        self.ce_weight = check_nonnegative("ce_weight", hp["ce_weight"])
        self.kd_weight = check_nonnegative("kd_weight", hp["kd_weight"])
        self.gamma_h = check_nonnegative("gamma_h", hp["gamma_h"])
        self.rho = check_positive("rho", hp["rho"])
        self.rule = check_choice("rule", hp["rule"], RULES)
        self.statistic = check_choice("statistic", hp["statistic"], STATISTICS)
        self.weighting = check_choice("weighting", hp["weighting"], WEIGHTINGS)
        self.normalize = check_choice("normalize", hp["normalize"], (True, False))
        self.apply_to_ce = check_choice("apply_to_ce", hp["apply_to_ce"], (True, False))
        self.num_hard = check_int("num_hard", hp["num_hard"], 1)
        for name in _STATE:  # sized when the class count is known (setup or first batch)
            dtype = torch.bool if name in ("stat_valid", "hard_mask") else torch.float64
            self.register_buffer(name, torch.zeros(0, dtype=dtype))

    # -- state ----------------------------------------------------------------------------------
    def _ensure_state(self, num_classes: int, device) -> None:
        if self.seen.numel() == num_classes:
            if self.seen.device != torch.device(device):
                for name in _STATE:
                    setattr(self, name, getattr(self, name).to(device))
            return
        if self.seen.numel():
            raise KDLibError(f"cwkd: state has {self.seen.numel()} classes, the logits have {num_classes}")
        self.check_num_classes(num_classes)
        for name in _STATE:
            setattr(self, name, torch.zeros(num_classes, dtype=getattr(self, name).dtype, device=device))

    def check_num_classes(self, num_classes: int) -> None:
        if self.rule == "lowest_k" and not self.num_hard < num_classes:
            raise KDLibError(f"num_hard must be < the number of classes ({num_classes}), got {self.num_hard}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_buffers_for_load(self, state_dict, prefix, _STATE)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _refresh(self, stat, valid) -> None:
        """New statistic -> hard mask and per-class extra weight h_c."""
        self.class_stat.copy_(torch.where(valid, stat, self.class_stat))
        self.stat_valid |= valid
        a, ok = self.class_stat, self.stat_valid
        hard = torch.zeros_like(self.hard_mask)
        if ok.any():
            if self.rule == "lowest_k":
                order = torch.argsort(torch.where(ok, a, torch.inf), stable=True)
                chosen = order[: min(self.num_hard, int(ok.sum()))]
                hard[chosen] = True
            else:
                va = a[ok]
                hard = ok & (a < va.mean() - va.std(correction=0))
        self.hard_mask.copy_(hard)
        if self.weighting == "hard_set":
            self.class_weight.copy_(hard.double())
        else:
            soft = torch.where(ok, (1.0 - a).clamp(min=0.0) ** self.rho, torch.zeros_like(a))
            mean = soft[ok].mean() if ok.any() else soft.new_zeros(())
            self.class_weight.copy_(soft / mean if mean > 0 else torch.zeros_like(soft))

    def _summary(self):
        return {"hard_classes": torch.nonzero(self.hard_mask).flatten().tolist(),
                "class_stat": [float(v) if ok else None
                               for v, ok in zip(self.class_stat.tolist(), self.stat_valid.tolist())]}

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, ctx):
        self._ensure_state(ctx.num_classes, ctx.device)
        if self.statistic != "teacher_acc":
            return {}
        if ctx.teacher is None:
            raise KDLibError("cwkd: statistic='teacher_acc' needs a teacher")
        accuracy, seen = teacher_class_accuracy(ctx.teacher, ctx.train_images, ctx.train_labels, ctx.predict,
                                                ctx.num_classes)
        self._refresh(accuracy.to(self.seen.device), seen.to(self.seen.device))
        return self._summary()

    def forward(self, student_logits, teacher_logits, targets, ctx):
        z = as_float(student_logits)
        self._ensure_state(z.shape[1], z.device)
        if self.statistic != "teacher_acc":
            with torch.no_grad():
                y = targets.long()
                self.seen.index_add_(0, y, torch.ones_like(y, dtype=self.seen.dtype))
                self.correct.index_add_(0, y, (z.detach().argmax(dim=1) == y).to(self.seen.dtype))
                p_y = F.softmax(z.detach(), dim=1).gather(1, y.reshape(-1, 1)).squeeze(1)
                self.prob_sum.index_add_(0, y, p_y.to(self.seen.dtype))
        w = 1.0 + self.gamma_h * self.class_weight[targets].to(z.dtype)
        if self.normalize:
            w = w / w.mean()
        ce = F.cross_entropy(z, targets, reduction="none")
        kd = kd_per_sample(z, teacher_logits, self.temperature)
        return {"loss_ce": self.ce_weight * ((w * ce) if self.apply_to_ce else ce).mean(),
                "loss_kd": self.kd_weight * (w * kd).mean()}

    def end_epoch(self, epoch):
        if self.seen.numel() == 0:
            return {"hard_classes": [], "class_stat": []}
        if self.statistic != "teacher_acc":
            totals = self.correct if self.statistic == "student_acc" else self.prob_sum
            self._refresh(totals / self.seen.clamp(min=1), self.seen > 0)
            for name in ("seen", "correct", "prob_sum"):
                getattr(self, name).zero_()
        return self._summary()

    def artifacts(self):
        return {"class_stat": self.class_stat.cpu().numpy(), "hard_mask": self.hard_mask.cpu().numpy()}
