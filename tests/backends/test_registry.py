"""The backend registry: each spec agrees with its engine, and what the package does per backend comes from them."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys

import pytest

from lightning_offload.backends import registry
from lightning_offload.backends.base import TRAINER_PRECISIONS
from lightning_offload.backends.needs import RunNeeds
from lightning_offload.planner.terms import Plan


@pytest.mark.parametrize("name", registry.available_backends())
def test_each_spec_describes_the_engine_registered_under_its_name(name: str) -> None:
    spec = registry.spec(name)
    assert spec.name == name and spec.engine.name == name
    assert registry.backend_class(name) is spec.engine


@pytest.mark.parametrize("name", registry.available_backends())
def test_the_plan_levers_a_spec_hands_its_engine_are_options_of_its_config(name: str) -> None:
    spec = registry.spec(name)
    options = spec.options_of(Plan(backend=name, resident_blocks=3, accumulate_on_gpu=True, nvme_state="optimizer"))
    assert set(options) <= {field.name for field in dataclasses.fields(spec.engine.Config)}
    spec.engine.Config.from_options(options)  # and of the types the config takes


@pytest.mark.parametrize("name", registry.available_backends())
def test_the_options_a_spec_hands_the_planner_are_options_of_its_config_and_keywords_of_plan(name: str) -> None:
    from lightning_offload.planner import plan

    levers = set(registry.pinned_levers(name))
    assert levers <= {field.name for field in dataclasses.fields(registry.spec(name).engine.Config)}
    assert levers <= set(inspect.signature(plan).parameters)


@pytest.mark.parametrize("name", registry.available_backends())
def test_a_backend_that_saves_its_own_state_says_how_its_folder_consolidates(name: str) -> None:
    spec = registry.spec(name)
    assert spec.engine.saves_own_state == (spec.fp32_tensors is not None) == bool(spec.checkpoint_files)
    assert (spec.saved_weights is not None) == (spec.fp32_tensors is not None)  # export reads what consolidate reads


@pytest.mark.parametrize("precision", [*TRAINER_PRECISIONS, "64-true"])
@pytest.mark.parametrize("name", registry.available_backends())
def test_an_engine_trains_exactly_the_precisions_it_declares(name: str, precision: str) -> None:
    engine_class = registry.backend_class(name)
    engine = engine_class(engine_class.Config())
    declared = precision in engine_class.precisions
    assert set(engine_class.precisions) <= set(TRAINER_PRECISIONS)
    if declared:
        engine.set_precision(precision)
        assert engine.refusals(RunNeeds(precision=precision)) == []
        return
    with pytest.raises(ValueError, match=f"precision={precision!r}.*`{name}` backend") as refused:
        engine.set_precision(precision)
    # The refusal names every precision it trains with, and the backends that train this one.
    assert all(repr(supported) in str(refused.value) for supported in engine_class.precisions)
    others = [other for other in registry.available_backends() if precision in registry.backend_class(other).precisions]
    assert all(f"`backend={other!r}`" in str(refused.value) for other in others)
    assert [message for _, message in engine.refusals(RunNeeds(precision=precision))] == [str(refused.value)]


def test_unknown_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown backend 'gpu8bit'. Choose one of \['auto', 'deepspeed'"):
        registry.spec("gpu8bit")
    assert registry.find("gpu8bit") is None


def test_the_multi_process_backends_are_those_whose_spec_spans_processes() -> None:
    spanning = registry.multi_process_backends()
    assert spanning and set(spanning) < set(registry.available_backends())
    assert all(registry.spec(name).multi_process is not None for name in spanning)


@pytest.mark.slow
def test_importing_the_package_loads_no_backend() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, lightning_offload; "
         "print(sorted(m for m in sys.modules if m.startswith('lightning_offload.backends.')))"],
        capture_output=True, text=True, check=True, timeout=300).stdout
    # The engines' shared base, what a run asks of them and the registry: no engine.
    assert ast.literal_eval(loaded) == ["lightning_offload.backends.base", "lightning_offload.backends.needs",
                                        "lightning_offload.backends.registry"]


def test_a_precision_refusal_across_processes_names_only_backends_that_train_across_processes() -> None:
    fsdp = registry.backend_class("fsdp")
    one_gpu = [name for name in registry.backends_training("bf16-true") if name not in registry.multi_process_backends()]
    assert one_gpu  # gpu_8bit, host_adam, stream: the single-process refusal names them
    [(_, alone)] = fsdp.refusals(RunNeeds(precision="bf16-true"))
    [(_, across)] = fsdp.refusals(RunNeeds(precision="bf16-true", processes=2))
    assert all(f"`backend={name!r}`" in alone for name in one_gpu)
    assert not any(f"`backend={name!r}`" in across for name in one_gpu)
    assert "`backend='deepspeed'`" in across and "`backend='device'`" in across
