"""The `course` profile, the path a course takes on real CIFAR-100, executed end to end.

A small CIFAR-100 is written in the exact official python layout (``cifar-100-python/{train,test,meta}``,
pickled dicts with bytes keys, protocol 2, the images as ``(N, 3072)`` uint8 rows): the images are
kdlib's synthetic CIFAR-100 look-alike, so the chapters' models have something to learn. Every chapter
is then executed in the ``course`` profile (CIFAR-100 through the real reader, resnet56 -> resnet20) at
tiny size, with the data root given as ``make book PROFILE=course`` users give it (``KDLIB_DATA``, which
``python -m kdlib book --data-root`` sets).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CHAPTER, ExecutedChapters, shared_folder
from kdlib import bookbuild, data
from kdlib.io import file_lock

ROOT = Path(__file__).resolve().parent.parent
COURSE_TINY = {**TINY_CHAPTER, "profile": "course"}
#: images per class in the fixture: a few more than the tiny chapters take, so "first per class" matters
FIXTURE_TRAIN, FIXTURE_TEST = 6, 3
#: chapters that fail in the course profile for a known reason: ``{chapter: regex of its error}`` (none
#: today). Strict: a listed chapter that executes, or fails with another error, fails its test.
KNOWN_FAILURES: dict = {}


def write_cifar100_python(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """Write kdlib's synthetic images as ``root/cifar-100-python/{train,test,meta}``, the official layout."""
    synth = data.load_dataset("synthetic", train_per_class=train_per_class, test_per_class=test_per_class,
                              seed=seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse_of = synth.class_to_superclass.numpy()
    for split, images, labels in (("train", synth.train_images, synth.train_labels),
                                  ("test", synth.test_images, synth.test_labels)):
        order = rng.permutation(len(labels))  # the official files are not sorted by class
        fine = labels.numpy()[order]
        content = {
            b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(fine.size)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": coarse_of[fine].tolist(),
            b"data": images.numpy()[order].reshape(len(fine), 3072),  # R, G, B planes of 32x32, row-major
        }
        with open(folder / split, "wb") as f:
            pickle.dump(content, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in synth.class_names],
                     b"coarse_label_names": [n.encode() for n in synth.superclass_names]}, f, protocol=2)
    return folder


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """The fixture written once per session, in a folder the xdist workers share."""
    root = shared_folder(tmp_path_factory, "cifar")
    with file_lock(root / "write.lock"):
        if not (root / "written").exists():
            write_cifar100_python(root, FIXTURE_TRAIN, FIXTURE_TEST)
            (root / "written").touch()
    return root


@pytest.fixture(scope="session")
def course_chapters(cifar_root, tmp_path_factory):
    """Each chapter executed once per session, by whichever worker asks first (see ExecutedChapters)."""
    base = shared_folder(tmp_path_factory, "course_book")
    return ExecutedChapters(base / "staging", base / "home", COURSE_TINY, data_root=cifar_root)


def test_fixture_reads_back_through_the_cifar100_reader(cifar_root):
    synth = data.load_dataset("synthetic", train_per_class=FIXTURE_TRAIN, test_per_class=FIXTURE_TEST, seed=0)
    ds = data.load_dataset("cifar100", root=cifar_root, train_per_class=2, test_per_class=1)
    assert ds.class_names == synth.class_names and ds.superclass_names == synth.superclass_names
    assert (ds.class_to_superclass == synth.class_to_superclass).all()
    assert len(ds.train_labels) == 200 and len(ds.test_labels) == 100
    # every image read back is one of the synthetic images of its class, pixel for pixel
    for images, labels, source, source_labels in ((ds.train_images, ds.train_labels, synth.train_images,
                                                    synth.train_labels),
                                                   (ds.test_images, ds.test_labels, synth.test_images,
                                                    synth.test_labels)):
        for image, label in zip(images[::37], labels[::37]):
            same_class = source[source_labels == label]
            assert (same_class == image).flatten(1).all(1).any()


def course_params():
    marks = []
    for path in bookbuild.toc_files(ROOT):
        src = bookbuild.source_of(ROOT, path)
        if not bookbuild.is_notebook(src):
            continue
        marks.append(src.stem)
    return marks


def expect(check, known_failure=None) -> None:
    """Run ``check``; for a known failure, expect exactly that error and report it as xfailed.

    A known failure that no longer happens, or happens with another error, fails the test.
    """
    if known_failure is None:
        check()
        return
    with pytest.raises(Exception, match=known_failure):
        check()
    pytest.xfail(f"known failure: {known_failure}")


def test_a_known_failure_that_passes_or_fails_differently_fails():
    def failing(message):
        def check():
            raise RuntimeError(message)
        return check

    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):  # fixed: remove it from the list
        expect(lambda: None, "cell 3 times out")
    with pytest.raises(AssertionError, match="did not match"):  # broken differently
        expect(failing("KeyError: 'test_acc'"), "cell 3 times out")
    with pytest.raises(pytest.xfail.Exception):  # broken as listed
        expect(failing("papermill: cell 3 times out after 60 s"), "cell 3 times out")
    expect(lambda: None)


@pytest.mark.slow
@pytest.mark.parametrize("chapter", course_params())
def test_chapter_executes_in_the_course_profile(chapter, course_chapters):
    expect(lambda: check_course_chapter(chapter, course_chapters), KNOWN_FAILURES.get(chapter))


def check_course_chapter(chapter, course_chapters):
    out = course_chapters.executed(chapter)
    print(f"{chapter} (course, tiny): executed in {course_chapters.seconds[chapter]:.1f} s")
    nb = json.loads(out.read_text())
    assert nb["metadata"]["papermill"]["parameters"]["profile"] == "course"
    text = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    # the chapter read the fixture through the CIFAR-100 reader, not the synthetic generator
    assert "CIFAR-100 subset (4 train / 2 test per class" in text, "the chapter's label does not name CIFAR-100"
    runs = list((course_chapters.home / "runs" / "course").glob("*/metrics.json"))
    assert runs, "no course-profile run was recorded"
    assert {json.loads(p.read_text())["config"]["dataset"]["name"] for p in runs} == {"cifar100"}
