"""Choosing a plan: the fastest that fits, the user's optimizer kept when possible, refusals that say what fits."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_offload.losses import slice_workspace_bytes
from lightning_offload.planner import (GIB, SAFETY_MARGIN, Ceilings, Machine, MemoryEstimate, Plan, PlanDoesNotFit,
                                       RunNeeds, estimate_memory, plan, shortfalls)
from lightning_offload.planner.choose import Candidate, PlanReport, candidate_plans, choose, ordered
from lightning_offload.planner.cost import StepTime, estimate_step_time
from tests.planner.test_memory import LLAMA_8B

BACKENDS = ("deepspeed", "device", "fsdp", "gpu_8bit", "host_adam", "stream")
H100 = Machine()
CARD_40GB = Machine(gpu_memory_gib=40, host_memory_gib=64)


def report(machine: Machine, **levers):
    plans = candidate_plans(LLAMA_8B, backends=BACKENDS, on_cuda=True, **levers)
    return choose(LLAMA_8B, machine, Ceilings(), plans,
                  allow_eight_bit=levers.get("optimizer") in ("adamw8bit", "adamw8bit_fused"))


def test_planning_for_a_machine_given_by_overrides_is_deterministic() -> None:
    first, second = report(CARD_40GB), report(CARD_40GB)
    assert first.chosen.plan == second.chosen.plan
    assert first.rows() == second.rows()


def test_step_times_a_tenth_of_a_percent_apart_tie_and_the_leaner_plan_wins_at_any_scale() -> None:
    def candidate(seconds: float, host_gib: float) -> Candidate:
        memory = MemoryEstimate(Plan(backend="device"), gpu={"weights": 2**30}, host={"state": int(host_gib * 2**30)})
        return Candidate(memory.plan, memory, StepTime(seconds, 0.0, 0.0, seconds), {})

    for scale in (0.01, 1.0, 100.0):
        fast_heavy, slow_lean = candidate(1.0000 * scale, host_gib=20), candidate(1.0005 * scale, host_gib=1)
        assert ordered([fast_heavy, slow_lean])[0] is slow_lean
        # 0.3% or 8% apart is no tie, however small the step (0.059 and 0.064 s rounded alike to 0.06 s).
        for slower in (1.003, 1.085):
            fast_heavy, slow_lean = candidate(0.059 * scale, host_gib=20), candidate(0.059 * slower * scale, host_gib=1)
            assert ordered([slow_lean, fast_heavy])[0] is fast_heavy


def test_keeps_the_users_optimizer_when_an_exact_plan_fits() -> None:
    chosen = report(H100).chosen
    assert chosen.fits and chosen.plan.exact_optimizer
    # 8B with fp32 AdamW: the device plan needs 16 bytes/param (120 GiB) - too much for 80 GB.
    assert chosen.plan.backend == "host_adam"
    assert "8-bit" in report(H100).reason


def test_eight_bit_state_when_the_user_asks_for_it() -> None:
    chosen = report(H100, optimizer="adamw8bit_fused").chosen
    assert chosen.plan.backend == "gpu_8bit" and chosen.plan.optimizer == "adamw8bit_fused"


def test_falls_back_to_eight_bit_state_with_a_reason_when_nothing_exact_fits() -> None:
    small = report(CARD_40GB)
    assert small.chosen is not None and not small.chosen.plan.exact_optimizer
    assert "no plan with your optimizer's fp32 state fits" in small.reason


def test_pinned_levers_are_kept() -> None:
    pinned = report(H100, checkpointing="none")
    assert {c.plan.checkpointing for c in pinned.candidates} == {"none"}
    assert pinned.chosen is None or pinned.chosen.plan.checkpointing == "none"
    only_deepspeed = choose(LLAMA_8B, H100, Ceilings(),
                            candidate_plans(LLAMA_8B, backends=["deepspeed"], on_cuda=True))
    assert {c.plan.backend for c in only_deepspeed.candidates} == {"deepspeed"}


def test_refusal_names_the_tier_the_shortfall_and_what_would_fit() -> None:
    tiny = Machine(gpu_memory_gib=16, host_memory_gib=32)
    refused = report(tiny, checkpointing="none")
    assert refused.chosen is None
    error = refused.error()
    assert isinstance(error, PlanDoesNotFit)
    nearest = min(refused.candidates, key=lambda c: (sum(c.shortfalls.values()), c.step_time_s))
    tier, gib = next(iter(nearest.shortfalls.items()))
    message = str(error)
    assert f"{tier} short by {gib:.1f} GiB" in message and str(nearest.plan) in message
    assert "16 GiB GPU, 32 GiB host RAM" in message
    assert "micro-batch" in message or "checkpointing" in message


def test_refusal_of_a_pinned_backend_names_a_backend_that_fits() -> None:
    # 8B on an 80 GB card: `device` cannot hold even 8-bit state (the benchmark's refused cell); gpu_8bit can.
    pinned = choose(LLAMA_8B, H100, Ceilings(), candidate_plans(LLAMA_8B, backends=["device"], on_cuda=True))
    assert pinned.chosen is None
    fitting = report(H100, optimizer="adamw8bit_fused").chosen
    assert f"`backend='{fitting.plan.backend}'` fits ({fitting.plan}" in str(pinned.error())
    assert "`backend='" not in str(report(Machine(gpu_memory_gib=8, host_memory_gib=16)).error())


def test_plan_front_end_on_a_module_for_another_machine() -> None:
    import torch

    from lightning_offload.models import TinyGPT

    with torch.device("meta"):
        model = TinyGPT(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=512)
    result = plan(model, torch.zeros(4, 512, dtype=torch.long), machine=CARD_40GB, ceilings=Ceilings(),
                  device="cuda")
    assert result.chosen.plan.backend == "device" and result.chosen.fits
    assert "->" in result.table()
    with pytest.raises(ValueError, match="example_input"):
        plan(model, machine=CARD_40GB, ceilings=Ceilings(), device="cuda")


def test_plan_front_end_plans_a_model_whose_blocks_checkpoint_themselves_as_fully_checkpointed() -> None:
    import torch

    from lightning_offload.activation_checkpointing import recompute_in_backward
    from lightning_offload.models import TinyGPT

    with torch.device("meta"):
        model = TinyGPT(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=512)
    for block in model.blocks:
        recompute_in_backward(block)
    result = plan(model, torch.zeros(4, 512, dtype=torch.long), machine=CARD_40GB, ceilings=Ceilings(),
                  device="cuda")
    assert {c.plan.checkpointing for c in result.candidates} == {"full"}


def test_every_plan_in_the_table_has_a_plan_string() -> None:
    rows = report(H100).rows()
    assert all(isinstance(row["plan"], str) and row["step_time_s"] > 0 for row in rows)
    assert rows[0]["fits"]
    assert sum(row["chosen"] for row in rows) == 1
    assert isinstance(Plan(backend="device"), Plan)


def test_host_adam_keeps_the_most_blocks_state_on_the_gpu_that_fit() -> None:
    plans = candidate_plans(LLAMA_8B, backends=["host_adam"], on_cuda=True)
    assert {p.resident_blocks for p in plans} == {None}
    sized = choose(LLAMA_8B, H100, Ceilings(), plans)
    for candidate in sized.candidates:
        blocks = candidate.plan.resident_blocks
        if not candidate.fits:
            continue
        assert 0 <= blocks < LLAMA_8B.blocks
        one_more = estimate_memory(LLAMA_8B, dataclasses.replace(candidate.plan, resident_blocks=blocks + 1))
        assert shortfalls(one_more, H100, SAFETY_MARGIN).keys() == {"GPU"}
    # By hand (every block checkpointed): 25.4 GiB of weights, activations, buffers and the loss's gradients of the
    # logits leave 45.9 GiB of the 71.3 usable. The embedding and k blocks of 218M take 12 bytes per parameter, and
    # each of the 32 - k blocks the host steps may leave its gradients waiting on the GPU (2 bytes per parameter
    # less its 64 MiB input, 0.34 GiB): k = 14 takes 40.0 + 5.4 GiB, k = 15 would take 42.4 + 5.0.
    full = next(c for c in sized.candidates if c.plan.checkpointing == "full")
    assert full.plan.resident_blocks == 14
    assert sized.chosen.plan.resident_blocks > 0 and "blocks' state on the GPU" in str(sized.chosen.plan)


def test_a_pinned_host_adam_share_is_taken_as_given() -> None:
    plans = candidate_plans(LLAMA_8B, backends=["host_adam"], on_cuda=True, gpu_state_blocks=0)
    assert {c.plan.resident_blocks for c in choose(LLAMA_8B, H100, Ceilings(), plans).candidates} == {0}


def test_stream_keeps_the_most_blocks_resident_that_fit() -> None:
    card = Machine(gpu_memory_gib=24.5, host_memory_gib=64)
    plans = candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True, checkpointing="full")
    sized = choose(LLAMA_8B, card, Ceilings(), plans)
    blocks = sized.chosen.plan.resident_blocks
    assert 0 < blocks < LLAMA_8B.blocks and blocks % (LLAMA_8B.blocks // 8)  # not one of the coarse steps
    one_more = estimate_memory(LLAMA_8B, dataclasses.replace(sized.chosen.plan, resident_blocks=blocks + 1))
    assert shortfalls(one_more, card, SAFETY_MARGIN).keys() == {"GPU"}


def test_allocations_of_exact_size_keep_a_fixed_headroom_instead_of_the_margin() -> None:
    gib = 2**30
    estimate = MemoryEstimate(Plan(backend="stream"), gpu={"weights": 10 * gib},
                              host={"arenas": 96 * gib, "process": 4 * gib}, host_pinned=frozenset({"arenas"}))
    machine = Machine(gpu_memory_gib=80, host_memory_gib=105)
    assert shortfalls(estimate, machine, 0.9).keys() == {"host RAM"}  # 100 GiB > 90% of 105
    # 96 exact + 4 / 0.9 estimated + 4 kept free = 104.4 GiB
    assert shortfalls(estimate, machine, 0.9, exact_host_bytes=96 * gib) == {}
    tighter = Machine(gpu_memory_gib=80, host_memory_gib=104)
    assert shortfalls(estimate, tighter, 0.9, exact_host_bytes=96 * gib)["host RAM"] == pytest.approx(0.444, abs=1e-3)


def test_refusal_names_a_loss_without_the_full_logits_where_that_fits() -> None:
    # 8B's 128K-vocabulary logits (4 GiB in fp32) are what a 20 GB card lacks for streaming; the benchmark's
    # 40.8B refusal on the H100 was the same case.
    card = Machine(gpu_memory_gib=20, host_memory_gib=32)
    plans = candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True)
    refused = choose(LLAMA_8B, card, Ceilings(), plans, allow_eight_bit=True)
    assert refused.chosen is None
    without_logits = dataclasses.replace(LLAMA_8B, logits=0)
    assert choose(without_logits, card, Ceilings(), plans, allow_eight_bit=True).chosen is not None
    assert "full logits (3.9 GiB in fp32) fits with stream + adamw8bit_fused" in str(refused.error())
    still_refused = choose(without_logits, Machine(gpu_memory_gib=12, host_memory_gib=32), Ceilings(),
                           candidate_plans(without_logits, backends=["stream"], on_cuda=True), allow_eight_bit=True)
    assert "full logits" not in str(still_refused.error())


def test_the_hint_of_a_loss_without_logits_plans_what_the_chunked_loss_saves_instead() -> None:
    # transformers' loss saves its fp32 log-softmax (4 bytes a logit) outside the blocks; the chunked loss keeps the
    # head's weight gradient and the hidden states' in bf16 instead (bench/RESULTS.md, "the smaller machines' first
    # cells": 14.8B, 4.95 GiB outside the blocks with transformers' loss, 1.76 with the chunked one).
    full = dataclasses.replace(LLAMA_8B, outside_block_activation_bytes=4 * LLAMA_8B.logits + GIB)
    chunked = dataclasses.replace(LLAMA_8B, logits=0, loss_workspace_bytes=slice_workspace_bytes(8192, 128256),
                                  outside_block_activation_bytes=GIB + (128256 + 8192) * 4096 * 2)
    card = Machine(gpu_memory_gib=20, host_memory_gib=32)
    plans = candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True)
    refused = choose(full, card, Ceilings(), plans, allow_eight_bit=True)
    as_measured = choose(chunked, card, Ceilings(), plans, allow_eight_bit=True).chosen
    assert refused.chosen is None and as_measured is not None
    assert f"full logits (3.9 GiB in fp32) fits with {as_measured.plan}:" in str(refused.error())


def test_fsdp_adds_accumulated_gradients_up_on_the_gpu_where_they_fit() -> None:
    def pinned_fsdp(machine: Machine, accumulate: int):
        plans = candidate_plans(LLAMA_8B, backends=["fsdp"], on_cuda=True, optimizer="adamw",
                                checkpointing="full", accumulate=accumulate)
        return choose(LLAMA_8B, machine, Ceilings(), plans, accumulate=accumulate, allow_eight_bit=True)

    assert not any(c.plan.accumulate_on_gpu for c in pinned_fsdp(H100, 1).candidates)
    roomy = pinned_fsdp(Machine(gpu_memory_gib=80, host_memory_gib=256), 8)
    on_gpu, on_host = sorted(roomy.candidates, key=lambda c: not c.plan.accumulate_on_gpu)
    assert roomy.chosen.plan.accumulate_on_gpu and "gradients accumulated on the GPU" in str(roomy.chosen.plan)
    # The sum lives on the GPU in fp32; in host memory FSDP adds each micro-batch's gradients inside backward.
    assert on_gpu.memory.gpu_bytes - on_host.memory.gpu_bytes == 4 * LLAMA_8B.parameters
    assert on_host.step_time_s - on_gpu.step_time_s > 7 * LLAMA_8B.parameters / 1e9
    small_card = pinned_fsdp(Machine(gpu_memory_gib=24, host_memory_gib=256), 8)
    assert small_card.chosen is not None and not small_card.chosen.plan.accumulate_on_gpu


def test_refusal_of_an_accumulating_step_names_what_accumulation_keeps_and_what_fits_without() -> None:
    # 32.8B at 8 x 8192 tokens on the 80 GB card (the benchmark's R2) was refused with only "free host RAM": every
    # gradient kept across the micro-batches is what does not fit. Here 8B streamed on a 20 GB card.
    card = Machine(gpu_memory_gib=20, host_memory_gib=64)
    plans = candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True, accumulate=8)
    accumulating = choose(LLAMA_8B, card, Ceilings(), plans, accumulate=8, allow_eight_bit=True)
    one_micro_batch = choose(LLAMA_8B, card, Ceilings(), plans, allow_eight_bit=True)
    assert accumulating.chosen is None and one_micro_batch.chosen is not None
    message = str(accumulating.error())
    assert (f"without gradient accumulation (`accumulate_grad_batches=1`, 8192 tokens per step) "
            f"{one_micro_batch.chosen.plan} fits: accumulating 8 micro-batches keeps every gradient") in message
    # With a gradient-norm clip the gradients are kept whole anyway: no such hint.
    clipped = choose(LLAMA_8B, card, Ceilings(), plans, accumulate=8, allow_eight_bit=True, holds_gradients=True)
    assert clipped.chosen is None and "accumulate_grad_batches" not in str(clipped.error())


def test_refusal_of_an_accumulating_step_offers_the_same_tokens_as_one_larger_micro_batch() -> None:
    from lightning_offload.planner.choose import scaled

    short_sequences = dataclasses.replace(scaled(LLAMA_8B, 1 / 64), logits=0)  # 128 tokens per micro-batch
    card = Machine(gpu_memory_gib=40, host_memory_gib=64)
    plans = candidate_plans(short_sequences, backends=["gpu_8bit"], on_cuda=True, accumulate=8)
    refused = choose(short_sequences, card, Ceilings(), plans, accumulate=8, allow_eight_bit=True)
    assert refused.chosen is None
    assert "the step's 1024 tokens as one micro-batch 8x larger fit with gpu_8bit" in str(refused.error())


def test_refusal_offers_freeing_host_ram_only_where_that_alone_would_fit() -> None:
    short_of_both = choose(LLAMA_8B, Machine(gpu_memory_gib=8, host_memory_gib=16), Ceilings(),
                           candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True), allow_eight_bit=True)
    nearest = min(short_of_both.candidates, key=lambda c: (sum(c.shortfalls.values()), c.step_time_s))
    assert set(nearest.shortfalls) == {"GPU", "host RAM"}
    assert "more host RAM" not in str(short_of_both.error())
    short_of_host = choose(LLAMA_8B, Machine(gpu_memory_gib=80, host_memory_gib=16), Ceilings(),
                           candidate_plans(LLAMA_8B, backends=["deepspeed"], on_cuda=True), allow_eight_bit=True)
    assert "more host RAM (close other processes)" in str(short_of_host.error())


@pytest.mark.parametrize(("levers", "said"), [
    ({"backend": "host_adam", "optimizer": "lion8bit"}, "`host_adam`: it cannot step `optimizer='lion8bit'`"),
    ({"backend": "gpu_8bit", "adamw_compatible": False}, "`gpu_8bit`: it updates with AdamW inside backward"),
    ({"backend": "stream", "checkpointing": "none"}, "`stream`: it streams blocks under `full` or `offload`"),
])
def test_pinned_levers_that_exclude_every_plan_are_refused_with_each_reason(levers, said) -> None:
    with pytest.raises(PlanDoesNotFit, match="No plan runs with these settings") as refusal:
        plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", **levers)
    assert said in str(refusal.value)


HOOK = RunNeeds(gradient_hooks=("LogsGradNorm",))
CLIPS_BY_NORM = RunNeeds(gradient_clip_val=1.0)
CLIPS_BY_VALUE = RunNeeds(gradient_clip_val=1.0, gradient_clip_algorithm="value")


@pytest.mark.parametrize(("needs", "refusing"), [
    (HOOK, {"host_adam", "stream", "deepspeed"}),
    (CLIPS_BY_NORM, {"stream"}),
    (RunNeeds(gradient_clip_val=1.0, gradient_clip_algorithm="value"), {"stream", "deepspeed"}),
    (RunNeeds(callbacks=(("EMAWeightAveraging", "WeightAveraging", "Callback", "object"),)), {"deepspeed", "fsdp"}),
    (RunNeeds(manual_optimization=True), set(BACKENDS) - {"device"}),
    (RunNeeds(compile_blocks=True), {"deepspeed"}),
])
def test_backends_that_cannot_run_what_the_run_uses_are_left_out_and_named(needs: RunNeeds, refusing: set) -> None:
    free = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda")
    assert refusing <= {c.plan.backend for c in free.candidates} and not free.left_out
    report = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", needs=needs)
    assert {c.plan.backend for c in report.candidates} == {c.plan.backend for c in free.candidates} - refusing
    assert set(report.left_out) == refusing
    assert all(why.startswith("it cannot run ") for why in report.left_out.values())


def test_a_pinned_backend_that_cannot_run_what_the_run_uses_has_no_plan() -> None:
    with pytest.raises(PlanDoesNotFit, match=r"`Trainer\(gradient_clip_val=1.0, gradient_clip_algorithm=None\)`: "
                                             r"the 'stream' backend updates each block inside backward"):
        plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", backend="stream", needs=CLIPS_BY_NORM)


# Room in host memory for DeepSpeed's fp32 state of an 8B model: the fp16 plans fit, not only the bf16 ones.
LARGE_HOST = Machine(gpu_memory_gib=79.2, host_memory_gib=300)
BF16_ONLY = {"fsdp", "gpu_8bit", "host_adam", "stream"}


def test_backends_that_cannot_train_the_precision_are_left_out_and_named() -> None:
    bf16 = plan(LLAMA_8B, machine=LARGE_HOST, ceilings=Ceilings(), device="cuda", precision="bf16-mixed")
    fp16 = plan(LLAMA_8B, machine=LARGE_HOST, ceilings=Ceilings(), device="cuda", precision="16-mixed")
    assert bf16.chosen.plan.backend == "host_adam" and not bf16.left_out  # the choice bf16 runs keep
    assert {c.plan.backend for c in bf16.candidates} == set(BACKENDS)
    assert fp16.chosen is not None and {c.plan.backend for c in fp16.candidates} == set(BACKENDS) - BF16_ONLY
    assert set(fp16.left_out) == BF16_ONLY
    assert fp16.left_out["fsdp"] == "it cannot run `precision='16-mixed'` (it trains 'bf16-mixed' or '32-true')"
    assert "`fsdp`: it cannot run `precision='16-mixed'`" in fp16.table()


def test_a_pinned_backend_that_cannot_train_the_precision_is_refused_with_the_precisions_it_trains() -> None:
    with pytest.raises(PlanDoesNotFit, match=r"`Trainer\(precision='16-mixed'\)` is not supported by the `host_adam` "
                                             r"backend\. Use 'bf16-mixed' or 'bf16-true' .* or '32-true' .*; to keep "
                                             r"'16-mixed', pin `backend='deepspeed'` or `backend='device'`"):
        plan(LLAMA_8B, machine=LARGE_HOST, ceilings=Ceilings(), device="cuda", backend="host_adam",
             precision="16-mixed")


def test_when_nothing_fits_the_refusal_says_which_backends_the_precision_left_out() -> None:
    report = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", precision="16-mixed")
    assert report.chosen is None
    assert "`host_adam` is left out: it cannot run `precision='16-mixed'`" in str(report.error())


def test_a_hook_that_reads_the_gradients_holds_them_as_clipping_by_norm_does() -> None:
    def gpu_8bit_bytes(needs: RunNeeds | None) -> dict[Plan, int]:
        report = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", backend="gpu_8bit", needs=needs)
        return {c.plan: c.memory.gpu_bytes for c in report.candidates}

    hooked, clipped, free = gpu_8bit_bytes(HOOK), gpu_8bit_bytes(CLIPS_BY_NORM), gpu_8bit_bytes(None)
    assert hooked == clipped
    fixed = [p for p in free if p.checkpointing != "first_n"]  # a partial plan is sized to the memory each leaves
    assert fixed and all(hooked[p] - free[p] == 2 * LLAMA_8B.trainable_parameters for p in fixed)


def test_a_refusal_names_the_backends_left_out() -> None:
    small = Machine(gpu_memory_gib=4, host_memory_gib=8)
    message = str(plan(LLAMA_8B, machine=small, ceilings=Ceilings(), device="cuda", needs=HOOK).error())
    assert "`host_adam` is left out: it cannot run `LogsGradNorm`'s `on_before_optimizer_step`" in message


def test_a_refusal_offers_dropping_clipping_only_where_no_hook_holds_the_gradients_anyway() -> None:
    gpu_8bit = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused", checkpointing="full")
    held, free = (estimate_memory(LLAMA_8B, gpu_8bit, holds_gradients=holds).gpu_bytes / GIB / SAFETY_MARGIN
                  for holds in (True, False))
    machine = Machine(gpu_memory_gib=(held + free) / 2, host_memory_gib=125)

    def refusal(needs: RunNeeds) -> str:
        report = plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), device="cuda", backend="gpu_8bit",
                      activation_checkpointing="full", needs=needs)
        return str(report.error())

    assert "without gradient clipping by norm" in refusal(CLIPS_BY_NORM)
    assert "without gradient clipping by norm" not in refusal(dataclasses.replace(CLIPS_BY_NORM,
                                                                                  gradient_hooks=("LogsGradNorm",)))


def test_gpu_8bit_plans_clipping_by_value_with_every_gradient_held_and_refuses_a_budget_it_exceeds() -> None:
    def gpu_8bit_bytes(needs: RunNeeds | None) -> dict[Plan, int]:
        report = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", backend="gpu_8bit", needs=needs)
        return {c.plan: c.memory.gpu_bytes for c in report.candidates}

    by_value, free = gpu_8bit_bytes(CLIPS_BY_VALUE), gpu_8bit_bytes(None)
    fixed = [p for p in free if p.checkpointing != "first_n"]  # a partial plan is sized to the memory each leaves
    assert fixed and all(by_value[p] - free[p] == 2 * LLAMA_8B.trainable_parameters for p in fixed)

    gpu_8bit = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused", checkpointing="full")
    held, unheld = (estimate_memory(LLAMA_8B, gpu_8bit, clipping=clipping).gpu_bytes / GIB / SAFETY_MARGIN
                    for clipping in ("value", None))
    machine = Machine(gpu_memory_gib=(held + unheld) / 2, host_memory_gib=125)

    def planned(needs: RunNeeds, backend: str = "gpu_8bit") -> PlanReport:
        return plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), device="cuda", backend=backend,
                    activation_checkpointing="full", needs=needs)

    assert planned(RunNeeds()).chosen.plan == gpu_8bit
    refused = planned(CLIPS_BY_VALUE)
    assert refused.chosen is None
    assert f"without gradient clipping by value (`gradient_clip_val=None`) {gpu_8bit} fits" in str(refused.error())
    # `backend="auto"` trains the run with a plan that keeps the gradients it clips.
    auto = planned(CLIPS_BY_VALUE, backend="auto")
    assert auto.chosen is not None and auto.chosen.plan.backend != "gpu_8bit"
    assert not any(c.fits for c in auto.candidates if c.plan.backend == "gpu_8bit")


def test_where_full_fits_with_room_the_fewest_first_blocks_that_fit_are_checkpointed() -> None:
    full = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused", checkpointing="full")

    def gpu_bytes(first_n: int) -> int:
        return estimate_memory(LLAMA_8B, dataclasses.replace(full, checkpointing="first_n", first_n=first_n)).gpu_bytes

    kept = 5
    between = (gpu_bytes(LLAMA_8B.blocks - kept) + gpu_bytes(LLAMA_8B.blocks - kept - 1)) / 2
    card = Machine(gpu_memory_gib=between / GIB / SAFETY_MARGIN, host_memory_gib=64)
    report = plan(LLAMA_8B, machine=card, ceilings=Ceilings(), device="cuda", backend="gpu_8bit",
                  optimizer="adamw8bit_fused")
    by_policy = {str(c.plan).split("=")[1]: c for c in report.candidates}
    assert by_policy["full"].fits and not by_policy["every_2"].fits
    chosen = report.chosen.plan
    assert chosen.checkpointing == "first_n" and chosen.first_n == LLAMA_8B.blocks - kept
    assert str(chosen).endswith(f"activation_checkpointing=first_{LLAMA_8B.blocks - kept}")
    one_more_kept = estimate_memory(LLAMA_8B, dataclasses.replace(chosen, first_n=chosen.first_n - 1))
    assert shortfalls(one_more_kept, card, SAFETY_MARGIN).keys() == {"GPU"}
    # Each block kept whole saves its recompute: between full and none, in proportion.
    none = estimate_step_time(LLAMA_8B, dataclasses.replace(full, checkpointing="none"), Ceilings()).total
    assert report.chosen.step_time_s == pytest.approx(
        by_policy["full"].step_time_s - kept / LLAMA_8B.blocks * (by_policy["full"].step_time_s - none), rel=1e-9)
    assert sum(c.plan.checkpointing == "first_n" for c in report.candidates) == 1  # one row in the table
    # Where every block may keep its activations, the partial plan is `none`'s row.
    roomy = plan(LLAMA_8B, machine=Machine(gpu_memory_gib=1000, host_memory_gib=64), ceilings=Ceilings(),
                 device="cuda", backend="gpu_8bit", optimizer="adamw8bit_fused")
    assert roomy.chosen.plan.checkpointing == "none"
    assert not any(c.plan.checkpointing == "first_n" for c in roomy.candidates)


def test_host_adam_sizes_its_checkpointed_blocks_and_its_state_on_the_gpu_together() -> None:
    card = Machine(gpu_memory_gib=48, host_memory_gib=128)
    report = plan(LLAMA_8B, machine=card, ceilings=Ceilings(), device="cuda", backend="host_adam",
                  activation_checkpointing="first_n")
    chosen = report.chosen
    assert chosen.fits and chosen.plan.checkpointing == "first_n" and 0 < chosen.plan.first_n < LLAMA_8B.blocks
    pairs = [dataclasses.replace(chosen.plan, first_n=n, resident_blocks=r)
             for n in range(1, LLAMA_8B.blocks) for r in range(LLAMA_8B.blocks + 1)]
    fitting = [p for p in pairs if not shortfalls(estimate_memory(LLAMA_8B, p), card, SAFETY_MARGIN)]
    fastest = min(estimate_step_time(LLAMA_8B, p, Ceilings()).total for p in fitting)
    assert chosen.step_time_s == pytest.approx(fastest, rel=1e-12)


def test_a_pinned_count_is_planned_as_given_and_one_beyond_the_model_is_refused() -> None:
    report = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", backend="gpu_8bit",
                  optimizer="adamw8bit_fused", activation_checkpointing="first_n", first_n=3)
    assert {c.plan.first_n for c in report.candidates} == {3}
    every_block = plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", backend="gpu_8bit",
                       optimizer="adamw8bit_fused", activation_checkpointing="first_n", first_n=LLAMA_8B.blocks)
    assert {c.plan.checkpointing for c in every_block.candidates} == {"full"}
    with pytest.raises(ValueError, match=f"`first_n={LLAMA_8B.blocks + 1}` blocks to checkpoint, but the model has "
                                         f"{LLAMA_8B.blocks}"):
        plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", activation_checkpointing="first_n",
             first_n=LLAMA_8B.blocks + 1)


def test_every_backend_but_streaming_has_a_partial_plan() -> None:
    # `stream` keeps no block's activations whole: it streams and recomputes one block at a time.
    plans = candidate_plans(LLAMA_8B, backends=BACKENDS, on_cuda=True)
    assert {p.backend for p in plans if p.checkpointing == "first_n"} == set(BACKENDS) - {"stream"}
    with pytest.raises(PlanDoesNotFit, match="it streams blocks under `full` or `offload` checkpointing"):
        plan(LLAMA_8B, machine=H100, ceilings=Ceilings(), device="cuda", backend="stream",
             activation_checkpointing="first_n", first_n=3)
