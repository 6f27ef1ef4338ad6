"""data_scripts/download_cifar100.py, against file:// archives built here; never the network."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from kdlib import data
from kdlib.errors import KDLibError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data_scripts" / "download_cifar100.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dl = _load(SCRIPT, "download_cifar100")
# the writer of fake files in the official format lives with the reader's tests
write_fake_cifar100 = _load(Path(__file__).with_name("test_data.py"), "_kdlib_test_data").write_fake_cifar100


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path):
    """A tar.gz laid out like the official one (cifar-100-python/{train,test,meta}), and its MD5."""
    source = tmp_path / "source"
    written = write_fake_cifar100(source, train_per_class=2, test_per_class=1)
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")
    return path, _md5(path), written


def _leftovers(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name != "cifar-100-python")


def test_download_verifies_and_extracts_a_readable_folder(tmp_path, archive):
    path, md5, written = archive
    root = tmp_path / "data"
    target = dl.download_and_extract(root, url=path.as_uri(), md5=md5, progress=False, log=lambda *a: None)
    assert target == root / "cifar-100-python"
    images, labels = data.load_cifar100(root, train=True)
    assert torch.equal(images.flatten(1), torch.from_numpy(written["train"][0]))
    assert torch.equal(labels, torch.from_numpy(written["train"][1]))
    assert _leftovers(root) == []  # no archive, no partial file, no staging folder


def test_second_call_does_nothing(tmp_path, archive):
    path, md5, _ = archive
    root = tmp_path / "data"
    dl.download_and_extract(root, url=path.as_uri(), md5=md5, progress=False, log=lambda *a: None)
    stamp = (root / "cifar-100-python" / "train").stat().st_mtime_ns
    messages = []
    # a URL that cannot be fetched proves that nothing is downloaded the second time
    dl.download_and_extract(root, url=(tmp_path / "absent.tar.gz").as_uri(), md5=md5, progress=False,
                            log=messages.append)
    assert "already" in messages[0]
    assert (root / "cifar-100-python" / "train").stat().st_mtime_ns == stamp
    assert dl.main(["--root", str(root), "--url", (tmp_path / "absent.tar.gz").as_uri(), "--quiet"]) == 0


def test_wrong_md5_is_refused_and_leaves_nothing(tmp_path, archive):
    path, _, _ = archive
    root = tmp_path / "data"
    with pytest.raises(KDLibError, match="MD5 mismatch"):
        dl.download_and_extract(root, url=path.as_uri(), md5="0" * 32, progress=False, log=lambda *a: None)
    assert not (root / "cifar-100-python").exists()
    assert _leftovers(root) == []


def test_a_broken_existing_folder_is_replaced(tmp_path, archive):
    path, md5, _ = archive
    root = tmp_path / "data"
    (root / "cifar-100-python").mkdir(parents=True)
    (root / "cifar-100-python" / "meta").write_bytes(b"half a file")
    dl.download_and_extract(root, url=path.as_uri(), md5=md5, progress=False, log=lambda *a: None)
    assert data.cifar100_meta(root).fine_names[0] == "fine_00"
    assert _leftovers(root) == []


def test_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        headers = {"Content-Length": "100000"}

        def read(self, n=-1):
            if self.tell() >= 1000:
                raise ConnectionResetError("connection reset by peer")
            return super().read(500)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda url, timeout: Broken(b"x" * 100000))
    root = tmp_path / "data"
    with pytest.raises(KDLibError, match="cannot download .*connection reset"):
        dl.download_and_extract(root, url="https://example.invalid/c.tar.gz", progress=False, log=lambda *a: None)
    assert list(root.iterdir()) == []


def test_offline_is_a_clear_error_with_exit_code_2(tmp_path, capsys):
    # nothing listens on the discard port: the connection is refused at once, no waiting
    code = dl.main(["--root", str(tmp_path), "--url", "http://127.0.0.1:9/cifar-100-python.tar.gz",
                    "--timeout", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot download http://127.0.0.1:9/") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_script_exits_2_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(tmp_path), "--url", "http://127.0.0.1:9/x.tar.gz",
         "--timeout", "5", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")


def _tar_with(tmp_path: Path, members) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                payload = b"owned"
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("members", [
    [("cifar-100-python", "dir"), ("cifar-100-python/../../escaped", "file")],
    [("../escaped", "file")],
    [("/tmp/kdlib-test-escaped-absolute", "file")],
    [("cifar-100-python/meta", "symlink")],
    [("elsewhere/train", "file")],
])
def test_unsafe_archives_are_refused(tmp_path, members):
    path = _tar_with(tmp_path, members)
    root = tmp_path / "a" / "data"
    with pytest.raises(KDLibError, match="refusing to extract"):
        dl.download_and_extract(root, url=path.as_uri(), md5=_md5(path), progress=False, log=lambda *a: None)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "a" / "escaped").exists()
    assert not Path("/tmp/kdlib-test-escaped-absolute").exists()
    assert list(root.iterdir()) == []


def test_archive_without_a_readable_cifar_is_refused(tmp_path):
    path = _tar_with(tmp_path, [("cifar-100-python", "dir"), ("cifar-100-python/train", "file")])
    root = tmp_path / "data"
    with pytest.raises(KDLibError, match="does not hold a readable CIFAR-100"):
        dl.download_and_extract(root, url=path.as_uri(), md5=_md5(path), progress=False, log=lambda *a: None)
    assert list(root.iterdir()) == []


def test_defaults_are_the_official_archive():
    assert dl.URL == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert dl.MD5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_folder_name_agrees_with_the_reader():
    assert dl.CIFAR100_FOLDER == data.CIFAR100_FOLDER
