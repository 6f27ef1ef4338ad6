"""kdlib: logit-based knowledge distillation on CIFAR-100, one small file per method.

The library behind the Class-Aware Distillation Book: the CIFAR-100 model zoo (:mod:`kdlib.models`),
the data (:mod:`kdlib.data`), the losses (:mod:`kdlib.losses`) and methods (:mod:`kdlib.methods`), one
training engine (:mod:`kdlib.engine`) and tidy run records (:mod:`kdlib.records`).
"""

__version__ = "0.1.0"
