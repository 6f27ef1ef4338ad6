"""kdlib.data: the CIFAR-100 reader on files in the official format, the synthetic dataset, augmentation."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from kdlib import data
from kdlib.errors import KDLibError

FOLDER = "cifar-100-python"


def write_fake_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 2, seed: int = 0,
                        str_keys: bool = False, protocol: int = 2) -> dict:
    """Write ROOT/cifar-100-python/{train,test,meta} exactly as the official pickles are laid out.

    Bytes keys and protocol 2, as the original Python 2 files; labels in a shuffled file order and a
    shuffled fine-to-coarse map, so "file order" and "derived map" are really tested. Returns what was
    written.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fine_to_coarse = rng.permutation(np.repeat(np.arange(20), 5))
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    written = {"fine_to_coarse": fine_to_coarse, "folder": folder}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        images = rng.integers(0, 256, (fine.size, 3072), dtype=np.uint8)
        content = {
            key("filenames"): [f"{split}_{i:05d}.png".encode() for i in range(fine.size)],
            key("batch_label"): f"{split}ing batch 1 of 1".encode(),
            key("fine_labels"): fine.tolist(),
            key("coarse_labels"): fine_to_coarse[fine].tolist(),
            key("data"): images,
        }
        with open(folder / split, "wb") as f:
            pickle.dump(content, f, protocol=protocol)
        written[split] = (images, fine)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({key("fine_label_names"): [n.encode() for n in fine_names],
                     key("coarse_label_names"): [n.encode() for n in coarse_names]}, f, protocol=protocol)
    written.update(fine_names=fine_names, coarse_names=coarse_names)
    return written


@pytest.fixture
def fake(tmp_path):
    return write_fake_cifar100(tmp_path)


# --------------------------------------------------------------------------------------------------
# CIFAR-100 reader
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_reader_returns_the_written_arrays_in_file_order(tmp_path, fake, train):
    images, labels = data.load_cifar100(tmp_path, train=train)
    want_images, want_labels = fake["train" if train else "test"]
    assert images.dtype == torch.uint8 and images.shape == (want_images.shape[0], 3, 32, 32)
    assert labels.dtype == torch.int64
    # the official layout: 1024 red, then 1024 green, then 1024 blue values, each row-major
    assert np.array_equal(images.numpy(), want_images.reshape(-1, 3, 32, 32))
    assert np.array_equal(images[0, 1].numpy().ravel(), want_images[0, 1024:2048])
    assert np.array_equal(labels.numpy(), want_labels)


def test_meta_names_and_fine_to_coarse(tmp_path, fake):
    meta = data.cifar100_meta(tmp_path)
    assert meta.fine_names == fake["fine_names"] and meta.coarse_names == fake["coarse_names"]
    assert meta.fine_to_coarse.dtype == torch.int64
    assert np.array_equal(meta.fine_to_coarse.numpy(), fake["fine_to_coarse"])


def test_root_may_be_the_cifar_folder_itself(tmp_path, fake):
    a = data.load_cifar100(tmp_path / FOLDER, train=False)
    b = data.load_cifar100(tmp_path, train=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_str_keys_and_newer_protocols_are_accepted(tmp_path):
    fake = write_fake_cifar100(tmp_path, str_keys=True, protocol=pickle.HIGHEST_PROTOCOL)
    images, labels = data.load_cifar100(tmp_path)
    assert np.array_equal(images.numpy().reshape(len(labels), -1), fake["train"][0])
    assert data.cifar100_meta(tmp_path).fine_names == fake["fine_names"]


def test_default_root_comes_from_kdlib_data(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("KDLIB_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    assert data.load_cifar100(train=False)[0].shape[0] == 200
    monkeypatch.delenv("KDLIB_DATA")
    assert data.default_root() == Path("data")


def test_missing_folder_says_how_to_download(tmp_path):
    with pytest.raises(KDLibError, match=r"python data_scripts/download_cifar100\.py --root .*nowhere"):
        data.load_cifar100(tmp_path / "nowhere")
    with pytest.raises(KDLibError, match="download_cifar100"):
        data.load_dataset("cifar100", root=tmp_path / "nowhere")


def test_missing_file_says_how_to_download(tmp_path, fake):
    (fake["folder"] / "test").unlink()
    with pytest.raises(KDLibError, match=r"test is missing.*download_cifar100\.py --root"):
        data.load_cifar100(tmp_path, train=False)


def _rewrite(path: Path, change) -> None:
    with open(path, "rb") as f:
        content = pickle.load(f, encoding="bytes")
    change(content)
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > exploit_ran",))


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated or corrupt"),
    ("random_bytes", "truncated or corrupt"),
    ("empty", "truncated or corrupt"),
    ("wrong_shape", r"shape \(N, 3072\)"),
    ("float_data", r"uint8 array"),
    ("label_100", r"fine_labels must be integers in 0\.\.99, found 100"),
    ("negative_coarse", r"coarse_labels must be integers in 0\.\.19"),
    ("short_labels", r"fine_labels has shape \(299,\), expected \(300,\)"),
    ("no_data", r"has no 'data' entry"),
    ("not_a_dict", "holds a list"),
    ("code", "unexpected object"),
])
def test_damaged_files_raise_a_clear_error_naming_the_file(tmp_path, fake, damage, message, monkeypatch):
    path = fake["folder"] / "train"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "random_bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_shape":
        _rewrite(path, lambda d: d.update({b"data": d[b"data"][:, :3071]}))
    elif damage == "float_data":
        _rewrite(path, lambda d: d.update({b"data": d[b"data"].astype(np.float32)}))
    elif damage == "label_100":
        _rewrite(path, lambda d: d[b"fine_labels"].__setitem__(7, 100))
    elif damage == "negative_coarse":
        _rewrite(path, lambda d: d[b"coarse_labels"].__setitem__(0, -1))
    elif damage == "short_labels":
        _rewrite(path, lambda d: d[b"fine_labels"].pop())
    elif damage == "no_data":
        _rewrite(path, lambda d: d.pop(b"data"))
    elif damage == "not_a_dict":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif damage == "code":
        path.write_bytes(pickle.dumps({b"data": _Exploit()}, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KDLibError, match=message) as info:
        data.load_cifar100(tmp_path, train=True)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "exploit_ran").exists()  # the reader never runs code from a file


def test_meta_with_wrong_name_count_is_refused(tmp_path, fake):
    _rewrite(fake["folder"] / "meta", lambda d: d[b"fine_label_names"].pop())
    with pytest.raises(KDLibError, match="fine_label_names must list 100 names"):
        data.cifar100_meta(tmp_path)


def test_inconsistent_fine_to_coarse_is_refused(tmp_path, fake):
    def change(d):
        fine, coarse = d[b"fine_labels"], d[b"coarse_labels"]
        i = fine.index(5)
        coarse[i] = (coarse[i] + 1) % 20
    _rewrite(fake["folder"] / "train", change)
    with pytest.raises(KDLibError, match="fine class 5 has several coarse labels"):
        data.cifar100_meta(tmp_path)


def test_load_dataset_cifar100_full(tmp_path, fake):
    ds = data.load_dataset("cifar100", root=tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.description == "CIFAR-100 (300 train / 200 test)"
    assert np.array_equal(ds.train_labels.numpy(), fake["train"][1])
    assert np.array_equal(ds.class_to_superclass.numpy(), fake["fine_to_coarse"])
    assert ds.class_names == fake["fine_names"] and ds.superclass_names == fake["coarse_names"]
    assert ds.class_difficulty is None


def test_cifar100_subset_keeps_the_first_of_each_class_in_file_order(tmp_path, fake):
    ds = data.load_dataset("cifar100", root=tmp_path, train_per_class=2, test_per_class=1, seed=5)
    _, fine = fake["train"]
    seen = {}
    want = []
    for i, y in enumerate(fine):  # independent reference: a plain walk through the file
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= 2:
            want.append(i)
    assert np.array_equal(ds.train_images.numpy().reshape(len(want), -1), fake["train"][0][want])
    assert np.array_equal(ds.train_labels.numpy(), fine[want])
    assert torch.equal(torch.bincount(ds.test_labels, minlength=100), torch.ones(100, dtype=torch.int64))
    assert "2 train / 1 test per class" in ds.description and "file order" in ds.description
    # the subset is the same for every seed: seeds vary training, never the data
    again = data.load_dataset("cifar100", root=tmp_path, train_per_class=2, test_per_class=1, seed=9)
    assert torch.equal(again.train_images, ds.train_images)

    partial = data.load_dataset("cifar100", root=tmp_path, train_per_class=1)
    assert len(partial.train_labels) == 100 and len(partial.test_labels) == 200
    assert "all 200 test" in partial.description


@pytest.mark.parametrize("n", [4, 0, -1, 1.5, True])
def test_bad_subset_sizes_are_refused(tmp_path, fake, n):
    with pytest.raises(KDLibError, match="train_per_class"):
        data.load_dataset("cifar100", root=tmp_path, train_per_class=n)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(KDLibError, match="unknown dataset 'cifar10'.*cifar100, synthetic"):
        data.load_dataset("cifar10")


def test_unknown_synthetic_option_is_a_clear_error():
    with pytest.raises(KDLibError, match="unknown synthetic option.*noise_rnage.*valid: .*noise_range"):
        data.load_dataset("synthetic", train_per_class=1, test_per_class=1, noise_rnage=(0, 1))


def test_synthetic_options_are_refused_for_cifar100(tmp_path, fake):
    with pytest.raises(KDLibError, match="synthetic dataset only"):
        data.load_dataset("cifar100", root=tmp_path, noise_range=(0.1, 0.2))


# --------------------------------------------------------------------------------------------------
# Synthetic dataset
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    return data.load_dataset("synthetic")


def _tensors(ds):
    return [ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, ds.class_difficulty]


def test_synthetic_shapes_balance_and_names(synthetic):
    ds = synthetic
    assert ds.train_images.shape == (10000, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (2000, 3, 32, 32) and ds.test_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.train_labels), torch.full((100,), 100))
    assert torch.equal(torch.bincount(ds.test_labels), torch.full((100,), 20))
    assert ds.num_classes == 100 and len(ds.superclass_names) == 20
    assert ds.class_names[17] == "sc03_c2" and ds.superclass_names[3] == "sc03"
    assert torch.equal(ds.class_to_superclass, torch.arange(100) // 5)
    assert ds.description == "synthetic (seed 0, 100 train / 20 test per class)"
    # the designed difficulties: evenly spread over noise_range, each level used once
    levels = ds.class_difficulty.sort().values
    assert torch.allclose(levels, torch.linspace(0.05, 0.45, 100))
    # the classes come shuffled, like CIFAR's files (a prefix of the test set is not one class)
    assert len(torch.unique(ds.test_labels[:50])) > 20


def test_synthetic_is_deterministic_and_seed_dependent():
    first = data.make_synthetic(train_per_class=10, test_per_class=5, seed=0)
    torch.manual_seed(123)  # the global RNG must not matter
    torch.rand(7)
    again = data.make_synthetic(train_per_class=10, test_per_class=5, seed=0)
    for a, b in zip(_tensors(first), _tensors(again)):
        assert torch.equal(a, b)
    other = data.make_synthetic(train_per_class=10, test_per_class=5, seed=1)
    assert not torch.equal(first.train_images, other.train_images)
    assert not torch.equal(first.test_images, other.test_images)
    assert not torch.equal(first.class_difficulty, other.class_difficulty)
    assert other.description == "synthetic (seed 1, 10 train / 5 test per class)"


def test_synthetic_test_set_does_not_depend_on_the_training_size(synthetic):
    small = data.make_synthetic(train_per_class=3, test_per_class=20, seed=0)
    assert torch.equal(small.test_images, synthetic.test_images)
    assert torch.equal(small.test_labels, synthetic.test_labels)


def test_synthetic_knobs_show_in_the_description():
    ds = data.load_dataset("synthetic", train_per_class=2, test_per_class=1, seed=3, noise_range=(0.0, 0.1))
    assert ds.description == "synthetic (seed 3, 2 train / 1 test per class, noise_range=(0.0, 0.1))"
    assert ds.class_difficulty.max() <= 0.1


def _nearest_class_mean(ds):
    """Nearest class mean on raw pixels: the simplest classifier that sees the designed structure."""
    x_train = ds.train_images.flatten(1).float() / 255
    x_test = ds.test_images.flatten(1).float() / 255
    means = torch.zeros(ds.num_classes, x_train.shape[1]).index_add_(0, ds.train_labels, x_train)
    means /= torch.bincount(ds.train_labels, minlength=ds.num_classes)[:, None]
    return torch.cdist(x_test, means).argmin(1)


def test_synthetic_siblings_are_confused_more_than_strangers(synthetic):
    ds = synthetic
    pred, y = _nearest_class_mean(ds), ds.test_labels
    sc = ds.class_to_superclass
    wrong = pred != y
    sibling = wrong & (sc[pred] == sc[y])
    # errors per (true class, wrong class) pair: 4 siblings vs 95 strangers for each class
    sibling_rate = sibling.sum().item() / (len(y) * 4)
    stranger_rate = (wrong & ~sibling).sum().item() / (len(y) * 95)
    assert sibling_rate > 4 * stranger_rate
    accuracy = (~wrong).float().mean().item()
    assert 0.1 < accuracy < 0.9  # neither noise nor trivially separable


def test_synthetic_class_difficulty_spreads_accuracy(synthetic):
    ds = synthetic
    pred, y = _nearest_class_mean(ds), ds.test_labels
    per_class = torch.zeros(100).index_add_(0, y, (pred == y).float()) / torch.bincount(y, minlength=100)
    assert per_class.std() > 0.1
    noisy = ds.class_difficulty > ds.class_difficulty.median()
    assert per_class[noisy].mean() < per_class[~noisy].mean() - 0.2
    assert torch.corrcoef(torch.stack([per_class, ds.class_difficulty]))[0, 1] < -0.3


def test_dataset_to_moves_every_tensor(synthetic):
    moved = synthetic.to("cpu")
    assert moved.description == synthetic.description and torch.equal(moved.train_images, synthetic.train_images)


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------
def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zero pixels


def _torchvision_view(image_u8, top, left, flip):
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, for given parameters, on PIL."""
    pil = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    pil = TF.crop(TF.pad(pil, 4), top, left, 32, 32)
    if flip:
        pil = TF.hflip(pil)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def test_crop_flip_equals_torchvision_on_pil():
    images = _images(81 * 2)
    grid = torch.cartesian_prod(torch.arange(9), torch.arange(9))
    offsets = torch.cat([grid, grid])  # every offset, with and without the flip
    flips = torch.arange(162) >= 81
    views = data.crop_flip(images, offsets, flips)
    assert views.dtype == torch.uint8 and views.shape == images.shape
    for b in range(162):
        ref = _torchvision_view(images[b], int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b]))
        assert torch.equal(views[b], ref), (b, offsets[b].tolist(), bool(flips[b]))


def test_crop_flip_identity_and_pure_flip():
    images = _images(4)
    centre = torch.full((4, 2), 4)
    assert torch.equal(data.crop_flip(images, centre, torch.zeros(4, dtype=torch.bool)), images)
    assert torch.equal(data.crop_flip(images, centre, torch.ones(4, dtype=torch.bool)), images.flip(3))


def test_padding_is_zero_in_pixel_space():
    images = _images(2)
    views = data.crop_flip(images, torch.tensor([[0, 0], [8, 8]]), torch.tensor([False, True]))
    # top-left crop: 4 rows and 4 columns come from the padding
    assert (views[0, :, :4, :] == 0).all() and (views[0, :, :, :4] == 0).all()
    assert torch.equal(views[0, :, 4:, 4:], images[0, :, :28, :28])
    # bottom-right crop then flip: padding on the bottom and, after the flip, on the left
    assert (views[1, :, 28:, :] == 0).all() and (views[1, :, :, :4] == 0).all()
    assert (views[:, :, 4:28, 4:28] != 0).all()


def test_random_crop_flip_parameters_and_statistics():
    images = _images(4000)
    views, offsets, flips = data.random_crop_flip(images, torch.Generator().manual_seed(0))
    assert offsets.dtype == torch.int64 and offsets.shape == (4000, 2)
    assert flips.dtype == torch.bool and flips.shape == (4000,)
    assert offsets.min() == 0 and offsets.max() == 8
    # uniform per axis: each of 9 values expected 444 times (binomial sd ~20)
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=9)
        assert (counts - 4000 / 9).abs().max() < 120
    assert abs(flips.float().mean().item() - 0.5) < 0.05  # sd 0.008
    # top and left are drawn independently
    assert abs(torch.corrcoef(offsets.T.float())[0, 1].item()) < 0.1
    assert torch.equal(views, data.crop_flip(images, offsets, flips))


def test_random_crop_flip_is_deterministic_given_the_generator():
    images = _images(64)
    a = data.random_crop_flip(images, torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    b = data.random_crop_flip(images, torch.Generator().manual_seed(7))
    c = data.random_crop_flip(images, torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])


def test_crop_flip_refuses_bad_parameters():
    images = _images(2)
    with pytest.raises(KDLibError, match="0..8"):
        data.crop_flip(images, torch.tensor([[0, 9], [0, 0]]), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(KDLibError, match=r"\(B, 2\)"):
        data.crop_flip(images, torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool))


def test_view_index_numbers_the_162_views():
    grid = torch.cartesian_prod(torch.arange(9), torch.arange(9))
    offsets = torch.cat([grid, grid])
    flips = torch.arange(162) >= 81
    ids = data.view_index(offsets, flips)
    assert sorted(ids.tolist()) == list(range(162))


def test_normalize_matches_torchvision():
    images = _images(3)
    want = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(im.permute(1, 2, 0).numpy())),
                                     list(data.CIFAR100_MEAN), list(data.CIFAR100_STD)) for im in images])
    got = data.normalize(images)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    x = torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    x[0, :, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    expected = [(v / 255 - m) / s for v, m, s in zip([0, 128, 255], data.CIFAR100_MEAN, data.CIFAR100_STD)]
    assert torch.allclose(data.normalize(x).flatten(), torch.tensor(expected), atol=1e-6)
    last = data.normalize(images, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, got)
    assert data.CIFAR100_MEAN == (0.5071, 0.4867, 0.4408) and data.CIFAR100_STD == (0.2675, 0.2565, 0.2761)


def test_normalize_refuses_float_input():
    with pytest.raises(KDLibError, match="uint8"):
        data.normalize(torch.zeros(1, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augmentation_on_gpu_matches_cpu():
    images = _images(256)
    views, offsets, flips = data.random_crop_flip(images.cuda(), torch.Generator("cuda").manual_seed(0))
    assert views.is_cuda and offsets.is_cuda
    assert torch.equal(views.cpu(), data.crop_flip(images, offsets.cpu(), flips.cpu()))
    assert torch.allclose(data.normalize(views).cpu(), data.normalize(views.cpu()), atol=1e-6)
