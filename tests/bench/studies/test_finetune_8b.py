"""bench/studies/finetune_8b.py on the CPU at the tiny size: every phase the `finetune_8b` and `finetune_19b_stream`
calls run, in their order, each printing its result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.studies.finetune_8b import main

transformers = pytest.importorskip("transformers")
STEPS = 2


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    main(list(argv))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("RESULT "))


def train(capsys: pytest.CaptureFixture[str], folder: Path, backend: str, *extra: str) -> dict[str, Any]:
    return run(capsys, "train", "--size", "tiny", "--folder", str(folder), "--backend", backend,
               "--steps", str(STEPS), "--seq", "8", *extra)


def export(capsys: pytest.CaptureFixture[str], checkpoint: Path, folder: Path, out: Path) -> dict[str, Any]:
    return run(capsys, "export", "--checkpoint", str(checkpoint), "--config", str(folder), "--out", str(out),
               "--check", "--delete")


@pytest.mark.slow
def test_gpu_8bit_checkpoint_trains_from_pretrained_and_exports(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pretrained"
    assert run(capsys, "create", "--size", "tiny", "--folder", str(folder))["gib"] > 0
    assert torch.get_default_dtype() == torch.float32
    tuned = train(capsys, folder, "gpu_8bit", "--save", str(tmp_path / "trained.ckpt"))
    assert tuned["plan"].startswith("gpu_8bit") and tuned["read_s"] > 0 and len(tuned["step_s"]) == STEPS
    assert 0 < tuned["rss_before_load_gib"] <= tuned["peak_rss_load_gib"]
    random = train(capsys, folder, "auto", "--source", "random")
    assert random["read_s"] == 0 and len(random["step_s"]) == STEPS
    for file in folder.glob("*.safetensors"):  # the export needs only the config
        file.unlink()
    exported = export(capsys, tmp_path / "trained.ckpt", folder, tmp_path / "exported")
    assert exported["first_tensor"][2] == "torch.bfloat16" and not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_stream_deletes_its_source_saves_weights_only_and_exports(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pretrained"
    run(capsys, "create", "--size", "tiny", "--folder", str(folder))
    tuned = train(capsys, folder, "stream", "--delete-source", "--save", str(tmp_path / "trained.ckpt"))
    # `stream` reads the weights while the engine is set up: no rate for `configure_model`, which read nothing.
    assert tuned["plan"].startswith("stream") and tuned["read_s"] > 0 and tuned["setup_gb_s"] > 0
    assert tuned["load_gb_s"] is None
    assert not list(folder.glob("*.safetensors"))
    exported = export(capsys, tmp_path / "trained.ckpt", folder, tmp_path / "exported")
    assert exported["gib"] > 0
