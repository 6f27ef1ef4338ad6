"""kdlib: logit-based knowledge distillation on CIFAR-100, one small file per method.

The library behind the Class-Aware Distillation Book: the CIFAR-100 model zoo (:mod:`kdlib.models`),
the data (:mod:`kdlib.data`), the losses (:mod:`kdlib.losses`) and methods (:mod:`kdlib.methods`), one
training engine (:mod:`kdlib.engine`) and tidy run records (:mod:`kdlib.records`).
"""

__version__ = "0.1.0"


def default_teacher_provider(config, dataset, device, *, progress: bool = False, verbose: bool = True):
    """The library's teacher provider (:data:`kdlib.teacher_logits.TeacherProvider`): the run's frozen
    teacher and its description, loaded or trained by :func:`kdlib.teachers.get_teacher`.

    Wired here, at the package root, so that the engine (which uses it when no provider is passed) never
    imports :mod:`kdlib.teachers`, which itself trains teachers with the engine.
    """
    from kdlib.teachers import get_teacher

    return get_teacher(config, dataset, device, progress=progress, verbose=verbose)
