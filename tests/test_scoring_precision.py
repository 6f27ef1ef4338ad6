"""Scores a method computes once to steer training are float32 whatever the run's autocast, and a chapter
that recomputes them with the same function gets exactly the engine's numbers.

DLKD ranks its training images by a difficulty (median about 0.02 in the smoke profile) into temperatures;
bf16 keeps 8 bits of mantissa, so bf16 logits would rank many of them by rounding. CWKD's ``teacher_acc``
statistic ranks classes by the teacher's accuracy. Both are computed in ``setup`` through the engine's
predict function, which :func:`kdlib.experiments.setup_predict` reproduces for the chapters.
"""
import numpy as np
import pytest
import torch

from kdlib import engine, experiments as ex, teachers
from kdlib.data import load_dataset
from kdlib.engine import predict
from kdlib.methods.cwkd import teacher_class_accuracy
from kdlib.methods.dlkd import difficulty_scores


def tiny_dataset(cfg):
    return load_dataset(cfg.dataset, train_per_class=cfg.train_per_class, test_per_class=cfg.test_per_class,
                        seed=cfg.data_seed)


@pytest.mark.slow
def test_dlkd_difficulties_are_float32_and_the_chapter_reproduces_them(tiny_config):
    cfg = tiny_config(method="dlkd", amp="bf16", epochs=1)
    engine.train(cfg, progress=False, verbose=False)
    saved = torch.from_numpy(ex.method_artifacts(cfg.out)["difficulty"])
    data = tiny_dataset(cfg)
    teacher = teachers.get_teacher(cfg, data, "cpu", verbose=False)[0]
    hp = cfg.method_hparams()
    again = difficulty_scores(teacher, data.train_images, ex.setup_predict(cfg), hp["pruning_ratio"],
                              hp["pruning"], hp["tau_d"])
    assert torch.equal(again, saved)  # the chapter's score is the engine's, bit for bit

    def bf16(model, images):
        return predict(model, images, cfg.eval_batch_size, cfg.channels_last, "bf16")

    rounded = difficulty_scores(teacher, data.train_images, bf16, hp["pruning_ratio"], hp["pruning"], hp["tau_d"])
    assert not torch.equal(rounded, saved)  # what the run would have used had setup followed amp


@pytest.mark.slow
def test_cwkd_teacher_accuracy_is_the_chapters(tiny_config):
    cfg = tiny_config(method="cwkd", amp="bf16", epochs=1, method_params={"statistic": "teacher_acc"})
    engine.train(cfg, progress=False, verbose=False)
    saved = ex.method_artifacts(cfg.out)["class_stat"]
    data = tiny_dataset(cfg)
    teacher = teachers.get_teacher(cfg, data, "cpu", verbose=False)[0]
    accuracy, seen = teacher_class_accuracy(teacher, data.train_images, data.train_labels, ex.setup_predict(cfg),
                                            data.num_classes)
    assert seen.all() and np.array_equal(accuracy.numpy(), saved)
