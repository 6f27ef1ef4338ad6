"""Logit standardisation (Sun et al., CVPR 2024): the settings the LS authors ran, per teacher/student pair.

LS is not a method of its own here but the hyperparameter ``standardize`` of ``kd``, ``dkd``, ``ctkd`` and
``mlkd`` (:func:`kdlib.losses.standardize`). The LS loss needs other weights than the method's defaults;
:func:`ls_settings` gives the ones the authors used, as ``--set`` values. Sources: the LS paper's text
(KD: base temperature 2, kd_weight 9, ce_weight 0.1; DKD: temperature 2, alpha and beta times 9,
ce_weight 1), the LS repository's log names ``KD_TYPE,TEACHER,STUDENT,T,WEIGHT`` for the per-pair KD
values, and for MLKD + LS the repository's command (``tools/train.py --logit-stand --base-temp 2
--kd-weight 9``: base temperature 2 and kd_weight 9 on every MLKD term) with its ``MLKD.py``, which
standardises inside the instance terms only (``standardize_levels="instance"``, MLKD's default). Not a
module of the method registry.

**DKD + LS: the paper and the repository disagree.** The paper's text: temperature 2, alpha and beta each
times 9 (``reading="paper"``, the default). One version of the repository's ``tools/train.py`` (the one
with ``cfg.DKD.BETA = cfg.DKD.ALPHA * args.kd_weight``) does, for ``--logit-stand --base-temp 2
--kd-weight 9`` on a DKD config::

    ALPHA <- ALPHA * 9               # 9 alpha
    BETA  <- ALPHA * 9               # reads the ALPHA just scaled: 81 alpha, the config's BETA is lost
    KD.TEMPERATURE <- 2              # a KD field: DKD reads DKD.T, which stays the config's 4

and its ``DKD.py`` z-scores both logit vectors by ``(z - mean) / (1e-7 + std)`` with the unbiased std (as
:func:`kdlib.losses.standardize`). ``reading="repository"`` gives those values: alpha 9 alpha, beta 81 alpha
(whatever DKD's per-pair beta), temperature DKD's own 4. Another version of the same file scales
``BETA`` by 9 and sets ``DKD.T`` to the base temperature, as the paper reads; the repository's DKD log
names (``dkd,TEACHER,STUDENT,T,KD_WEIGHT,BETA``) record per-pair temperatures 2-3 and kd_weights 9-18 that
match neither reading. For KD, CTKD and MLKD both readings give the same values.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from kdlib.errors import KDLibError

#: KD + LS (temperature, kd_weight) per (teacher, student) where the authors' logs differ from (2, 9)
KD_PER_PAIR: Dict[Tuple[str, str], Tuple[float, float]] = {
    ("vgg13", "vgg8"): (3.0, 9.0),
    ("resnet32x4", "wrn_16_2"): (3.0, 9.0),
    ("resnet32x4", "wrn_40_2"): (3.0, 9.0),
    ("wrn_40_2", "MobileNetV2"): (3.0, 9.0),
    ("vgg13", "MobileNetV2"): (3.0, 9.0),
    ("resnet110", "resnet20"): (4.0, 12.0),
    ("ResNet50", "MobileNetV2"): (3.0, 1.0),  # as the authors' log name reads ("3,1")
}
KD_DEFAULT = (2.0, 9.0)
#: the factor LS multiplies the KD-type weights by (DKD's alpha and beta, MLKD's kd_weight)
LS_WEIGHT = 9.0
#: whose numbers :func:`ls_settings` gives where the LS paper's text and its repository's code differ (DKD)
READINGS = ("paper", "repository")


def ls_settings(method: str, teacher: str, student: str, *, dkd_alpha: float = 1.0,
                dkd_beta: float = 8.0, reading: str = "paper") -> Dict[str, Any]:
    """The LS authors' hyperparameters for ``method`` on a pair (``standardize=True`` included).

    ``dkd_alpha``/``dkd_beta`` are DKD's own per-pair weights before the LS scaling
    (``kdlib.methods.dkd.default_beta``). ``reading``: ``"paper"`` (the default) or ``"repository"`` (DKD
    as the authors' training script sets it: alpha * 9, beta = alpha * 81, DKD's own temperature).
    """
    if reading not in READINGS:
        raise KDLibError(f"reading must be one of {', '.join(map(repr, READINGS))}, got {reading!r}")
    if method == "kd":
        t, w = KD_PER_PAIR.get((teacher, student), KD_DEFAULT)
        return {"standardize": True, "temperature": t, "kd_weight": w, "ce_weight": 0.1}
    if method == "dkd" and reading == "repository":
        from kdlib.methods.dkd import DKD

        alpha = LS_WEIGHT * dkd_alpha  # the script scales ALPHA first, then reads it for BETA
        return {"standardize": True, "temperature": DKD.defaults["temperature"], "alpha": alpha,
                "beta": LS_WEIGHT * alpha, "ce_weight": 1.0}
    if method == "dkd":
        return {"standardize": True, "temperature": 2.0, "alpha": LS_WEIGHT * dkd_alpha,
                "beta": LS_WEIGHT * dkd_beta, "ce_weight": 1.0}
    if method == "mlkd":  # the base temperature 2 replaces MLKD's 4; 3, 5, 2, 6 stay (written in their code)
        return {"standardize": True, "temperature": 2.0, "kd_weight": LS_WEIGHT, "standardize_levels": "instance"}
    if method == "ctkd":
        return {"standardize": True}  # CTKD learns the base temperature; its weights stay
    raise KDLibError(f"logit standardisation is available for kd, dkd, ctkd and mlkd, not {method!r}")


def settings_table(pairs) -> "list[dict]":
    """Rows (method, teacher, student, settings...) for the book's LS table."""
    from kdlib.methods.dkd import default_beta

    rows = []
    for teacher, student in pairs:
        for method in ("kd", "dkd", "mlkd", "ctkd"):
            for reading in READINGS if method == "dkd" else ("paper",):
                rows.append({"method": method if reading == "paper" else f"{method} ({reading})",
                             "teacher": teacher, "student": student,
                             **ls_settings(method, teacher, student, dkd_beta=default_beta(teacher, student),
                                           reading=reading)})
    return rows
