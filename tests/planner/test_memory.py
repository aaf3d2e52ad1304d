"""The memory model on CPU: terms checked against hand calculations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lightning_offload.planner import GIB, Ceilings, Machine, ModelStats, Plan, estimate_memory, plan, shortfalls
from lightning_offload.planner.budget import CUDA_CONTEXT_BYTES
from lightning_offload.planner.memory import LOGIT_BACKWARD_BYTES, PROCESS_BASELINE_BYTES
from tests.conftest import peak_and_final_allocated_bytes

# Llama 8B at micro-batch 4 x 2048 (activation figures: order of magnitude of a bf16 decoder layer).
LLAMA_8B = ModelStats(parameters=8_030_261_248, block_parameters=218_112_000, blocks=32,
                      activation_bytes_per_block=1_400_000_000, block_input_bytes=67_108_864,
                      logits=4 * 2048 * 128256, embedding_parameters=525_336_576, tokens=8192,
                      width=4096)


def test_optimizer_state_bytes_match_hand_calculation() -> None:
    params = LLAMA_8B.parameters
    adamw = estimate_memory(LLAMA_8B, Plan(backend="device", optimizer="adamw"))
    eight_bit = estimate_memory(LLAMA_8B, Plan(backend="device", optimizer="adamw8bit"))
    assert adamw.gpu["optimizer state"] == 8 * params
    # Two uint8 moments plus one fp32 absmax per 256-element block for each: 2 + 8/256 bytes/param.
    assert eight_bit.gpu["optimizer state"] == int(params * (2 + 8 / 256))
    assert adamw.gpu["fp32 weights"] == adamw.gpu["fp32 gradients"] == 4 * params


def test_deepspeed_offload_holds_24_8_bytes_per_parameter_in_pinned_host_memory() -> None:
    estimate = estimate_memory(LLAMA_8B, Plan(backend="deepspeed", optimizer="cpu_adam"))
    # 2 (bf16 partitions) + 4 (master) + 4 (fp32 gradients) + 8 (Adam) + 6.8 (engine buffers, as measured).
    assert estimate.host_bytes - PROCESS_BASELINE_BYTES == estimate.pinned_bytes
    assert estimate.pinned_bytes == pytest.approx(24.8 * LLAMA_8B.parameters, abs=1)
    assert estimate.gpu_bytes < 0.25 * estimate_memory(LLAMA_8B, Plan(backend="device")).gpu_bytes


def test_fsdp_with_eight_bit_state_counts_bitsandbytes_host_temporaries_for_its_largest_parameter() -> None:
    exact = estimate_memory(LLAMA_8B, Plan(backend="fsdp", optimizer="adamw", checkpointing="full"))
    eight_bit = estimate_memory(LLAMA_8B, Plan(backend="fsdp", optimizer="adamw8bit", checkpointing="full"))
    # 8.03B parameters: 6 bytes/param less state (2.03 instead of 8), plus 20 bytes for each of the embedding
    # table's 525M elements (the largest parameter) while bitsandbytes steps it on the host.
    saved = (8 - (2 + 8 / 256)) * LLAMA_8B.parameters
    assert eight_bit.host_bytes - exact.host_bytes == pytest.approx(20 * 525_336_576 - saved, rel=1e-6)


def test_plans_that_update_in_backward_hold_no_full_gradient_unless_accumulating() -> None:
    params = LLAMA_8B.parameters
    for backend in ("gpu_8bit", "host_adam"):
        one = estimate_memory(LLAMA_8B, Plan(backend=backend, optimizer="adamw8bit_fused"))
        accumulating = estimate_memory(LLAMA_8B, Plan(backend=backend, optimizer="adamw8bit_fused"), accumulate=4)
        assert one.gpu["bf16 gradients (in flight)"] == 4 * LLAMA_8B.block_parameters
        assert accumulating.gpu["bf16 gradients (kept until the step)"] == 2 * params
        # The micro-batch's own gradients are in flight on top of the kept ones, as measured (R2 - R1 = 2 B/param);
        # host_adam's gradients waiting for the host are among the kept ones.
        waiting = one.gpu.get("bf16 gradients waiting for the host", 0)
        assert accumulating.gpu_bytes - one.gpu_bytes == 2 * params - waiting
    host_adam = estimate_memory(LLAMA_8B, Plan(backend="host_adam", optimizer="adamw"))
    assert host_adam.gpu["bf16 weights"] == 2 * params
    assert host_adam.host["fp32 master weights"] + host_adam.host["optimizer state"] == 12 * params
    # The master weights are page-locked (the updated weights leave from them), the AdamW state is not.
    assert host_adam.pinned_bytes == host_adam.host["fp32 master weights"] + host_adam.host["gradient slots"]
    assert host_adam.host["fp32 master weights"] == 4 * params and host_adam.host["gradient slots"] < 2**30
    stream = estimate_memory(LLAMA_8B, Plan(backend="stream", optimizer="adamw8bit_fused"))
    # The embedding table is the largest unit through the rings: its gradient, and the one before it, in flight.
    assert stream.gpu["bf16 gradients (in flight)"] == 4 * LLAMA_8B.embedding_parameters


def test_streaming_host_memory_is_about_four_bytes_per_parameter_and_falls_with_resident_blocks() -> None:
    none_resident = estimate_memory(LLAMA_8B, Plan(backend="stream", optimizer="adamw8bit_fused"))
    half = estimate_memory(LLAMA_8B, Plan(backend="stream", optimizer="adamw8bit_fused", resident_blocks=16))
    streamed = LLAMA_8B.blocks * LLAMA_8B.block_parameters
    assert none_resident.host["bf16 weights (streamed blocks)"] == 2 * streamed
    assert half.host["bf16 weights (streamed blocks)"] == streamed
    assert half.gpu_bytes - none_resident.gpu_bytes == streamed


def test_checkpointing_orders_estimated_activations() -> None:
    gpu = {policy: estimate_memory(LLAMA_8B, Plan(backend="device", checkpointing=policy)).gpu_bytes
           for policy in ("none", "every_k", "full")}
    assert gpu["full"] < gpu["every_k"] < gpu["none"]
    offload = estimate_memory(LLAMA_8B, Plan(backend="device", checkpointing="offload"))
    assert offload.host["saved activations"] == 32 * LLAMA_8B.activation_bytes_per_block


def test_shortfalls_for_a_given_machine() -> None:
    small = Machine(gpu_memory_gib=24, host_memory_gib=64)
    plan = Plan(backend="deepspeed", optimizer="cpu_adam")
    estimate = estimate_memory(LLAMA_8B, plan)
    assert shortfalls(estimate, small) == shortfalls(estimate_memory(LLAMA_8B, plan), small)
    assert shortfalls(estimate, small)["host RAM"] == estimate.host_bytes / GIB - 0.9 * 64
    # DeepSpeed's offload at 8B does not fit 125 GiB of RAM; a 1.5B model does (bench/RESULTS.md, "The memory
    # planner: predicted against measured").
    assert set(shortfalls(estimate, Machine())) == {"host RAM"}
    smaller = ModelStats(**{**vars(LLAMA_8B), "parameters": 1_500_000_000, "block_parameters": 60_000_000})
    assert shortfalls(estimate_memory(smaller, plan), Machine()) == {}


def test_training_on_the_cpu_draws_both_tiers_from_host_memory() -> None:
    estimate = estimate_memory(LLAMA_8B, Plan(backend="device"))
    cpu = Machine(gpu_memory_gib=100, host_memory_gib=100, unified=True)
    assert set(shortfalls(estimate, cpu)) == {"host RAM"}
    assert shortfalls(estimate, cpu)["host RAM"] == (estimate.gpu_bytes + estimate.host_bytes) / GIB - 90


def test_ranks_on_one_host_share_its_ram_and_each_holds_a_shard() -> None:
    plan = Plan(backend="deepspeed", optimizer="cpu_adam")
    one = estimate_memory(LLAMA_8B, plan)
    two_on_one_host = estimate_memory(LLAMA_8B, plan, world_size=2)
    two_hosts = estimate_memory(LLAMA_8B, plan, world_size=2, ranks_per_host=1)
    engine = one.host_bytes - PROCESS_BASELINE_BYTES
    # One host with both ranks holds the whole sharded state plus two processes; two hosts hold half each.
    assert two_on_one_host.host_bytes == pytest.approx(engine + 2 * PROCESS_BASELINE_BYTES, abs=16)
    assert two_hosts.host_bytes == pytest.approx(engine / 2 + PROCESS_BASELINE_BYTES, abs=16)
    assert two_hosts.gpu_bytes > one.gpu_bytes  # NCCL buffers on every GPU
    ddp = estimate_memory(LLAMA_8B, Plan(backend="device"), world_size=2)
    assert ddp.gpu["DDP gradient buckets"] == 4 * LLAMA_8B.parameters
    with pytest.raises(ValueError, match="drives one GPU"):
        estimate_memory(LLAMA_8B, Plan(backend="gpu_8bit", optimizer="adamw8bit_fused"), world_size=2)


def test_plan_for_two_ranks_considers_only_engines_that_span_processes() -> None:
    from lightning_offload.planner import Ceilings, plan

    report = plan(LLAMA_8B, machine=Machine(gpu_memory_gib=141, host_memory_gib=250), ceilings=Ceilings(),
                  device="cuda", world_size=2)
    assert {c.plan.backend for c in report.candidates} <= {"deepspeed", "device", "fsdp"}
    assert report.chosen is not None and report.world_size == 2


def test_clipping_by_norm_keeps_every_gradient_in_the_plans_that_update_in_backward() -> None:
    plan = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused")
    clipped = estimate_memory(LLAMA_8B, plan, holds_gradients=True)
    assert clipped.gpu["bf16 gradients (kept until the step)"] == 2 * LLAMA_8B.parameters
    assert clipped.gpu_bytes > estimate_memory(LLAMA_8B, plan).gpu_bytes


def test_clipping_by_value_keeps_every_gradient_only_where_lightning_clips_after_backward() -> None:
    gpu_8bit = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused")
    by_value = estimate_memory(LLAMA_8B, gpu_8bit, clipping="value")
    assert by_value.gpu_bytes - estimate_memory(LLAMA_8B, gpu_8bit).gpu_bytes == 2 * LLAMA_8B.trainable_parameters
    assert by_value.gpu == estimate_memory(LLAMA_8B, gpu_8bit, holds_gradients=True).gpu
    # `host_adam` clips each gradient by value on its way to the host, as its update runs.
    host_adam = Plan(backend="host_adam", optimizer="adamw")
    assert estimate_memory(LLAMA_8B, host_adam, clipping="value") == estimate_memory(LLAMA_8B, host_adam)


def test_host_adam_front_blocks_move_twelve_bytes_per_parameter_from_host_to_gpu() -> None:
    all_host = estimate_memory(LLAMA_8B, Plan(backend="host_adam", optimizer="adamw"))
    front = estimate_memory(LLAMA_8B, Plan(backend="host_adam", optimizer="adamw", resident_blocks=8))
    # 8 blocks of 218,112,000 and the 525,336,576-parameter input embedding before them: 2,270,232,576 parameters,
    # with fp32 master weights (4 bytes) and two fp32 moments (8 bytes) each.
    assert front.gpu["fp32 master weights and optimizer state (front blocks)"] == 27_242_790_912
    assert all_host.host_bytes - front.host_bytes == 27_242_790_912
    # Eight blocks fewer stepped by the host: eight blocks' gradients fewer that may wait on the GPU for it, each
    # 2 bytes per parameter less the input its checkpointed backward frees.
    waiting = "bf16 gradients waiting for the host"
    fewer = 8 * (2 * LLAMA_8B.block_parameters - LLAMA_8B.block_input_bytes)
    assert all_host.gpu[waiting] - front.gpu[waiting] == fewer
    assert front.gpu_bytes - all_host.gpu_bytes == 27_242_790_912 - fewer
    assert front.host["fp32 master weights"] == 4 * (LLAMA_8B.parameters - 2_270_232_576)
    assert "fp32 master weights and optimizer state (front blocks)" not in all_host.gpu
    everything = estimate_memory(LLAMA_8B, Plan(backend="host_adam", optimizer="adamw", resident_blocks=99))
    assert everything.host["fp32 master weights"] == 4 * (LLAMA_8B.other_parameters - LLAMA_8B.embedding_parameters)


def test_host_adam_counts_gradients_waiting_for_the_host_where_backward_frees_less_than_it_produces() -> None:
    waiting = "bf16 gradients waiting for the host"
    plan = Plan(backend="host_adam", optimizer="adamw", resident_blocks=8)
    full = estimate_memory(LLAMA_8B, plan)
    # 24 blocks stepped by the host; two blocks' gradients in flight are counted already.
    produced_less_freed = 2 * LLAMA_8B.block_parameters - LLAMA_8B.block_input_bytes
    assert full.gpu[waiting] == 24 * produced_less_freed - 4 * LLAMA_8B.block_parameters
    # Without checkpointing each block's backward frees its 1.4 GB of activations, more than its 436 MB of gradients.
    assert waiting not in estimate_memory(LLAMA_8B, dataclasses.replace(plan, checkpointing="none")).gpu
    assert waiting not in estimate_memory(LLAMA_8B, dataclasses.replace(plan, resident_blocks=32)).gpu


def test_a_chunked_loss_s_workspace_counts_only_beyond_backward_s_transients() -> None:
    # The loss's slice of logits lives at the end of forward; the recomputed block and the gradients in flight
    # only in backward. Without checkpointing and with small blocks the workspace is the larger of the two.
    chunked = dataclasses.replace(LLAMA_8B, logits=0, loss_workspace_bytes=2 * GIB)
    term = "loss transients (beyond the blocks' backward)"
    plan = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused", checkpointing="none")
    in_flight = estimate_memory(chunked, plan).gpu["bf16 gradients (in flight)"]
    assert estimate_memory(chunked, plan).gpu[term] == 2 * GIB - in_flight
    # Instead of the full logits' two fp32 gradients at the start of backward.
    assert estimate_memory(chunked, plan).gpu_bytes - estimate_memory(LLAMA_8B, plan).gpu_bytes == \
        2 * GIB - 8 * LLAMA_8B.logits
    # Under `full` checkpointing one recomputed block (1.4 GB) and the gradients in flight outweigh it.
    assert term not in estimate_memory(chunked, dataclasses.replace(plan, checkpointing="full")).gpu


def test_a_loss_over_the_full_logits_holds_logit_backward_bytes_per_logit_in_its_backward() -> None:
    # transformers' causal-LM loss: the logits upcast to fp32, then cross-entropy (whose log-softmax output forward
    # saved, counted with the activations outside the blocks).
    tokens, vocab = 1024, 8000
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    loss = F.cross_entropy(logits.float(), targets)
    peak, _ = peak_and_final_allocated_bytes(loss.backward)
    assert peak == pytest.approx(LOGIT_BACKWARD_BYTES * tokens * vocab, rel=0.05)


def test_first_n_holds_its_inputs_and_the_kept_blocks_and_recomputes_where_backward_freed_them() -> None:
    kept = 3
    gpu = estimate_memory(LLAMA_8B, Plan(backend="device", checkpointing="first_n",
                                         first_n=LLAMA_8B.blocks - kept)).gpu
    assert gpu["activations (checkpointed blocks' inputs)"] == (LLAMA_8B.blocks - kept) * LLAMA_8B.block_input_bytes
    assert gpu["activations (kept blocks)"] == kept * LLAMA_8B.activation_bytes_per_block
    # The kept blocks are the last: their activations are gone by the first recompute, which reuses their memory.
    assert "activations (one block recomputed)" not in gpu
    assert "activations (one block recomputed)" in estimate_memory(LLAMA_8B, Plan(backend="device")).gpu


@pytest.mark.parametrize("backend, optimizer, doubled", [
    ("gpu_8bit", "adamw8bit_fused", ["weights", "gradients (in flight)"]),
    ("host_adam", "adamw", ["weights", "gradients (in flight)"]),
    ("stream", "adamw8bit_fused", ["weights (resident blocks, embeddings, head)", "weight ring (three units)",
                                   "gradients (in flight)"]),
    ("fsdp", "adamw", ["gathered {} weights (two blocks)", "root unit {} weights (embeddings, head)"]),
    ("deepspeed", "cpu_adam", ["gathered {} weights (two blocks)", "gradient reduce buckets ({}, double-buffered)"]),
])
def test_engines_keep_fp32_compute_weights_and_gradients_under_32_true(backend: str, optimizer: str,
                                                                      doubled: list[str]) -> None:
    plan = Plan(backend=backend, optimizer=optimizer, resident_blocks=4)
    bf16 = estimate_memory(LLAMA_8B, plan)
    fp32 = estimate_memory(dataclasses.replace(LLAMA_8B, precision="32-true"), plan)

    def named(term: str, dtype: str) -> str:
        return term.format(dtype) if "{}" in term else f"{dtype} {term}"

    for term in doubled:
        assert fp32.gpu[named(term, "fp32")] == 2 * bf16.gpu[named(term, "bf16")], term
    # The optimizer's state and the activations (measured in the compute dtype already) are the precision's own.
    assert fp32.gpu["activations (one block recomputed)"] == bf16.gpu["activations (one block recomputed)"]
    if "optimizer state" in bf16.host or "optimizer state" in bf16.gpu:
        assert {**fp32.gpu, **fp32.host}["optimizer state"] == {**bf16.gpu, **bf16.host}["optimizer state"]
    # The streamed copies in host memory too.
    for term in ("weights (streamed blocks)", "weight partitions"):
        if f"bf16 {term}" in bf16.host:
            assert fp32.host[f"fp32 {term}"] == 2 * bf16.host[f"bf16 {term}"]
    if backend == "deepspeed":
        assert fp32.host["weight partitions"] == 2 * bf16.host["weight partitions"] == 4 * LLAMA_8B.parameters


def test_the_device_plan_trains_the_module_in_the_dtype_lightning_gives_it() -> None:
    params = LLAMA_8B.parameters
    mixed = estimate_memory(LLAMA_8B, Plan(backend="device", optimizer="adamw"))
    true_bf16 = estimate_memory(dataclasses.replace(LLAMA_8B, precision="bf16-true"),
                                Plan(backend="device", optimizer="adamw"))
    assert mixed.gpu["fp32 weights"] == mixed.gpu["fp32 gradients"] == 4 * params
    assert true_bf16.gpu["bf16 weights"] == true_bf16.gpu["bf16 gradients"] == 2 * params
    # torch's AdamW keeps both moments in the parameters' dtype; 8-bit state is 8-bit whatever the weights.
    assert true_bf16.gpu["optimizer state"] == 4 * params
    eight_bit = Plan(backend="device", optimizer="adamw8bit")
    assert estimate_memory(dataclasses.replace(LLAMA_8B, precision="bf16-true"), eight_bit).gpu["optimizer state"] \
        == estimate_memory(LLAMA_8B, eight_bit).gpu["optimizer state"]


def test_host_adam_counts_the_fp32_model_it_builds_on_the_gpu_before_casting_it() -> None:
    plan = Plan(backend="host_adam", optimizer="adamw")
    term = "the model as built (beyond a step's terms)"
    # A 14B model built in `configure_model` under bf16-mixed: 59 GB of fp32 weights on the GPU before the engine
    # casts them, more than its step holds (29.5 GB of bf16 weights and one block's activations).
    stats = dataclasses.replace(LLAMA_8B, parameters=14_770_000_000, blocks=48, built_at_setup=True)
    built = estimate_memory(stats, plan)
    assert built.gpu_bytes == 4 * stats.parameters + CUDA_CONTEXT_BYTES
    assert built.gpu[term] == built.gpu_bytes - estimate_memory(
        dataclasses.replace(stats, built_at_setup=False), plan).gpu_bytes
    # Built in `__init__` (in host memory), or under bf16-true (built in bf16): no more than the step.
    assert term not in estimate_memory(dataclasses.replace(stats, built_at_setup=False), plan).gpu
    assert term not in estimate_memory(dataclasses.replace(stats, precision="bf16-true"), plan).gpu
    # Engines that build in their own dtype or off the GPU count nothing for it.
    for other in (Plan(backend="gpu_8bit", optimizer="adamw8bit_fused"), Plan(backend="stream"),
                  Plan(backend="fsdp")):
        assert term not in estimate_memory(stats, other).gpu


def test_a_frozen_base_built_in_configure_model_is_not_planned_where_its_fp32_build_cannot_fit() -> None:
    # A 14.8B model with its base frozen (100M trainable parameters) on a 48 GB card: a host_adam step holds its
    # bf16 weights (29.5 GB) and little else; its build under bf16-mixed holds the fp32 weights (59 GB).
    card = Machine(gpu_memory_gib=47.5, host_memory_gib=125)
    params, block = 14_770_000_000, (14_770_000_000 - 2 * 525_336_576) // 48
    stats = dataclasses.replace(LLAMA_8B, parameters=params, blocks=48, block_parameters=block,
                                frozen_parameters=params - 100_000_000, frozen_block_parameters=block - 2_000_000,
                                frozen_embedding_parameters=525_336_576)
    built_before = plan(stats, machine=card, ceilings=Ceilings(), device="cuda").chosen
    assert built_before is not None and built_before.plan.backend == "host_adam"
    built_at_setup = plan(dataclasses.replace(stats, built_at_setup=True), machine=card, ceilings=Ceilings(),
                          device="cuda").chosen
    assert built_at_setup is not None and built_at_setup.plan.backend != "host_adam"
    assert built_at_setup.memory.gpu_bytes <= 0.9 * 47.5 * GIB
