"""`conf/` ships inside the wheel as `lightning_offload.conf`, so the main job runs from an installed wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configs_found_as_package_resources() -> None:
    conf = resources.files("lightning_offload.conf")
    assert (conf / "config.yaml").is_file() and (conf / "model" / "tiny_gpt.yaml").is_file()


def test_wheel_contains_configs(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("lightning_offload-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)).replace("conf/", "lightning_offload/conf/", 1)
                for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected <= names
