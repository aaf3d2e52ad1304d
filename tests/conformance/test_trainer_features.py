"""The Trainer's own features (flags, callbacks, the tuner, a second `fit`) under every backend that runs on the CPU,
against the same features under `strategy="auto"` (the 8-bit plans: against their twin, as in `test_cpu.py`).

Each cell trains with auto's per-step losses, logs what auto logs at the same steps, takes as many optimizer steps and
ends with weights that validate and predict as auto's do; or it is refused at setup by a message of the
strategy's naming the feature, the backend and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from typing import Any

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from tests.conformance.features import FEATURE_OPTIONS, FEATURES, Feature, FeatureModule, MetricsHistory
from tests.conformance.runs import Run, run, strategies
from tests.conformance.test_cpu import (
    BACKEND_RTOL,
    BITWISE,
    EIGHT_BIT,
    EIGHT_BIT_METRIC_RTOL,
    EIGHT_BIT_PRECISION,
    assert_same_run,
    refused_as_expected,
)
from tests.planner.test_strategy_planning import prefer

KIND = "llama_tied"
# The final weights' logits (`predict` after `fit`) carry the optimizers' rounding differences through up to 9
# steps, and Adam turns a last-bit difference in a near-zero gradient into a whole update: measured at most 1.6e-6
# of the largest logit under torch's fused AdamW (`host_adam`, `fsdp`), 2.4e-5 under DeepSpeedCPUAdam (`deepspeed`,
# with accumulation). A doubled lr moves them by far more (`test_prediction_tolerance_catches_a_doubled_lr`).
PREDICTION_RTOL = {"host_adam": 1e-5, "fsdp": 1e-5, "deepspeed": 1e-4}
PLAIN = Feature("nothing turned on")

# What the strategy refuses at setup, by (feature, backend): (a part of the message, the reason in the docs' table).
_CLIP_IN_BACKWARD = ("cannot clip", "updates inside backward, before a gradient norm exists")
_GRADIENTS_CONSUMED = ("overrides `on_before_optimizer_step`", "gradients consumed inside backward")
_SHARDED_AVERAGE = ("averaged copy", "sharded parameters")
REFUSED: dict[tuple[str, str], tuple[str, str]] = {
    ("clip_norm", "stream"): _CLIP_IN_BACKWARD,
    ("clip_value", "stream"): _CLIP_IN_BACKWARD,
    ("clip_value", "deepspeed"): ("clips by global norm only", "DeepSpeed clips by norm only"),
    **{(feature, backend): _GRADIENTS_CONSUMED for feature in ("grad_norm_callback", "gradient_transform_callback")
       for backend in ("host_adam", "deepspeed", "stream")},
    **{("ema", backend): _SHARDED_AVERAGE for backend in ("deepspeed", "fsdp")},
    ("swa", "deepspeed"): ("`SWALR` schedules a torch optimizer", "DeepSpeed's optimizer"),
    ("swa", "fsdp"): _SHARDED_AVERAGE,
    ("lr_find", "deepspeed"): ("drives a torch optimizer", "DeepSpeed's optimizer"),
}
# Cells that train but not yet as auto does.
KNOWN_DIFFERENCES = {
    ("grad_norm_callback", "fsdp"):
        "Lightning's `grad_norm` fails on DTensor gradients: it stacks the per-parameter norms with `torch.tensor`, "
        "which cannot read FSDP2's DTensors",
}


@functools.cache
def _run(feature_name: str, backend: str | None) -> tuple[Run, list[tuple[int | None, dict[str, float]]]]:
    """One run of a feature: under auto (`backend=None`), the 8-bit twin (`"twin"`), or a backend."""
    precision = EIGHT_BIT_PRECISION if backend in (*EIGHT_BIT, "twin") else "32-true"
    strategy: Any = "auto"
    if backend == "twin":
        strategy = SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit_fused")
    elif backend is not None:
        strategy = strategies()[backend]()
    return _train(feature_name, strategy, precision)


def _train(feature_name: str, strategy: Any, precision: str) -> tuple[Run, list[tuple[int | None, dict[str, float]]]]:
    feature = FEATURES.get(feature_name, PLAIN)
    history = MetricsHistory()
    # The tuners write a checkpoint to restore into the Trainer's root folder: a temporary one.
    with tempfile.TemporaryDirectory() as root:
        options = {"logger": history, "default_root_dir": root, **FEATURE_OPTIONS, **feature.trainer_options}
        result = run(KIND, strategy, precision=precision, build=FeatureModule, trainer_options=options,
                     callbacks=feature.callbacks(), train=feature.train)
    return result, history.history


def reference(feature_name: str, backend: str) -> tuple[Run, list[tuple[int | None, dict[str, float]]]]:
    return _run(feature_name, "twin" if backend in EIGHT_BIT else None)


def assert_same_history(actual: list[tuple[int | None, dict[str, float]]],
                        expected: list[tuple[int | None, dict[str, float]]], rtol: float) -> None:
    """The same metrics, logged at the same steps, with the same values."""
    assert [(step, sorted(metrics)) for step, metrics in actual] == \
        [(step, sorted(metrics)) for step, metrics in expected]
    got = [value for _, metrics in actual for _, value in sorted(metrics.items())]
    want = [value for _, metrics in expected for _, value in sorted(metrics.items())]
    if rtol == BITWISE:
        assert got == want
    else:
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=rtol, atol=0.0)


def assert_same_predictions(actual: Run, expected: Run, rtol: float) -> None:
    """The same logits from the final weights, within `rtol` of the largest."""
    assert len(actual.predictions) == len(expected.predictions) > 0
    for got, want in zip(actual.predictions, expected.predictions, strict=True):
        if rtol == BITWISE:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0.0, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("backend", list(strategies()))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_works_as_under_auto_or_is_refused_at_setup(feature: str, backend: str, record_property) -> None:
    if (feature, backend) in KNOWN_DIFFERENCES:
        pytest.xfail(KNOWN_DIFFERENCES[feature, backend])
    result, history = _run(feature, backend)
    if refused_as_expected(result, REFUSED.get((feature, backend)), record_property):
        return
    assert result.refusal is None, f"refused: {result.refusal}"
    expected, expected_history = reference(feature, backend)
    rtol = BACKEND_RTOL[backend]
    metric_rtol = EIGHT_BIT_METRIC_RTOL if backend in EIGHT_BIT else None
    assert result.optimizer_steps == expected.optimizer_steps
    assert_same_run(dataclasses.replace(result, predictions=[]), dataclasses.replace(expected, predictions=[]), rtol,
                    metric_rtol=metric_rtol)
    assert_same_predictions(result, expected, PREDICTION_RTOL.get(backend, rtol))
    assert_same_history(history, expected_history, rtol if metric_rtol is None else metric_rtol)
    agreement = "same bits" if rtol == BITWISE else f"within {rtol:g}"
    record_property("outcome", f"{agreement} (twin)" if backend in EIGHT_BIT else agreement)


@pytest.mark.parametrize("backend", list(strategies()))
def test_lr_monitor_names_an_unscheduled_lr_as_under_auto(backend: str) -> None:
    """The 8-bit plans' cells compare with their twin: each backend's names against `strategy="auto"` itself."""
    def lr_names(history: list[tuple[int | None, dict[str, float]]]) -> list[tuple[int | None, list[str]]]:
        return [(step, sorted(name for name in metrics if name.startswith("lr-"))) for step, metrics in history]

    names = lr_names(_run("lr_monitor_unscheduled", backend)[1])
    assert names == lr_names(_run("lr_monitor_unscheduled", None)[1])
    assert any(logged for _, logged in names)


@pytest.mark.parametrize(("feature", "backend"), sorted(REFUSED))
def test_auto_plans_around_a_backend_that_refuses_the_feature(feature: str, backend: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`backend="auto"` on a machine where `backend`'s plans would be the fastest: the feature's run trains on a
    backend that runs it, as under `strategy="auto"`."""
    prefer(monkeypatch, backend, "device")
    strategy = SingleGPUOffloadStrategy()
    result, history = _train(feature, strategy, "32-true")
    assert result.refusal is None, f"refused: {result.refusal}"
    assert strategy.backend_name == "device" and backend in strategy.plan_report.left_out
    expected, expected_history = _run(feature, None)
    assert result.optimizer_steps == expected.optimizer_steps
    assert_same_run(result, expected, BACKEND_RTOL["device"])
    assert_same_history(history, expected_history, BACKEND_RTOL["device"])


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_feature_changes_the_run(feature: str) -> None:
    """A feature the reference ran without effect would make its cells pass whatever the strategy does with it."""
    if not FEATURES[feature].changes_the_run:
        pytest.skip("the feature cannot act within the run")
    result, history = _run(feature, None)
    plain, plain_history = _run(PLAIN.label, None)
    assert (result.losses, result.optimizer_steps, result.metrics, history) != \
        (plain.losses, plain.optimizer_steps, plain.metrics, plain_history)


def test_prediction_tolerance_catches_a_doubled_lr() -> None:
    class DoubledLr(FeatureModule):
        def __init__(self) -> None:
            super().__init__()
            self.lr *= 2

    history = MetricsHistory()
    mistaken = run(KIND, SingleGPUOffloadStrategy(backend="device"), build=DoubledLr,
                   trainer_options={"logger": history, **FEATURE_OPTIONS})
    with pytest.raises(AssertionError):
        assert_same_predictions(mistaken, _run(PLAIN.label, None)[0], max(PREDICTION_RTOL.values()))
