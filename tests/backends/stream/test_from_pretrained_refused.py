"""transformers' `from_pretrained` is refused while the `stream` backend builds on the meta device, whether
transformers was imported before the build or is first imported inside it, and a model that does not use
transformers builds without importing its modeling code (a fresh process each, so nothing imported it before)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_offload.backends.stream.from_pretrained_refused import MODELING_UTILS, from_pretrained_refused
from tests.backends.stream.test_units import stream
from tests.conftest import fit, in_a_fresh_process

transformers = pytest.importorskip("transformers")

REFUSAL = r"lightning_offload\.pretrained\(path\)`.*build_on_meta=False"


def load_importing_transformers(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


class LoadsInConfigureModel(pl.LightningModule):
    """Imports transformers' models in `configure_model` and loads a checkpoint with `from_pretrained`."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_importing_transformers(self.folder)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())


def refusal_finder_left() -> bool:
    """Whether a finder of the refusal is still on `sys.meta_path` (transformers' import adds finders of its own)."""
    return any(type(finder).__module__ == from_pretrained_refused.__module__ for finder in sys.meta_path)


def fit_loading_in_configure_model(folder: str) -> dict[str, Any]:
    imported_before = MODELING_UTILS in sys.modules
    refusal = None
    try:
        fit(stream(), num_batches=1, module=LoadsInConfigureModel(Path(folder)))
    except ValueError as error:
        refusal = str(error)
    loaded_after = type(load_importing_transformers(Path(folder))).__name__
    return dict(imported_before=imported_before, refusal=refusal, finder_left=refusal_finder_left(),
                loaded_after=loaded_after)


def fit_plain_torch_model() -> dict[str, Any]:
    finders = list(sys.meta_path)
    module, _ = fit(stream(), num_batches=1)
    return dict(trained=len(module.losses), modeling_imported=MODELING_UTILS in sys.modules,
                finders_restored=sys.meta_path == finders)


def test_refused_inside_when_imported_before_and_loads_again_after(tmp_path: Path) -> None:
    from tests.test_pretrained import save_tiny

    folder = save_tiny(tmp_path / "llama")
    own = transformers.PreTrainedModel.__dict__["from_pretrained"]
    with from_pretrained_refused():
        with pytest.raises(ValueError, match=REFUSAL):
            transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert transformers.PreTrainedModel.__dict__["from_pretrained"] is own
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(folder), transformers.PreTrainedModel)


def test_an_exception_inside_leaves_from_pretrained_and_the_finders_as_they_were() -> None:
    own, finders = transformers.PreTrainedModel.__dict__["from_pretrained"], list(sys.meta_path)
    with pytest.raises(RuntimeError, match="the build failed"), from_pretrained_refused():
        raise RuntimeError("the build failed")
    assert transformers.PreTrainedModel.__dict__["from_pretrained"] is own
    assert sys.meta_path == finders


def test_refused_when_configure_model_first_imports_transformers_and_loads_again_after(tmp_path: Path) -> None:
    from tests.test_pretrained import save_tiny

    folder = save_tiny(tmp_path / "llama")
    result = in_a_fresh_process(__name__, f"fit_loading_in_configure_model({str(folder)!r})")
    assert not result["imported_before"]
    assert re.search(REFUSAL, result["refusal"] or "")
    assert not result["finder_left"]
    assert result["loaded_after"] == "LlamaForCausalLM"


def test_a_plain_torch_model_builds_without_importing_transformers_modeling_code() -> None:
    # Its modeling code, not the package: torchmetrics (imported by Lightning) imports the light package itself.
    result = in_a_fresh_process(__name__, "fit_plain_torch_model()")
    assert result == dict(trained=1, modeling_imported=False, finders_restored=True)
