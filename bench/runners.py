"""How each method trains, reduced to its step; all of them timed by the same `StepClock`.

Loop methods build a model and hand `Steps` to `run_loop`; Lightning methods fit `LlamaModule` with a Trainer and
are timed by a callback. Every method checkpoints every decoder layer, uses lr 1e-5 and random tokens. Optional
engines (DeepSpeed, bitsandbytes, torchao, lightning_offload) are imported inside the functions that use them, so a
missing one fails only its own cells.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from bench import PREDICTION_MARGIN, PredictedTimeout
from bench.matrix import Regime
from bench.measure import StepClock
from bench.methods import OURS
from bench.models import SIZES, build_llama, enable_checkpointing

LR = 1e-5


@dataclass(frozen=True)
class Cell:
    size: str
    regime: Regime
    device: torch.device
    deadline: float | None = None
    """`time.time()` at which bench/run.py kills the cell; None (bench/cell.py run by hand): no limit."""
    host_memory_gib: float | None = None
    """The profile's host RAM (`--profile`): our rows plan within it. None: the whole machine's."""


def same_allocator(runner: Callable[..., StepClock]) -> Callable[..., StepClock]:
    """Every row runs on the CUDA allocator settings our strategy picks (expandable segments unless the environment
    configures the allocator), so no row wins or loses by its allocator's fragmentation."""

    @functools.wraps(runner)
    def run(cell: Cell, **options: Any) -> StepClock:
        from lightning_offload.strategy import prefer_expandable_segments

        prefer_expandable_segments(cell.device)
        return runner(cell, **options)

    return run


# Forward and backward of one micro-batch with the loss scaled by the given factor; returns the unscaled loss.
MicroBatch = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class Steps:
    micro_batch: MicroBatch
    optimizer_step: Callable[[], None]


def run_loop(cell: Cell, steps: Steps) -> StepClock:
    regime, vocab = cell.regime, SIZES[cell.size].vocab
    generator = torch.Generator(device=cell.device).manual_seed(0)
    clock = StepClock(cell.device)
    for _ in range(regime.steps):
        batches = [torch.randint(0, vocab, (regime.micro_batch, regime.seq), device=cell.device, generator=generator)
                   for _ in range(regime.accumulate)]
        clock.start()
        losses = [steps.micro_batch(batch, 1 / regime.accumulate) for batch in batches]
        steps.optimizer_step()
        clock.stop(losses)
    return clock


def _causal_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def _micro_batch(model: torch.nn.Module, autocast_on: str | None = None) -> MicroBatch:
    """The plain micro-batch, under bf16 autocast on the `autocast_on` device type if given."""

    def micro_batch(batch: torch.Tensor, scale: float) -> torch.Tensor:
        with torch.autocast(autocast_on or "cpu", dtype=torch.bfloat16, enabled=autocast_on is not None):
            loss = _causal_lm_loss(model, batch)
        (loss * scale).backward()
        return loss.detach()

    return micro_batch


def _model(cell: Cell, dtype: torch.dtype) -> torch.nn.Module:
    model = build_llama(cell.size, dtype, cell.device)
    enable_checkpointing(model, "non_reentrant")
    return model


def plain(cell: Cell) -> StepClock:
    """fp32 weights, bf16 autocast, fused AdamW on the device, no offload: the speed of light for small models."""
    model = _model(cell, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run_loop(cell, Steps(_micro_batch(model, autocast_on=cell.device.type), optimizer_step))


LossOf = Callable[[torch.Tensor], torch.Tensor]


def torchtune_model(cell: Cell, compiled: bool, loss: str) -> tuple[torch.nn.Module, LossOf]:
    """The model and loss of torchtune's full_finetune_single_device recipe: bf16 weights, every decoder layer
    checkpointed; `compiled=True` (the recipe's `compile: True`) compiles each decoder layer and the loss as its
    `training.compile_model` / `compile_loss` do; `loss="linear"` is its `LinearCrossEntropyLoss`
    (bench/rival_losses.py), "full" transformers' loss on the full fp32 logits. Returns the model and the loss of a
    token batch."""
    from bench.rival_losses import TorchtuneLinearCrossEntropy

    if loss not in ("full", "linear"):
        raise ValueError(f"Unknown torchtune loss {loss!r}; choose 'full' or 'linear'.")
    model = _model(cell, torch.bfloat16)
    if compiled:
        # torchtune compiles per layer, inside the checkpointing wrapper, each layer's whole call.
        for layer in model.model.layers:
            layer.compile()
    if loss == "full":
        return model, functools.partial(_causal_lm_loss, model)
    linear_loss = TorchtuneLinearCrossEntropy(model.lm_head)
    if compiled:
        linear_loss.apply_compile_strategy()
    return model, functools.partial(_torchtune_linear_loss, model, linear_loss)


def _torchtune_linear_loss(model: torch.nn.Module, linear_loss: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The recipe skips the model's output layer and hands the hidden states to the loss."""
    from bench.rival_losses import torchtune_labels

    return linear_loss(model.model(input_ids=batch).last_hidden_state, torchtune_labels(batch))


def torchtune(cell: Cell, compiled: bool = False, loss: str = "full", optimizer_in_backward: bool = True) -> StepClock:
    """torchtune's full_finetune_single_device: bitsandbytes PagedAdamW8bit, lr as the benchmark's. With
    `optimizer_in_backward` (its 8B config's default) one optimizer per parameter steps as soon as that parameter's
    gradient is complete, so gradients cannot accumulate; without it one optimizer steps after the regime's
    micro-batches (`gradient_accumulation_steps`)."""
    import bitsandbytes as bnb

    model, loss_of = torchtune_model(cell, compiled, loss)

    def micro_batch(batch: torch.Tensor, scale: float) -> torch.Tensor:
        loss_value = loss_of(batch)
        (loss_value * scale).backward()
        return loss_value.detach()

    if not optimizer_in_backward:
        optimizer = bnb.optim.PagedAdamW8bit(model.parameters(), lr=LR)

        def optimizer_step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run_loop(cell, Steps(micro_batch, optimizer_step))
    optimizers = {param: bnb.optim.PagedAdamW8bit([param], lr=LR) for param in model.parameters()}

    def step_in_backward(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(step_in_backward)
    return run_loop(cell, Steps(micro_batch, optimizer_step=lambda: None))


def torchao_offload(cell: Cell, offload_gradients: bool = True) -> StepClock:
    """bf16 weights on the GPU, torch's fused AdamW on a host copy (torchao's CPUOffloadOptimizer): each gradient
    is copied to pinned host memory as backward completes it. `offload_gradients` then frees it on the GPU (no
    accumulation); without it the GPU gradient accumulates and each copy carries the running sum."""
    from torchao.optim import CPUOffloadOptimizer

    model = _model(cell, torch.bfloat16)
    optimizer = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=offload_gradients,
                                    fused=True, lr=LR)

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    return run_loop(cell, Steps(_micro_batch(model), optimizer_step))


def _one_process_group() -> None:
    """DeepSpeed's engine expects torch.distributed: one rank, without a launcher."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29517").items():
        os.environ.setdefault(key, value)


def deepspeed_config(regime: Regime, zenflow: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                            "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if zenflow:
        zero["zenflow"] = {"topk_ratio": 0.05, "select_strategy": "auto", "select_interval": "auto",
                           "update_interval": 4, "full_warm_up_rounds": 0, "overlap_step": True}
    return {"train_micro_batch_size_per_gpu": regime.micro_batch, "gradient_accumulation_steps": regime.accumulate,
            "bf16": {"enabled": True}, "zero_optimization": zero, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}}


def deepspeed(cell: Cell, zenflow: bool) -> StepClock:
    """DeepSpeed's engine driven directly: ZeRO-2 with the optimizer (DeepSpeed CPU Adam) offloaded, or ZenFlow."""
    import deepspeed as ds

    _one_process_group()
    ds.init_distributed()
    # ZeRO-2 keeps bf16 parameters on the GPU: build them there, never as an fp32 model in host memory.
    model = _model(cell, torch.bfloat16)
    engine, *_ = ds.initialize(model=model, model_parameters=model.parameters(),
                               config=deepspeed_config(cell.regime, zenflow))

    def micro_batch(batch: torch.Tensor, scale: float) -> torch.Tensor:
        # The engine scales the loss by 1 / gradient_accumulation_steps and steps only at the boundary.
        loss = _causal_lm_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return run_loop(cell, Steps(micro_batch, optimizer_step=lambda: None))


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, length: int, seq: int, vocab: int) -> None:
        self.length, self.seq, self.vocab = length, seq, vocab

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.seq,), generator=torch.Generator().manual_seed(index))


class LlamaModule(L.LightningModule):
    """The model is built in `configure_model`, inside whatever context the strategy provides for it.

    `loss="chunked"` computes the output layer and the cross-entropy together without the full logits
    (`lightning_offload.losses`, as torchtune's recipes chunk theirs); "liger" does the same with Liger-Kernel's
    fused linear cross-entropy (bench/rival_losses.py); "full" is transformers' own loss. `optimizer="adamw_fused"`
    is torch's AdamW with `fused=True`, which torch implements for CPU tensors too.
    """

    def __init__(self, size: str, checkpointing: str, optimizer: str, loss: str = "full") -> None:
        super().__init__()
        self.size, self.checkpointing, self.optimizer_name, self.loss = size, checkpointing, optimizer, loss
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_llama(self.size)
            enable_checkpointing(self.model, self.checkpointing)
            if self.loss == "chunked":
                from lightning_offload.losses import ChunkedLMHeadLoss

                ChunkedLMHeadLoss.adopt(self.model.lm_head)
            elif self.loss == "liger":
                from bench.rival_losses import LigerLMHeadLoss

                LigerLMHeadLoss.adopt(self.model.lm_head)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.loss in ("chunked", "liger"):
            hidden = self.model.model(input_ids=batch).last_hidden_state
            return self.model.lm_head(hidden[:, :-1], batch[:, 1:])
        return _causal_lm_loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "deepspeed_cpu_adam":  # what Lightning's docs ask for with its offload presets
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(self.parameters(), lr=LR)
        # None: torch picks its kernel (for-each on the host tensors FSDP's CPU offload steps).
        fused = True if self.optimizer_name == "adamw_fused" else None
        return torch.optim.AdamW(self.parameters(), lr=LR, fused=fused)


class _Clock(L.Callback):
    """Times optimizer steps: from the start of a step's first micro-batch to the end of the one that stepped."""

    def __init__(self, clock: StepClock, accumulate: int) -> None:
        self.clock, self.accumulate = clock, accumulate
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.accumulate == 0:
            self.losses = []
            self.clock.start()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning hands the hook the loss already divided by `accumulate_grad_batches`.
        self.losses.append(outputs["loss"].detach() * self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            self.clock.stop(self.losses)


def _planned(strategy: Any) -> dict[str, object]:
    """What the planner predicted for the plan the strategy chose (lightning_offload's rows); else nothing."""
    report = getattr(strategy, "plan_report", None)
    if report is None or report.chosen is None:
        return {}
    chosen, ceilings = report.chosen, report.ceilings
    # The ceilings the step time was costed at, probed at the fit's setup: calibrating the planner's cost model
    # against the measured step needs them (they differ between machines of one kind, and from bench/probe.py's).
    return {"plan": str(chosen.plan), "predicted_step_s": round(chosen.step_time_s, 3),
            "predicted_gpu_gib": round(chosen.memory.gpu_bytes / 2**30, 2),
            "predicted_host_gib": round(chosen.memory.host_bytes / 2**30, 2),
            "planner_ceilings": {"matmul_tflops": round(ceilings.matmul_tflops, 1),
                                 "h2d_gbps": round(ceilings.h2d_gbps, 1), "d2h_gbps": round(ceilings.d2h_gbps, 1),
                                 "duplex_gbps": round(ceilings.duplex_gbps, 1),
                                 "cpu_adamw_gparams": round(ceilings.cpu_adamw_gparams, 2)}}


class _PredictedTimeoutGuard(L.Callback):
    """Stops the fit at train start when the planner predicts its plan cannot run `steps` steps before `deadline`:
    a pinned plan far too slow for the cell (fsdp at 8B falls back to 8-bit AdamW on the host, ~133 s/step) would
    otherwise spend the whole time limit before it is killed."""

    def __init__(self, steps: int, deadline: float) -> None:
        self.steps, self.deadline = steps, deadline

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        planned = _planned(trainer.strategy)
        if not planned:
            return
        step_s = planned["predicted_step_s"]
        needed_s, left_s = step_s * self.steps * PREDICTION_MARGIN, self.deadline - time.time()
        if needed_s > left_s:
            raise PredictedTimeout(f"{planned['plan']} at {step_s:.3g} s/step needs ~{needed_s:.0f} s for "
                                   f"{self.steps} steps, {left_s:.0f} s left", planned)


# Lightning's offload presets (`deepspeed_stage_2_offload`, `deepspeed_stage_3_offload`) leave `pin_memory=False`;
# DeepSpeed's config docs (deepspeed.ai/docs/config-json, "Optimizer offloading" / "Parameter offloading") give
# `pin_memory: true` for throughput, and Lightning's DeepSpeed guide shows it on `DeepSpeedStrategy`.
PINNED_DEEPSPEED = {
    "deepspeed_stage_2_offload_pinned": {"stage": 2, "offload_optimizer": True, "pin_memory": True},
    "deepspeed_stage_3_offload_pinned": {"stage": 3, "offload_optimizer": True, "offload_parameters": True,
                                         "pin_memory": True},
}


def _lightning_strategy(name: str, backend: str | None, backend_options: dict[str, Any],
                        host_memory_gib: float | None = None) -> Any:
    if name == "fsdp_cpu_offload":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(cpu_offload=True, activation_checkpointing_policy={LlamaDecoderLayer})
    if name == OURS:
        import lightning_offload  # registers the strategy; a missing package makes the cell "not available"

        return lightning_offload.SingleGPUOffloadStrategy(backend=backend, max_host_memory_gib=host_memory_gib,
                                                          **backend_options)
    if name in PINNED_DEEPSPEED:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(**PINNED_DEEPSPEED[name])
    return name


def lightning(cell: Cell, strategy: str, checkpointing: str, optimizer: str, backend: str | None = None,
              loss: str = "full", backend_options: dict[str, Any] | None = None) -> StepClock:
    """A Trainer with `strategy` and precision bf16-mixed, fitting `LlamaModule` on random tokens."""
    regime, clock = cell.regime, StepClock(cell.device)
    callbacks: list[L.Callback] = [_Clock(clock, regime.accumulate)]
    if cell.deadline is not None:
        callbacks.append(_PredictedTimeoutGuard(regime.steps, cell.deadline))
    trainer = L.Trainer(accelerator=cell.device.type, devices=1,
                        strategy=_lightning_strategy(strategy, backend, backend_options or {}, cell.host_memory_gib),
                        precision="bf16-mixed", max_steps=regime.steps, accumulate_grad_batches=regime.accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    tokens = _RandomTokens(regime.micro_batches * regime.micro_batch, regime.seq, SIZES[cell.size].vocab)
    trainer.fit(LlamaModule(cell.size, checkpointing, optimizer, loss),
                DataLoader(tokens, batch_size=regime.micro_batch))
    clock.planned = _planned(trainer.strategy)
    return clock


RUNNERS: dict[str, Callable[..., StepClock]] = {
    name: same_allocator(runner) for name, runner in {
        "plain": plain, "torchtune": torchtune, "torchao_offload": torchao_offload, "deepspeed": deepspeed,
        "lightning": lightning,
    }.items()
}
