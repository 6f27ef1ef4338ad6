"""The CIFAR-100 training pipeline of the community code bases (CRD/RepDistiller, mdistiller), written here
as they write it, for ``python -m kdlib bench`` to measure the engine against: a torchvision-style CIFAR
``Dataset`` over HWC uint8 numpy images, PIL transforms, a shuffling ``DataLoader`` with worker processes,
float32, NCHW, the live teacher, mdistiller's KD loss and a ``loss.item()`` per step for the meters."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReferenceCIFAR", "reference_transform", "Reference"]


class ReferenceCIFAR(torch.utils.data.Dataset):
    """``torchvision.datasets.CIFAR100``'s ``__getitem__``: HWC uint8 numpy -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images_hwc, [int(v) for v in labels], transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def reference_transform():
    """The CIFAR-100 training transform of CRD/mdistiller."""
    import torchvision.transforms as T

    from kdlib.data import CIFAR100_MEAN, CIFAR100_STD

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


def _reference_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """mdistiller's ``kd_loss``."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


class Reference:
    """A DataLoader over the PIL dataset and mdistiller's KD step (fp32, NCHW, live teacher)."""

    def __init__(self, dataset, teacher: nn.Module, student: nn.Module, device: torch.device, batch_size: int,
                 workers: int, seed: int, kd_hparams: Dict[str, float], lr: float):
        images = dataset.train_images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as in the pickles
        data = ReferenceCIFAR(images, dataset.train_labels.numpy(), reference_transform())
        self.loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed))
        self.iterator = iter(self.loader)
        self.teacher, self.student, self.device = teacher, student, device
        self.optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.hp = kd_hparams

    def steps(self, n: int) -> None:
        for _ in range(n):
            try:
                image, target = next(self.iterator)
            except StopIteration:  # a new epoch (the dataset is sized so that timed passes never need it)
                self.iterator = iter(self.loader)
                image, target = next(self.iterator)
            image = image.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            logits_student = self.student(image)
            with torch.no_grad():
                logits_teacher = self.teacher(image)
            loss = (self.hp["ce_weight"] * F.cross_entropy(logits_student, target)
                    + self.hp["kd_weight"] * _reference_kd_loss(logits_student, logits_teacher, self.hp["temperature"]))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # the meters' per-step read (a host sync on GPUs)
