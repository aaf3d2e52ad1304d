"""`conf/` ships inside the wheel as `lightning_offload.conf`, so the main job runs from an installed wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_configs_found_as_package_resources() -> None:
    conf = resources.files("lightning_offload.conf")
    assert (conf / "config.yaml").is_file() and (conf / "model" / "tiny_gpt.yaml").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(folder), str(ROOT)], check=True, timeout=300)
    (built,) = folder.glob("lightning_offload-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_contains_configs(wheel) -> None:
    names = set(wheel.namelist())
    expected = {str(p.relative_to(ROOT)).replace("conf/", "lightning_offload/conf/", 1)
                for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected <= names


def test_wheel_declares_one_version_license_and_types(wheel) -> None:
    import lightning_offload

    names = set(wheel.namelist())
    assert "lightning_offload/py.typed" in names
    metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(metadata_name).decode()
    assert f"Version: {lightning_offload.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_wheel_declares_the_command(wheel) -> None:
    entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "lightning-offload = lightning_offload.cli:main" in entry_points


@pytest.mark.slow
def test_the_wheel_installs_and_its_command_trains_from_an_empty_folder(wheel, tmp_path) -> None:
    from tests.test_train import SHORT_RUN

    venv = tmp_path / "venv"
    # The dependencies come from this environment; the package itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", wheel.filename],
                   check=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lightning_offload; print(lightning_offload.__file__)"],
                           capture_output=True, text=True, cwd=empty, env=env, timeout=300)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    done = subprocess.run([str(venv / "bin" / "lightning-offload"), "train", *SHORT_RUN, "trainer.max_steps=5",
                           "trainer.limit_val_batches=0"], capture_output=True, text=True, cwd=empty, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((empty / "outputs").glob("*/*/checkpoints/last.ckpt"))) == 1
