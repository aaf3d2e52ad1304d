"""A small tmpfs for the reliability tests: another file system than the system temp folder, and one that fills up."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True)
    return result.returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs; the test is skipped where mounting is not permitted."""
    folder = tmp_path / "tmpfs"
    if not _mount_tmpfs(folder, "8m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on a tmpfs (another file system than the temp folder) where permitted, else a temp folder."""
    folder = tmp_path / "other_fs"
    mounted = _mount_tmpfs(folder, "256m")
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
