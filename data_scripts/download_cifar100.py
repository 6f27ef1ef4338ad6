#!/usr/bin/env python
"""Download CIFAR-100 (python version) into ROOT/cifar-100-python, safely and at most once.

    python data_scripts/download_cifar100.py --root data

Why each step is the way it is:

* The archive goes to a temporary file next to its destination and is only used once complete and its
  MD5 matches the published one, so an interrupted or corrupted download is never extracted.
* Extraction goes into a temporary folder in ROOT, the result is checked with kdlib's own reader, and
  only then renamed to ``cifar-100-python`` (a rename within one file system is atomic): a reader never
  sees a half-extracted folder, and a failed run leaves nothing behind.
* Archive members are checked before anything is written: only plain files and folders under
  ``cifar-100-python/``, no absolute paths, no ``..``, no links (a hostile archive cannot write outside
  ROOT).
* If ROOT/cifar-100-python already exists and the reader accepts it, nothing is downloaded (exit 0).
* Network failures end within ``--timeout`` seconds with one ``error: ...`` line and exit code 2, the
  convention of ``python -m kdlib``.

``download_and_extract(root, url=..., md5=...)`` is the reusable function; tests call it with a
``file://`` URL and their own MD5.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

try:
    import kdlib  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlib.errors import KDLibError  # light; kdlib.data (torch) is imported only when a folder is checked

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"
_CHUNK = 1 << 20


def check_folder(folder: Path) -> Optional[str]:
    """None when kdlib's reader accepts ``folder`` (train, test and meta), else the reason it does not."""
    from kdlib.data import load_dataset

    try:
        load_dataset("cifar100", root=folder)
    except KDLibError as exc:
        return str(exc)
    return None


def download(url: str, dest: Path, md5: str, timeout: float = 30.0, progress: bool = True) -> None:
    """Fetch ``url`` into ``dest`` only if it arrives complete with the given MD5; else raise, leaving no file."""
    from tqdm import tqdm

    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    total = response.headers.get("Content-Length")
                    with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                              desc=dest.name, disable=not progress) as bar:
                        while True:
                            chunk = response.read(_CHUNK)
                            if not chunk:
                                break
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise KDLibError(f"cannot download {url}: {reason} (offline? copy cifar-100-python.tar.gz's "
                                 f"contents to {dest.parent / CIFAR100_FOLDER} by hand)") from None
        if digest.hexdigest() != md5:
            raise KDLibError(f"MD5 mismatch for {url}: got {digest.hexdigest()}, expected {md5}; "
                             "the download is corrupt or not CIFAR-100, and was deleted")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe_members(archive: tarfile.TarFile, archive_path: Path):
    """The archive's members if every one is a plain file or folder inside cifar-100-python/, else raise."""
    members = archive.getmembers()
    for m in members:
        parts = PurePosixPath(m.name).parts
        if (m.name.startswith(("/", "\\")) or ".." in parts or ":" in m.name or not parts
                or parts[0] != CIFAR100_FOLDER or not (m.isfile() or m.isdir())):
            raise KDLibError(f"refusing to extract {archive_path}: unsafe or unexpected member {m.name!r} "
                             f"(only plain files under {CIFAR100_FOLDER}/ are allowed)")
    return members


def extract(archive_path: Path, root: Path) -> Path:
    """Extract into a temporary folder in ``root``, check it, then rename it to ``root/cifar-100-python``."""
    target = root / CIFAR100_FOLDER
    staging = Path(tempfile.mkdtemp(prefix=f".{CIFAR100_FOLDER}.", suffix=".extract", dir=root))
    try:
        try:
            with tarfile.open(archive_path, "r:*") as archive:
                members = _safe_members(archive, archive_path)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: the standard library checks too
                    archive.extractall(staging, members=members, filter="data")
                else:
                    archive.extractall(staging, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise KDLibError(f"cannot extract {archive_path}: {exc}") from None
        problem = check_folder(staging / CIFAR100_FOLDER)
        if problem:
            raise KDLibError(f"the downloaded archive does not hold a readable CIFAR-100: {problem}")
        old = None
        if target.exists():  # a broken copy: move it aside so the good one can take its name atomically
            old = staging.with_suffix(".old")
            os.rename(target, old)
        try:
            os.rename(staging / CIFAR100_FOLDER, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            if check_folder(target) is None:  # another process finished first: its copy is as good
                return target
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_and_extract(root=None, url: str = URL, md5: str = MD5, timeout: float = 30.0,
                         progress: bool = True, log=print) -> Path:
    """Make ``root/cifar-100-python`` a complete CIFAR-100; return its path. Does nothing if it already is."""
    if root is None:
        from kdlib.data import default_root

        root = default_root()
    root = Path(root).expanduser()
    target = root / CIFAR100_FOLDER
    if target.exists():
        problem = check_folder(target)
        if problem is None:
            log(f"CIFAR-100 is already in {target}; nothing to do")
            return target
        log(f"{target} exists but is not usable ({problem}); downloading a fresh copy")
    root.mkdir(parents=True, exist_ok=True)
    fd, archive = tempfile.mkstemp(prefix=".cifar-100-python.", suffix=".tar.gz", dir=root)
    os.close(fd)
    archive = Path(archive)
    try:
        log(f"downloading {url}")
        download(url, archive, md5, timeout=timeout, progress=progress)
        log(f"extracting into {target}")
        extract(archive, root)
    finally:
        archive.unlink(missing_ok=True)
    log(f"CIFAR-100 is ready in {target}")
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None,
                        help="folder that will hold cifar-100-python/ (default: $KDLIB_DATA or ./data)")
    parser.add_argument("--url", default=URL, help="archive URL (file:// works; default: the official one)")
    parser.add_argument("--md5", default=MD5, help="expected MD5 of the archive")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait on the network (default 30)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        download_and_extract(args.root, url=args.url, md5=args.md5, timeout=args.timeout, progress=not args.quiet)
    except KDLibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-done", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
