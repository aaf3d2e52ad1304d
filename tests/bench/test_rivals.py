"""Each baseline is built at the settings its row claims, checked on the CPU: the tuned rows at their libraries'
recommended settings, the defaults rows as users commonly run them, R2's rows in modes that accumulate."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bench.limits import COSTS, CPU_ADAMW_FOREACH, CPU_ADAMW_FUSED
from bench.matrix import DEFAULT_CONFIG, Regime, expand, load_config
from bench.models import build_llama
from bench.rival_losses import IGNORE_INDEX, TorchtuneLinearCrossEntropy, torchtune_labels
from bench.runners import RUNNERS, Cell, LlamaModule, _lightning_strategy, torchao_offload, torchtune, torchtune_model


@pytest.fixture(scope="module")
def methods():
    return load_config(DEFAULT_CONFIG).methods


def _cell(**regime) -> Cell:
    # One optimizer step unless asked: a step of the tiny model in bf16 takes seconds on a busy 2-core CPU.
    fields = {"name": "test", "micro_batch": 1, "seq": 8, "accumulate": 1, "steps": 1, "warmup": 0, **regime}
    return Cell("tiny", Regime(**fields), torch.device("cpu"))


def _module(options: dict) -> LlamaModule:
    module = LlamaModule("tiny", options["checkpointing"], options["optimizer"], options.get("loss", "full"))
    module.configure_model()
    return module


def _uses_reentrant(module: LlamaModule) -> set[bool]:
    return {layer._gradient_checkpointing_func.keywords["use_reentrant"] for layer in module.model.model.layers}


def test_fsdp_tuned_row_steps_a_fused_cpu_adamw_and_its_defaults_row_torchs_default(methods):
    tuned, defaults = methods["lightning_fsdp_cpu_offload_fused"], methods["lightning_fsdp_cpu_offload"]
    assert {key: value for key, value in tuned.options.items() if key != "optimizer"} == {
        key: value for key, value in defaults.options.items() if key != "optimizer"}
    strategy = _lightning_strategy(tuned.options["strategy"], None, {})
    assert strategy.cpu_offload.offload_params

    fused = _module(tuned.options).configure_optimizers()
    assert fused.defaults["fused"] is True
    assert _module(defaults.options).configure_optimizers().defaults["fused"] is None  # torch picks for-each
    # torch's fused kernel runs on host tensors, where FSDP's CPU offload steps.
    before = [param.detach().clone() for param in fused.param_groups[0]["params"]]
    for param in fused.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    fused.step()
    assert all(not torch.equal(old, param) for old, param in zip(before, fused.param_groups[0]["params"]))
    assert (COSTS[tuned.cost].optimizer_rate, COSTS[defaults.cost].optimizer_rate) == (CPU_ADAMW_FUSED,
                                                                                         CPU_ADAMW_FOREACH)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_tuned_rows_pin_host_memory_and_checkpoint_non_reentrantly(methods, stage):
    from lightning.pytorch.strategies import StrategyRegistry

    tuned, defaults = (methods[f"lightning_deepspeed_stage_{stage}_offload_tuned"],
                       methods[f"lightning_deepspeed_stage_{stage}_offload"])
    zero = _lightning_strategy(tuned.options["strategy"], None, {}).config["zero_optimization"]
    offloaded = ["offload_optimizer"] + (["offload_param"] if stage == 3 else [])
    assert zero["stage"] == stage and set(offloaded) <= set(zero)
    assert all(zero[part]["device"] == "cpu" and zero[part]["pin_memory"] for part in offloaded)
    assert _uses_reentrant(_module(tuned.options)) == {False}
    assert tuned.options["optimizer"] == defaults.options["optimizer"] == "deepspeed_cpu_adam"

    # The defaults row is Lightning's registered preset as it comes: unpinned, reentrant checkpointing.
    preset = StrategyRegistry[defaults.options["strategy"]]["init_params"]
    assert preset.get("pin_memory", False) is False and preset["stage"] == stage
    assert _uses_reentrant(_module(defaults.options)) == {True}
    assert "defaults" in defaults.label and "tuned" in tuned.label


def test_torchtune_rows_name_its_recipe_settings(methods):
    tuned, accumulating, defaults = (methods["torchtune_compiled"], methods["torchtune_accumulating"],
                                     methods["torchtune"])
    assert tuned.options == {"compiled": True, "loss": "linear", "optimizer_in_backward": True}
    assert not tuned.accumulates and not defaults.accumulates
    assert accumulating.options == {**tuned.options, "optimizer_in_backward": False} and accumulating.accumulates
    assert defaults.options == {}  # the runner's defaults: eager, transformers' full loss, stepped in backward
    assert methods["torchtune_linear"].options == {**tuned.options, "compiled": False}


def test_torchtune_tuned_model_compiles_every_layer_and_the_loss_of_its_chunks():
    model, loss_of = torchtune_model(_cell(), compiled=True, loss="linear")
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert next(model.parameters()).dtype == torch.bfloat16
    _, linear_loss = loss_of.args
    assert isinstance(linear_loss, TorchtuneLinearCrossEntropy) and linear_loss.compiled
    assert linear_loss.num_output_chunks == 8 and linear_loss.head is model.lm_head

    eager, eager_loss_of = torchtune_model(_cell(), compiled=False, loss="linear")
    assert all(layer._compiled_call_impl is None for layer in eager.model.layers)
    assert not eager_loss_of.args[1].compiled
    with pytest.raises(ValueError, match="Unknown torchtune loss 'chunked'"):
        torchtune_model(_cell(), compiled=False, loss="chunked")


def test_torchtune_linear_cross_entropy_is_the_mean_cross_entropy_of_the_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    tokens = torch.randint(0, 50, (2, 20))
    targets = torchtune_labels(tokens)
    assert torch.equal(targets[:, :-1], tokens[:, 1:]) and (targets[:, -1] == IGNORE_INDEX).all()
    targets[0, 3] = IGNORE_INDEX  # an ignored token inside a chunk, besides the padded last position
    hidden = torch.randn(2, 20, 16, requires_grad=True)

    loss = TorchtuneLinearCrossEntropy(head)(hidden, targets)
    loss.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    reference = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    reference.backward()
    # fp32; the chunked sum rounds in another order than the mean over all tokens.
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grads, (hidden.grad, head.weight.grad), rtol=1e-6, atol=1e-7)


class _CountingAdamW(torch.optim.AdamW):
    made: list[_CountingAdamW] = []

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0
        _CountingAdamW.made.append(self)

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("in_backward", [True, False])
def test_torchtune_steps_in_backward_or_once_after_the_accumulated_micro_batches(monkeypatch, in_backward):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes.optim, "PagedAdamW8bit", _CountingAdamW)
    _CountingAdamW.made = []
    accumulate, steps = 2, 1
    clock = torchtune(_cell(accumulate=accumulate, steps=steps), loss="linear", optimizer_in_backward=in_backward)
    assert len(clock.times) == steps and all(10 < loss < 11 for loss in clock.losses)
    model_params = len(list(build_llama("tiny").parameters()))
    if in_backward:  # one optimizer per parameter, stepped at every micro-batch's backward
        assert len(_CountingAdamW.made) == model_params
        assert {optimizer.steps for optimizer in _CountingAdamW.made} == {accumulate * steps}
    else:
        assert len(_CountingAdamW.made) == 1 and _CountingAdamW.made[0].steps == steps


def _fake_torchao(monkeypatch) -> list[dict]:
    """torchao's CPUOffloadOptimizer is CUDA only: a stand-in that records its arguments and steps torch's AdamW."""
    made: list[dict] = []

    class CPUOffloadOptimizer(torch.optim.AdamW):
        def __init__(self, params, optimizer_class, *, offload_gradients: bool = False, **kwargs) -> None:
            made.append({"optimizer_class": optimizer_class, "offload_gradients": offload_gradients, **kwargs})
            super().__init__(params, lr=kwargs["lr"])

    optim = types.ModuleType("torchao.optim")
    optim.CPUOffloadOptimizer = CPUOffloadOptimizer
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.optim", optim)
    return made


def test_torchao_accumulating_row_keeps_its_gradients_on_the_gpu_and_steps_torchs_fused_adamw(monkeypatch, methods):
    made = _fake_torchao(monkeypatch)
    accumulating, defaults = methods["torchao_offload_accumulating"], methods["torchao_offload"]
    assert accumulating.accumulates and not defaults.accumulates
    assert defaults.options == {} and inspect.signature(torchao_offload).parameters["offload_gradients"].default
    clock = torchao_offload(_cell(accumulate=2), **accumulating.options)
    assert len(clock.times) == 1 and 10 < clock.losses[0] < 11
    assert [(call["offload_gradients"], call["fused"], call["optimizer_class"]) for call in made] == [
        (False, True, torch.optim.AdamW)]


def test_r2_runs_every_rival_in_a_mode_that_accumulates(methods):
    config = load_config(DEFAULT_CONFIG)
    r2 = ["torchtune_accumulating", "torchao_offload_accumulating", "lightning_fsdp_cpu_offload_fused",
          "lightning_deepspeed_stage_2_offload_tuned", "lightning_deepspeed_stage_3_offload_tuned"]
    cells = expand(config, sizes=["14.8b"], methods=r2, regimes=["r2"])
    assert [cell.skip for cell in cells] == [None] * len(r2)
    assert methods["torchtune_accumulating"].options["optimizer_in_backward"] is False
    assert methods["torchao_offload_accumulating"].options["offload_gradients"] is False


def test_every_runner_sets_the_allocator_as_our_strategy_does(monkeypatch):
    import lightning_offload.strategy

    devices = []
    monkeypatch.setattr(lightning_offload.strategy, "prefer_expandable_segments", devices.append)
    assert all(hasattr(runner, "__wrapped__") for runner in RUNNERS.values())
    clock = RUNNERS["plain"](_cell())
    assert devices == [torch.device("cpu")] and len(clock.times) == 1


def test_liger_row_is_ours_compiled_with_ligers_loss_and_needs_cuda(methods, monkeypatch):
    from bench.rival_losses import LigerLMHeadLoss

    liger = methods["single_gpu_offload_gpu_8bit_compiled_liger"]
    chunked = methods["single_gpu_offload_gpu_8bit_compiled"]
    assert liger.options == {**chunked.options, "loss": "liger"}
    assert not liger.runs_on_cpu and "Liger-Kernel" in liger.label and "chunked" not in liger.label
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed: the cell is "not available"
    with pytest.raises(ImportError):
        LigerLMHeadLoss.adopt(torch.nn.Linear(4, 8, bias=False))


def test_liger_head_plans_as_our_chunked_head_and_measures_on_the_meta_device_without_liger():
    from bench.rival_losses import LigerLMHeadLoss
    from lightning_offload.losses import ChunkedLMHeadLoss

    head = ChunkedLMHeadLoss.adopt(torch.nn.Linear(16, 50, bias=False, device="meta"))
    head.__class__ = LigerLMHeadLoss  # what `adopt` does once liger-kernel imports
    hidden = torch.empty(2, 8, 16, device="meta", requires_grad=True)
    loss = head(hidden, torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert isinstance(head, ChunkedLMHeadLoss) and loss.shape == () and loss.device.type == "meta"
    assert head(hidden).shape == (2, 8, 50)



def test_the_rival_losses_timing_resolves_its_imports_before_reading_its_arguments(monkeypatch, capsys):
    from bench import rival_losses

    monkeypatch.setattr(sys, "argv", ["python -m bench.rival_losses", "--help"])
    with pytest.raises(SystemExit) as exited:
        rival_losses.main()
    assert exited.value.code == 0 and "--sizes" in capsys.readouterr().out
