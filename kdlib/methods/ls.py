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


def ls_settings(method: str, teacher: str, student: str, *, dkd_alpha: float = 1.0,
                dkd_beta: float = 8.0) -> Dict[str, Any]:
    """The LS authors' hyperparameters for ``method`` on a pair (``standardize=True`` included).

    ``dkd_beta`` is DKD's own per-pair beta before the LS scaling (``kdlib.methods.dkd.default_beta``).
    """
    if method == "kd":
        t, w = KD_PER_PAIR.get((teacher, student), KD_DEFAULT)
        return {"standardize": True, "temperature": t, "kd_weight": w, "ce_weight": 0.1}
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
            rows.append({"method": method, "teacher": teacher, "student": student,
                         **ls_settings(method, teacher, student, dkd_beta=default_beta(teacher, student))})
    return rows
