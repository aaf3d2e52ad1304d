"""`conf/` ships inside the wheel as `lightning_offload.conf`, so the main job runs from an installed wheel."""

from __future__ import annotations

import ast
import re
import shutil
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


def clean_checkout(folder: Path) -> Path:
    """The files a clean clone of this checkout has, with its uncommitted edits: what git tracks or would track,
    without the ignored ones (build folders, egg-info, the `lightning_offload/conf` link of a development install)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, timeout=60)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): already clean
        return ROOT
    for name in filter(None, listed.stdout.decode().split("\0")):
        source, target = ROOT / name, folder / name
        if source.exists() or source.is_symlink():  # a tracked file deleted in this checkout is left out
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    folder = tmp_path_factory.mktemp("wheel")
    source = clean_checkout(tmp_path_factory.mktemp("clone"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(folder), str(source)], check=True, timeout=300)
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


def _installed_with(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install, with theirs (their own extras left out), as normalized names."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    def name(requirement: Requirement) -> str:
        return re.sub(r"[-_.]+", "-", requirement.name).lower()

    found, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if name(requirement) in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found.add(name(requirement))
        try:
            todo += [Requirement(r) for r in requires(requirement.name) or ()]
        except PackageNotFoundError:
            pass
    return found


def test_the_notebooks_extra_installs_what_the_notebooks_import() -> None:
    from importlib.metadata import packages_distributions

    import nbformat

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _installed_with(project["dependencies"] + project["optional-dependencies"]["notebooks"])
    imported = set()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                for node in ast.walk(ast.parse(cell.source)):
                    if isinstance(node, ast.Import):
                        imported |= {alias.name.split(".")[0] for alias in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"lightning_offload"}
    assert "matplotlib" in third_party  # the notebooks were read
    distributions = packages_distributions()
    missing = {module for module in third_party
               if not {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [module])} & installed}
    assert not missing, f"notebooks/ import {sorted(missing)}, which `lightning_offload[notebooks]` does not install"



def test_every_subpackage_ships_in_the_wheel() -> None:
    """pyproject lists the packages by name: a new package folder missing from the list would install without it."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(init.parent.relative_to(root).parts) for init in (root / "lightning_offload").rglob("__init__.py")
               if "__pycache__" not in init.parts and init.parent.name != "conf"}
    assert folders - listed == set()
