"""What a call still has to run, and each cell's estimated time from the measured cells of its method."""

from __future__ import annotations

import math

import pytest

from bench.matrix import expand, load_config
from bench.models import SIZES
from bench.schedule import answered, estimate_s, unmeasured


@pytest.fixture(scope="module")
def config():
    return load_config()


def _cell(config, name: str):
    size, method, regime = name.split("/")
    return expand(config, sizes=[size], methods=[method], regimes=[regime])[0]


def _ok(name: str, step_s: float, wall_s: float, steps: int = 8, accumulate: int = 1) -> dict:
    size, method, regime = name.split("/")
    return {"cell": name, "size": size, "method": method, "regime": regime, "params": SIZES[size].params,
            "status": "ok", "step_s_mean": step_s, "wall_s": wall_s, "steps": steps, "accumulate": accumulate}


@pytest.mark.parametrize("record, expected", [
    (None, False),
    ({"status": "not_run"}, False),
    ({"status": "not_measured"}, False),
    ({"status": "ok", "superseded": "before a fix"}, False),
    ({"status": "killed", "superseded": "before a fix"}, False),
    ({"status": "ok"}, True),
    ({"status": "killed"}, True),
    ({"status": "timeout"}, True),
    ({"status": "skipped", "inferred_from": "8b/plain/r1"}, True),
])
def test_a_cell_is_answered_by_any_current_outcome_but_not_by_a_gap_or_an_out_of_date_figure(record, expected):
    assert answered(record) is expected


def test_unmeasured_keeps_the_order_of_the_cells_asked_for(config):
    cells = expand(config, sizes=["1.5b", "3.6b"], methods=["plain", "torchtune"], regimes=["r1"])
    current = {"1.5b/plain/r1": {"status": "ok"}, "3.6b/plain/r1": {"status": "not_run"},
               "3.6b/torchtune/r1": {"status": "ok", "superseded": "before a fix"}}
    assert [cell.name for cell in unmeasured(cells, current)] == [
        "1.5b/torchtune/r1", "3.6b/plain/r1", "3.6b/torchtune/r1"]


def test_the_same_size_in_the_other_regime_scales_by_the_micro_batches_per_step(config):
    measured = [_ok("3.6b/plain/r1", step_s=0.6, wall_s=0.6 * 8 + 20), _ok("1.5b/plain/r2", 2.0, 60, 5, 8)]
    cell = _cell(config, "3.6b/plain/r2")  # 5 steps of 8 micro-batches
    assert estimate_s(cell, measured) == pytest.approx(20 + 5 * 0.6 * 8)


def test_a_larger_model_scales_steps_with_the_parameters_and_the_rest_more_slowly(config):
    measured = [_ok("8b/single_gpu_offload_stream/r1", step_s=1.0, wall_s=8 + 20),
                _ok("1.5b/single_gpu_offload_stream/r1", step_s=0.3, wall_s=30)]
    cell = _cell(config, "32.8b/single_gpu_offload_stream/r1")
    scale = SIZES["32.8b"].params / SIZES["8b"].params  # from the nearest size measured
    assert estimate_s(cell, measured) == pytest.approx(20 * math.sqrt(scale) + 8 * 1.0 * scale)


def test_no_estimate_without_a_current_measurement_of_the_method(config):
    cell = _cell(config, "8b/lightning_auto/r1")
    failed = {**_ok("3.6b/lightning_auto/r1", 0.7, 30), "status": "gpu_oom"}
    out_of_date = {**_ok("3.6b/lightning_auto/r1", 0.7, 30), "superseded": "before a fix"}
    other_method = _ok("3.6b/plain/r1", 0.6, 30)
    assert estimate_s(cell, [failed, out_of_date, other_method]) is None
    assert estimate_s(_cell(config, "3.6b/torchtune/r2"), []) == 0.0  # it cannot run: recorded at once


def test_calls_take_cells_in_order_while_each_fits_the_time_left():
    from bench.schedule import calls

    # 300 fits; 400 does not fit the 200 left and waits; 150 fits; the next call starts with the 400.
    assert calls([300, 400, 150, 100], call_s=500) == [[0, 2], [1, 3]]
    # A cell longer than a whole call gets one to itself; cells already answered cost nothing.
    assert calls([700, 0, 200], call_s=500) == [[0, 1], [2]]
    assert calls([], call_s=500) == []
