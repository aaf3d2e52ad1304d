"""The matrix: config loading, expansion into cells, subset selection, and why a cell cannot run."""

from __future__ import annotations

import argparse

import pytest

from bench.matrix import (DEFAULT_CONFIG, add_override_arguments, expand, load_config, override_arguments,
                          overrides_from, parse_list)
from bench.methods import BASELINES


@pytest.fixture(scope="module")
def config():
    return load_config()


def ours(config) -> list[str]:
    """lightning_offload's rows: one per backend listed in bench/matrix.yaml."""
    return [name for name in config.default_methods if name.startswith("single_gpu_offload_")]


def test_config_lists_every_size_and_method_of_the_issue(config):
    assert config.sizes == ["1.5b", "3.6b", "8b", "14.8b", "19b", "32.8b", "40.8b"]
    assert {"single_gpu_offload_deepspeed", "single_gpu_offload_auto"} <= set(ours(config))
    assert config.default_methods == [method.name for method in BASELINES] + ours(config)
    assert config.methods["single_gpu_offload_auto"].options["backend"] == "auto"
    assert set(config.regimes) == {"r1", "r2"}
    assert config.regimes["r1"].tokens_per_step == 8192
    assert config.regimes["r2"].tokens_per_step == 65536


def test_full_matrix_keeps_every_cell_and_says_why_some_cannot_run(config):
    cells = expand(config)
    assert len(cells) == 7 * (len(BASELINES) + len(ours(config))) * 2
    skipped = {(cell.method.name, cell.regime.name) for cell in cells if cell.skip}
    # torchtune's in-backward step and torchao's gradient offload cannot accumulate (their accumulating modes are
    # rows of their own); everything runs in R1.
    assert skipped == {("torchtune", "r2"), ("torchtune_linear", "r2"), ("torchtune_compiled", "r2"),
                       ("torchao_offload", "r2")}
    assert {cell.skip for cell in cells if cell.skip} == {"cannot accumulate gradients (R1 only)"}
    assert len({cell.name for cell in cells}) == len(cells)


def test_subset_selection_in_regime_size_method_order(config):
    cells = expand(config, sizes=parse_list("3.6B, 1.5b"), methods=parse_list("torchtune,plain"),
                   regimes=parse_list("r1"))
    assert [cell.name for cell in cells] == ["3.6b/torchtune/r1", "3.6b/plain/r1", "1.5b/torchtune/r1",
                                             "1.5b/plain/r1"]
    assert parse_list("") is None and parse_list(None) is None


@pytest.mark.parametrize("kind, selection", [("size", {"sizes": ["2b"]}), ("method", {"methods": ["zero9"]}),
                                             ("regime", {"regimes": ["r3"]})])
def test_unknown_names_fail_before_anything_runs(config, kind, selection):
    with pytest.raises(ValueError, match=f"Unknown {kind}"):
        expand(config, **selection)


def test_cpu_runs_only_the_methods_that_can(config):
    cells = expand(config, sizes=["tiny"], regimes=["r1"], device="cpu")
    runnable = {cell.method.name for cell in cells if cell.skip is None}
    # Liger-Kernel's loss is Triton's (CUDA only).
    assert runnable == {"plain", "lightning_auto", *ours(config)} - {"single_gpu_offload_gpu_8bit_compiled_liger"}
    assert {cell.skip for cell in cells if cell.skip} == {"needs CUDA"}


def test_overrides_reach_every_selected_regime_and_round_trip_to_a_child(config):
    parser = argparse.ArgumentParser()
    add_override_arguments(parser)
    overrides = overrides_from(parser.parse_args(["--steps", "2", "--micro-batch", "1"]))
    assert overrides == {"steps": 2, "micro_batch": 1}
    cells = expand(config, sizes=["tiny"], methods=["plain"], overrides=overrides)
    assert {(cell.regime.steps, cell.regime.micro_batch, cell.regime.seq) for cell in cells} == {(2, 1, 2048)}
    assert overrides_from(parser.parse_args(override_arguments(overrides))) == overrides


def test_deepspeed_methods_are_known_to_build_cpu_adam(config):
    building = {name for name, method in config.methods.items() if method.builds_deepspeed_cpu_adam}
    assert building >= {"deepspeed_zero2_offload", "deepspeed_zenflow", "lightning_deepspeed_stage_2_offload",
                        "lightning_deepspeed_stage_3_offload", "single_gpu_offload_deepspeed"}
    assert "plain" not in building and "torchtune" not in building


def test_a_backend_with_an_unknown_cost_profile_is_refused(tmp_path):
    text = DEFAULT_CONFIG.read_text().replace("deepspeed: zero3_offload", "deepspeed: zero4")
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="unknown cost 'zero4'"):
        load_config(path)


def _measured(cell: str, status: str, cause: str | None = None, accumulate: int = 1) -> dict:
    size, method, regime = cell.split("/")
    return {"cell": cell, "size": size, "method": method, "regime": regime, "micro_batch": 4, "seq": 2048,
            "accumulate": accumulate, "steps": 8 if accumulate == 1 else 5, "status": status, "cause": cause}


def test_a_memory_failure_answers_the_larger_cells_of_its_method_and_accumulating_regimes(config):
    from bench.matrix import skip_known_failures

    measured = [_measured("8b/plain/r1", "gpu_oom"), _measured("14.8b/plain/r1", "gpu_oom"),
                _measured("3.6b/plain/r1", "ok"),
                _measured("8b/single_gpu_offload_device/r1", "error", "PlanDoesNotFit: No plan fits ..."),
                _measured("8b/deepspeed_zero2_offload/r1", "killed"),
                _measured("8b/lightning_auto/r1", "timeout", "timeout after 420 s"),
                _measured("8b/single_gpu_offload_fsdp/r1", "error", "RuntimeError: something else"),
                _measured("8b/torchao_offload/r1", "crashed", "crashed: SIGSEGV")]
    names = ("plain,single_gpu_offload_device,deepspeed_zero2_offload,lightning_auto,single_gpu_offload_fsdp,"
             "torchao_offload")
    cells = skip_known_failures(expand(config, methods=parse_list(names)), measured, timeout_s=420)
    skipped = {cell.name: cell for cell in cells if cell.inferred_from}
    # The smallest failure answers: 14.8B is skipped because of 8B; 8B itself is measured again when asked for.
    assert skipped["14.8b/plain/r1"].skip == "not run: out of GPU memory at 8b/plain/r1 (needs more memory here)"
    assert skipped["14.8b/plain/r1"].inferred_from == "8b/plain/r1"
    assert "8b/plain/r1" not in skipped and "3.6b/plain/r1" not in skipped and "3.6b/plain/r2" not in skipped
    # Accumulating the same micro-batches only adds memory: R2 at the failed size is answered too.
    assert skipped["8b/plain/r2"].inferred_from == "8b/plain/r1"
    assert skipped["40.8b/single_gpu_offload_device/r2"].skip.startswith("not run: refused by the planner at 8b")
    assert skipped["19b/deepspeed_zero2_offload/r1"].skip.startswith("not run: killed by the kernel")
    # A crash, another error, or a timeout under an unknown limit answers nothing.
    assert not any(name.split("/")[1] in ("lightning_auto", "single_gpu_offload_fsdp", "torchao_offload")
                   for name in skipped)
    # A cell that cannot run for another reason keeps that reason.
    assert all(cell.skip == "cannot accumulate gradients (R1 only)" for cell in skip_known_failures(
        expand(config, methods=["torchtune"], regimes=["r2"]), [_measured("8b/torchtune/r1", "gpu_oom")], 420))


def test_a_timeout_under_the_cells_limit_answers_the_cells_with_more_work(config):
    from bench.matrix import skip_known_failures

    predicted = _measured("8b/single_gpu_offload_fsdp/r1", "timeout",
                          "predicted timeout: fsdp + adamw8bit at 136 s/step needs ~1089 s for 8 steps, 194 s left")
    killed = _measured("3.6b/lightning_fsdp_cpu_offload/r2", "timeout", "timeout after 420 s", accumulate=8)
    cut = _measured("3.6b/deepspeed_zenflow/r1", "timeout", "timeout after 67 s")
    cut_but_beyond = _measured("3.6b/single_gpu_offload_deepspeed/r1", "timeout",
                               "predicted timeout: ... (and beyond its own 420 s limit)")
    measured = [predicted | {"timeout_s": 420}, killed | {"timeout_s": 420}, cut | {"timeout_s": 67},
                cut_but_beyond | {"timeout_s": 200}]
    names = "single_gpu_offload_fsdp,lightning_fsdp_cpu_offload,deepspeed_zenflow,single_gpu_offload_deepspeed"
    cells = skip_known_failures(expand(config, methods=parse_list(names)), measured, timeout_s=420)
    skipped = {cell.name: cell for cell in cells if cell.inferred_from}
    assert skipped["14.8b/single_gpu_offload_fsdp/r1"].skip == (
        "not run: predicted to time out at 8b/single_gpu_offload_fsdp/r1 (needs more time here: a larger model)")
    assert skipped["14.8b/single_gpu_offload_fsdp/r2"].skip.endswith(
        "(needs more time here: a larger model and 40 micro-batches, not 8)")
    # R2 steps 5 x 8 micro-batches, more than R1's 8: answered at the same size.
    assert skipped["8b/single_gpu_offload_fsdp/r2"].skip.endswith("(needs more time here: 40 micro-batches, not 8)")
    assert "3.6b/single_gpu_offload_fsdp/r1" not in skipped and "8b/single_gpu_offload_fsdp/r1" not in skipped
    # R1 is less work than R2: an R2 timeout answers only larger R2 cells.
    assert skipped["8b/lightning_fsdp_cpu_offload/r2"].skip.startswith("not run: timed out at 3.6b")
    assert not any(name.startswith(("3.6b/lightning_fsdp", "8b/lightning_fsdp_cpu_offload/r1")) for name in skipped)
    # A timeout that the call's deadline cut says nothing of its method, unless the planner predicted it anyway.
    assert not any("deepspeed_zenflow" in name for name in skipped)
    assert skipped["8b/single_gpu_offload_deepspeed/r1"].inferred_from == "3.6b/single_gpu_offload_deepspeed/r1"
    # A cell given a longer limit than the timeout's is not answered by it.
    longer = skip_known_failures(expand(config, methods=["single_gpu_offload_fsdp"]), measured, timeout_s=3600)
    assert not any(cell.inferred_from for cell in longer)


def test_an_inferred_skip_is_not_a_failure_to_infer_from(config):
    from bench.matrix import skip_known_failures

    inferred = _measured("14.8b/plain/r1", "skipped", "not run: ...") | {"inferred_from": "8b/plain/r1"}
    cells = skip_known_failures(expand(config, methods=["plain"]), [inferred], 420)
    assert not any(cell.skip and cell.inferred_from for cell in cells)


def test_a_superseded_rule_covers_its_method_and_regime_before_its_time():
    from bench.matrix import Superseded, mark_superseded

    rule = Superseded(method="single_gpu_offload_fsdp", regime="r2", before="2026-11-24T02:08:33+00:00",
                      why="before the fix")
    before = {**_measured("3.6b/single_gpu_offload_fsdp/r2", "timeout"), "finished_at": "2026-11-24T02:03:45+00:00"}
    assert mark_superseded(before, [rule])["superseded"] == "before the fix"
    after = before | {"finished_at": "2026-11-24T03:00:00+00:00"}
    other_regime = {**_measured("3.6b/single_gpu_offload_fsdp/r1", "ok"), "finished_at": before["finished_at"]}
    other_method = {**_measured("3.6b/plain/r2", "ok"), "finished_at": before["finished_at"]}
    assert not any("superseded" in mark_superseded(record, [rule]) for record in (after, other_regime, other_method))
    # A time without a zone is UTC, as run.py writes them.
    assert "superseded" in mark_superseded(before | {"finished_at": "2026-11-24T02:03:45"}, [rule])


def test_a_superseded_rule_with_sizes_covers_only_those():
    from bench.matrix import Superseded, mark_superseded

    rule = Superseded(method="single_gpu_offload_stream", regime="r1", sizes=("32.8b", "40.8b"),
                      before="2026-12-05T08:45:12+00:00", why="plans more resident blocks")
    record = {**_measured("40.8b/single_gpu_offload_stream/r1", "ok"), "finished_at": "2026-11-24T01:21:50+00:00"}
    assert mark_superseded(record, [rule])["superseded"] == "plans more resident blocks"
    smaller = {**_measured("19b/single_gpu_offload_stream/r1", "ok"), "finished_at": record["finished_at"]}
    assert "superseded" not in mark_superseded(smaller, [rule])


def test_a_superseded_rule_with_a_profile_covers_only_that_machines_cells():
    from bench.matrix import Superseded, mark_superseded

    rule = Superseded(method="single_gpu_offload_auto", regime="r2", sizes=("8b",), profile="24gb_64gib",
                      before="2026-12-08T01:08:52+00:00", why="sums streamed gradients on the host")
    refused = {**_measured("8b/single_gpu_offload_auto/r2", "error"), "finished_at": "2026-12-07T10:00:00+00:00"}
    assert "superseded" not in mark_superseded(refused, [rule])  # the whole machine's cell
    assert mark_superseded(refused | {"profile": "24gb_64gib"}, [rule])["superseded"] == rule.why
    assert "superseded" not in mark_superseded(refused | {"profile": "48gb_128gib"}, [rule])


def test_a_superseded_failure_answers_no_other_cell(config):
    from bench.matrix import skip_known_failures

    killed = _measured("8b/single_gpu_offload_fsdp/r1", "killed") | {"superseded": "before a fix"}
    cells = skip_known_failures(expand(config, methods=["single_gpu_offload_fsdp"]), [killed], 420)
    assert not any(cell.inferred_from for cell in cells)


def test_the_config_s_superseded_rules_name_known_methods_and_regimes(config, tmp_path):
    assert {rule.method for rule in config.superseded} >= {"single_gpu_offload_fsdp", "single_gpu_offload_stream"}
    for wrong, error in (("regime: r2", "Unknown regime"), ("sizes: [32.8b", "Unknown size")):
        bad = DEFAULT_CONFIG.read_text().replace(wrong, wrong.replace("r2", "r9").replace("32.8b", "33b"))
        (tmp_path / "matrix.yaml").write_text(bad)
        with pytest.raises(ValueError, match=error):
            load_config(tmp_path / "matrix.yaml")


def test_a_profile_names_its_cells_and_its_failures_answer_only_its_own(config):
    from bench.matrix import skip_known_failures

    cells = expand(config, ["8b", "14.8b"], ["single_gpu_offload_auto", "lightning_deepspeed_stage_3_offload_pinned"],
                   ["r1"], profile="24gb_64gib")
    assert [cell.name for cell in cells][:2] == ["8b/single_gpu_offload_auto/r1@24gb_64gib",
                                                  "8b/lightning_deepspeed_stage_3_offload_pinned/r1@24gb_64gib"]
    record = cells[0].record("ok", None)
    assert record["profile"] == "24gb_64gib"
    assert record["profile_host_gib"] == config.profiles["24gb_64gib"].host_memory_gib
    on_the_whole_machine = _measured("8b/lightning_deepspeed_stage_3_offload_pinned/r1", "killed")
    assert not any(cell.skip for cell in skip_known_failures(cells, [on_the_whole_machine], 420))
    on_the_profile = on_the_whole_machine | {"cell": f"{on_the_whole_machine['cell']}@24gb_64gib",
                                             "profile": "24gb_64gib"}
    skipped = [cell.name for cell in skip_known_failures(cells, [on_the_profile], 420) if cell.skip]
    assert skipped == ["14.8b/lightning_deepspeed_stage_3_offload_pinned/r1@24gb_64gib"]
    with pytest.raises(ValueError, match=r"Unknown profile\(s\) \['16gb'\]"):
        expand(config, profile="16gb")
