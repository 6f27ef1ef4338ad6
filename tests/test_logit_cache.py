"""The exact teacher-logit cache: values, lazy filling, sharing between processes, crash safety."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib import logit_cache, models
from kdlib.data import crop_flip, make_synthetic, normalize, random_crop_flip, view_index
from kdlib.engine import LiveTeacher, ViewKeys, epoch_generator
from kdlib.errors import KDLibError
from kdlib.logit_cache import TeacherLogitCache, num_views, view_params

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setting():
    """200 synthetic images and a random resnet8 teacher, frozen, channels-last (the engine's default)."""
    dataset = make_synthetic(train_per_class=2, test_per_class=1, seed=3)
    torch.manual_seed(0)
    teacher = models.create("resnet8").eval().to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return dataset, teacher


class Counting:
    """A live teacher that counts its calls and the rows it computed."""

    def __init__(self, teacher):
        self.live = LiveTeacher(teacher, torch.device("cpu"))
        self.calls = self.rows = 0

    def __call__(self, x, views=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.live(x, views)


def _open(setting, root, live=None, **kw):
    dataset, teacher = setting
    return TeacherLogitCache(teacher, dataset.train_images, num_classes=dataset.num_classes, live=live,
                             teacher_name="resnet8", dataset_description=dataset.description,
                             channels_last=kw.pop("channels_last", True), root=root, **kw)


def _batches(dataset, epochs=(1,), bs=64, channels_last=True, seed=0):
    """The engine's batches: permutation and views from the engine's generators, normalised."""
    N = dataset.train_images.shape[0]
    for epoch in epochs:
        perm = torch.randperm(N, generator=epoch_generator(seed, epoch, 1))
        aug = epoch_generator(seed, epoch, 2)
        for s in range(0, N, bs):
            idx = perm[s:s + bs]
            views_u8, offsets, flips = random_crop_flip(dataset.train_images.index_select(0, idx), aug)
            yield normalize(views_u8, channels_last), ViewKeys(idx, offsets, flips)


def _flat(views):
    return (views.indices * 162 + view_index(views.offsets, views.flips)).tolist()


def _disk_flags(cache_path):
    return np.fromfile(Path(cache_path) / logit_cache.FLAGS, dtype=np.uint8)


# -- values ---------------------------------------------------------------------------------------
def test_view_params_inverts_view_index():
    ids = torch.arange(162)
    offsets, flips = view_params(ids)
    assert torch.equal(view_index(offsets, flips), ids)
    assert offsets.min() == 0 and offsets.max() == 8 and num_views(4) == 162 and num_views(2) == 50


@pytest.mark.parametrize("channels_last", [True, False])
def test_lazy_cache_is_bit_identical_to_the_live_teacher(setting, tmp_path, channels_last):
    import copy

    dataset, teacher = setting
    teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    live = LiveTeacher(teacher, torch.device("cpu"))
    cache = _open((dataset, teacher), tmp_path, channels_last=channels_last)
    # two epochs: first every view is computed (in sub-batches of misses), then some are looked up
    for x, views in _batches(dataset, epochs=(1, 2, 1), channels_last=channels_last):
        got = cache(x, views)
        assert got.dtype == torch.float32
        assert torch.equal(got, live(x)), "cached logits differ from the live teacher's"
    assert cache.computed < cache.lookups  # epoch 1 again: every view was a hit
    cache.close()


def test_full_fill_equals_the_live_teacher_on_sampled_views(setting, tmp_path):
    dataset, teacher = setting
    cache = _open(setting, tmp_path)
    stats = cache.fill(images=range(0, 200, 25), batch_size=400)  # 8 images x 162 views
    assert stats["views"] == 8 * 162 and stats["views_per_second"] > 0
    g = torch.Generator().manual_seed(1)
    idx = torch.arange(0, 200, 25).repeat(8)  # 64 sampled (image, view) pairs
    ids = torch.randint(0, 162, (64,), generator=g)
    offsets, flips = view_params(ids)
    x = normalize(crop_flip(dataset.train_images[idx], offsets, flips), True)
    calls = Counting(teacher)
    cache.live = calls
    assert torch.equal(cache(x, ViewKeys(idx, offsets, flips)), LiveTeacher(teacher, torch.device("cpu"))(x))
    assert calls.calls == 0
    cache.close()


@pytest.mark.parametrize("dtype, bits", [("float16", 11), ("bfloat16", 8)])
def test_half_precision_storage_within_its_rounding_bound(setting, tmp_path, dtype, bits):
    from kdlib.losses import kd_loss

    dataset, teacher = setting
    live = LiveTeacher(teacher, torch.device("cpu"))
    cache = _open(setting, tmp_path, dtype=dtype)
    assert cache.dtype == dtype
    torch.manual_seed(5)
    for x, views in _batches(dataset):
        want, got = live(x), cache(x, views)
        assert torch.equal(got, cache(x, views))  # the first answer is already the stored (rounded) value
        err = (got - want).abs()
        # round to nearest: relative error <= 2**-bits (plus fp16's subnormal spacing near zero)
        assert (err <= want.abs() * 2.0 ** -bits + 2.0 ** -24).all()
        student = torch.randn_like(want) * want.std()
        kd_live, kd_cached = kd_loss(student, want, 4.0), kd_loss(student, got, 4.0)
        assert abs(float(kd_cached - kd_live)) <= 1e-3 * float(kd_live)
    cache.close()


def test_auto_dtype_and_plan():
    assert logit_cache.resolve_dtype("auto", "none") == "float32"
    assert logit_cache.resolve_dtype("auto", "bf16") == "bfloat16"
    with pytest.raises(KDLibError, match="teacher_cache_dtype"):
        logit_cache.resolve_dtype("int8", "none")
    assert logit_cache.cache_bytes(50000, 100, 4, "float16") == 50000 * 162 * (200 + 1)
    p = logit_cache.plan("auto", uses_teacher=True, num_images=200, num_classes=100, device="cpu")
    assert p["mode"] == "lazy" and p["dtype"] == "float32"
    assert logit_cache.plan("auto", uses_teacher=False, num_images=200, num_classes=100, device="cpu")["mode"] == "off"
    assert logit_cache.plan("full", uses_teacher=True, num_images=200, num_classes=100, device="cpu")["mode"] == "full"
    huge = logit_cache.plan("auto", uses_teacher=True, num_images=10**9, num_classes=100, device="cpu")
    assert huge["mode"] == "off" and "exceeds" in huge["reason"] or "does not fit" in huge["reason"]
    with pytest.raises(KDLibError, match="teacher_cache must be"):
        logit_cache.plan("sometimes", uses_teacher=True, num_images=1, num_classes=1, device="cpu")


def test_cache_needs_the_views(setting, tmp_path):
    cache = _open(setting, tmp_path)
    with pytest.raises(KDLibError, match="views"):
        cache(torch.zeros(2, 3, 32, 32), None)
    cache.close()


# -- lazy filling and sharing ------------------------------------------------------------------------
def test_lazy_fill_marks_exactly_the_views_used(setting, tmp_path):
    dataset, _ = setting
    cache = _open(setting, tmp_path)
    used = set()
    for i, (x, views) in enumerate(_batches(dataset)):
        if i % 2 == 0:
            cache(x, views)
            used.update(_flat(views))
    assert cache.computed == len(used)
    cache.close()
    flags = _disk_flags(cache.path)
    assert flags.shape == (200 * 162,) and set(np.nonzero(flags)[0].tolist()) == used
    assert len(used) == 64 * 2  # batches 0 and 2 of the epoch's 64, 64, 64, 8


def test_a_second_cache_object_serves_stored_values_without_the_teacher(setting, tmp_path):
    dataset, teacher = setting
    first = _open(setting, tmp_path)
    answers = [(x, views, first(x, views)) for x, views in _batches(dataset)]
    first.close()
    counting = Counting(teacher)
    second = _open(setting, tmp_path, live=counting)
    assert second.path == first.path and second.complete is False
    for x, views, want in answers:
        assert torch.equal(second(x, views), want)
    assert counting.calls == 0 and second.computed == 0
    # a view never stored is computed by the teacher, once
    x, views = next(_batches(dataset, epochs=(7,)))
    second(x, views)
    calls = counting.calls
    assert calls >= 1
    second(x, views)
    assert counting.calls == calls
    second.close()


def test_two_open_objects_share_entries_committed_by_the_other(setting, tmp_path):
    dataset, teacher = setting
    counting_a, counting_b = Counting(teacher), Counting(teacher)
    a = _open(setting, tmp_path, live=counting_a)
    b = _open(setting, tmp_path, live=counting_b)  # opened before `a` computed anything
    batches = list(_batches(dataset))
    for x, views in batches:
        a(x, views)
    a.commit()
    for x, views in batches:
        assert torch.equal(b(x, views), a(x, views))
    assert counting_b.calls == 0 and b.adopted == 200  # took a's entries from the shared file
    a.close()
    b.close()


def test_fill_is_resumable_and_makes_the_cache_complete(setting, tmp_path):
    dataset, _ = setting
    small = make_synthetic(train_per_class=1, test_per_class=1, seed=4)  # 100 images
    teacher = setting[1]
    cache = TeacherLogitCache(teacher, small.train_images[:6], num_classes=100, teacher_name="resnet8",
                              channels_last=True, root=tmp_path)
    cache.fill(images=[0, 1, 2])
    assert not cache.complete
    stats = cache.fill()
    assert stats["views"] == 3 * 162 and cache.complete and cache.filled_fraction() == 1.0
    cache.close()
    again = TeacherLogitCache(teacher, small.train_images[:6], num_classes=100, teacher_name="resnet8",
                              channels_last=True, root=tmp_path)
    assert again.complete and again.fill()["views"] == 0
    again.close()


def test_key_separates_teachers_data_and_dtype(setting, tmp_path):
    dataset, teacher = setting
    base = _open(setting, tmp_path)
    other_teacher = models.create("resnet8").eval()
    with torch.no_grad():
        for p, q in zip(other_teacher.parameters(), teacher.parameters()):
            p.copy_(q)
        next(other_teacher.parameters()).view(-1)[0] += 1e-3
    paths = {
        base.path,
        TeacherLogitCache(other_teacher, dataset.train_images, num_classes=100, root=tmp_path,
                          teacher_name="resnet8", dataset_description=dataset.description).path,
        _open((make_synthetic(train_per_class=2, test_per_class=1, seed=4), teacher), tmp_path).path,
        _open(setting, tmp_path, dtype="float16").path,
        _open(setting, tmp_path, padding=2).path,
    }
    assert len(paths) == 5
    assert json.loads((base.path / "meta.json").read_text())["key"]["teacher_sha256"] == \
        logit_cache.teacher_fingerprint(teacher)
    base.close()


# -- crash safety ------------------------------------------------------------------------------------
def test_failure_while_flushing_values_sets_no_flag(setting, tmp_path, monkeypatch):
    dataset, _ = setting
    cache = _open(setting, tmp_path)
    x, views = next(_batches(dataset))
    cache(x, views)

    class Crash(Exception):
        pass

    def crash():
        raise Crash

    monkeypatch.setattr(cache._values_mm, "flush", crash)
    with pytest.raises(Crash):
        cache.commit()
    assert not _disk_flags(cache.path).any()


def test_values_without_flags_are_never_served(setting, tmp_path):
    """Garbage in unflagged entries (a write the process never got to flag) is recomputed, not used."""
    dataset, teacher = setting
    cache = _open(setting, tmp_path)
    cache.close()
    values = np.memmap(cache.path / logit_cache.VALUES, dtype=np.float32, mode="r+")
    values[:] = np.float32(1e30)  # every entry holds garbage, none is flagged
    values.flush()
    del values
    live = LiveTeacher(teacher, torch.device("cpu"))
    again = _open(setting, tmp_path)
    for x, views in _batches(dataset):
        assert torch.equal(again(x, views), live(x))
    again.close()


_CHILD = textwrap.dedent("""
    import os, signal, sys, time, torch
    torch.set_num_threads(1)
    from kdlib import models
    from kdlib.data import make_synthetic, normalize, random_crop_flip
    from kdlib.engine import ViewKeys, epoch_generator
    from kdlib.logit_cache import TeacherLogitCache
    root, how = sys.argv[1], sys.argv[2]
    dataset = make_synthetic(train_per_class=2, test_per_class=1, seed=3)
    torch.manual_seed(0)
    teacher = models.create("resnet8").eval().to(memory_format=torch.channels_last)
    cache = TeacherLogitCache(teacher, dataset.train_images, num_classes=100, teacher_name="resnet8",
                              dataset_description=dataset.description, channels_last=True, root=root,
                              commit_interval=0.0 if how == "kill" else 1e9)
    if how == "kill":  # commit after every chunk, until killed
        print("ready", flush=True)
        cache.fill(batch_size=162)
        time.sleep(60)
    perm = torch.randperm(200, generator=epoch_generator(0, 1, 1))
    aug = epoch_generator(0, 1, 2)
    for step, s in enumerate(range(0, 200, 64)):
        idx = perm[s:s + 64]
        v, o, f = random_crop_flip(dataset.train_images.index_select(0, idx), aug)
        cache(normalize(v, True), ViewKeys(idx, o, f))
        if step == 0:
            cache.commit()  # the first batch is flagged; the others are written but never flagged
    os._exit(0)  # a crash: no commit, no close
""")


def _child(tmp_path, how):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), how], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_flagged_entries_equal_live(setting, cache_path):
    dataset, teacher = setting
    flags = _disk_flags(cache_path)
    values = np.fromfile(Path(cache_path) / logit_cache.VALUES, dtype=np.float32).reshape(-1, 100)
    flat = torch.from_numpy(np.nonzero(flags)[0])
    idx, ids = flat // 162, flat % 162
    offsets, fl = view_params(ids)
    live = LiveTeacher(teacher, torch.device("cpu"))
    want = torch.cat([live(normalize(crop_flip(dataset.train_images[idx[s:s + 256]], offsets[s:s + 256],
                                               fl[s:s + 256]), True)) for s in range(0, len(flat), 256)])
    assert torch.equal(torch.from_numpy(values[flat.numpy()]), want)
    return flat


def test_process_dying_between_value_write_and_flag(setting, tmp_path):
    proc = _child(tmp_path, "exit")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    flagged = _check_flagged_entries_equal_live(setting, path)
    assert len(flagged) == 64  # only the committed batch; the 136 written later are not flagged
    values = np.fromfile(path / logit_cache.VALUES, dtype=np.float32).reshape(-1, 100)
    assert np.count_nonzero(np.abs(values).sum(axis=1)) == 200  # ... although their values were written
    # a reader recomputes the unflagged entries and gets the teacher's values
    dataset, teacher = setting
    counting = Counting(teacher)
    cache = _open(setting, tmp_path, live=counting)
    assert cache.path == path
    live = LiveTeacher(teacher, torch.device("cpu"))
    for x, views in _batches(dataset):
        assert torch.equal(cache(x, views), live(x))
    assert cache.computed == 136 and counting.calls >= 1
    cache.close()


def test_process_killed_during_fill_leaves_only_correct_flags(setting, tmp_path):
    import time

    proc = _child(tmp_path, "kill")
    assert proc.stdout.readline().strip() == "ready"
    path = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it once it has committed something, in the middle of its work
        dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
        if dirs and (dirs[0] / logit_cache.FLAGS).is_file() and _disk_flags(dirs[0]).sum() >= 2 * 162:
            path = dirs[0]
            break
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    assert path is not None, "the child never committed"
    flagged = _check_flagged_entries_equal_live(setting, path)
    assert 2 * 162 <= len(flagged) < 200 * 162


# -- the engine with the cache ---------------------------------------------------------------------
def test_engine_runs_with_the_cache_equal_live_runs_and_record_it(tiny_config, tmp_path):
    from kdlib import engine

    off = engine.train(tiny_config(teacher_cache="off", out=str(tmp_path / "off")), progress=False, verbose=False)
    lazy = engine.train(tiny_config(teacher_cache="lazy", out=str(tmp_path / "lazy")), progress=False, verbose=False)
    assert off["config"]["teacher_cache"]["mode"] == "off"
    record = lazy["config"]["teacher_cache"]
    assert record["requested"] == "lazy" and record["mode"] == "lazy" and record["dtype"] == "float32"
    assert Path(record["path"]).is_dir() and Path(record["path"]).parent.parent == Path(os.environ["KDLIB_HOME"])
    for a, b in zip(off["history"], lazy["history"]):  # bit-identical on CPU in float32
        for key in ("train_loss", "loss_ce", "loss_kd", "train_acc", "test_acc", "test_loss"):
            assert a[key] == b[key], key
    # another run with the same teacher and data (here: same seed, so the same views) computes nothing
    again = engine.train(tiny_config(teacher_cache="auto", out=str(tmp_path / "again")), progress=False, verbose=False)
    assert again["config"]["teacher_cache"]["mode"] == "lazy"
    assert again["config"]["teacher_cache"]["path"] == record["path"]
    stats = again["segments"][-1]["teacher_cache"]
    assert stats["lookups"] == 2 * 400 and stats["computed"] == 0
    assert again["history"][-1]["train_loss"] == lazy["history"][-1]["train_loss"]


def test_vanilla_runs_use_no_cache(tiny_config):
    from kdlib import engine

    metrics = engine.train(tiny_config(method="vanilla", teacher_cache="lazy"), progress=False, verbose=False)
    assert metrics["config"]["teacher_cache"]["mode"] == "off"


def test_teacher_cache_config_values_are_checked(tiny_config):
    with pytest.raises(KDLibError, match="teacher_cache must be"):
        tiny_config(teacher_cache="always")
    with pytest.raises(KDLibError, match="teacher_cache_dtype must be"):
        tiny_config(teacher_cache_dtype="int8")
