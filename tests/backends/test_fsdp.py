"""The `fsdp` backend (FSDP2 with CPU offload, gloo, world size 1) on CPU, with torch and 8-bit optimizers."""

from __future__ import annotations

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from tests.conftest import TinyLM, fit
from tests.test_optim import EIGHT_BIT_RTOL
from tests.test_strategy import BF16_RTOL, assert_losses_close

# torch's fused AdamW on the host shards against the foreach AdamW of the plain run: measured at most 1.5e-7
# relative per step (tests/conformance).
FUSED_ADAMW_RTOL = 1e-6


def fsdp(**options) -> SingleGPUOffloadStrategy:
    return SingleGPUOffloadStrategy(backend="fsdp", **options)


def test_fp32_matches_plain_run_and_shards_blocks() -> None:
    from torch.distributed.fsdp import FSDPModule

    reference, _ = fit("auto")
    module, _ = fit(fsdp())
    assert_losses_close(module.losses, reference.losses, FUSED_ADAMW_RTOL)
    assert all(isinstance(block, FSDPModule) for block in module.net.blocks)


def test_bf16_mixed_tracks_fp32_plain_run() -> None:
    reference, _ = fit("auto")
    module, _ = fit(fsdp(), precision="bf16-mixed")
    assert_losses_close(module.losses, reference.losses, BF16_RTOL)


@pytest.mark.parametrize("user_choice", [{}, {"foreach": False}])
def test_torch_adamw_steps_host_shards_with_its_fused_kernel_unless_the_user_chose(user_choice: dict) -> None:
    reference, _ = fit("auto", module=TinyLM(optimizer_kwargs=user_choice))
    module, trainer = fit(fsdp(), module=TinyLM(optimizer_kwargs=user_choice))
    assert_losses_close(module.losses, reference.losses, FUSED_ADAMW_RTOL)
    groups = trainer.strategy.optimizers[0].param_groups
    assert all(group["fused"] is (None if user_choice else True) for group in groups)


@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, 0.05)])
def test_adamw8bit_steps_local_shards(accumulate: int, clip: float | None) -> None:
    reference, _ = fit("auto", accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    module, trainer = fit(fsdp(optimizer="adamw8bit"), accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    assert_losses_close(module.losses, reference.losses, EIGHT_BIT_RTOL)
    optimizer = trainer.strategy.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    assert all(not isinstance(p, torch.distributed.tensor.DTensor) for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("on_gpu", [True, False])
def test_accumulation_adds_up_on_the_device_or_in_host_memory_with_the_same_result(on_gpu: bool,
                                                                                   monkeypatch) -> None:
    from torch.distributed.fsdp import FSDPModule

    syncs: list[bool] = []
    original = FSDPModule.set_requires_gradient_sync

    def recording(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        syncs.append(requires_gradient_sync)
        original(self, requires_gradient_sync, recurse=recurse)

    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync", recording)
    reference, _ = fit("auto", accumulate_grad_batches=2, precision="bf16-mixed")
    module, _ = fit(fsdp(accumulate_on_gpu=on_gpu), accumulate_grad_batches=2, precision="bf16-mixed")
    assert_losses_close(module.losses, reference.losses, BF16_RTOL)
    # Only the last micro-batch of a step reduces and offloads.
    assert syncs[:4] == ([False, True, False, True] if on_gpu else [])


def test_checkpoint_is_plain_and_resumes(tmp_path) -> None:
    uninterrupted, _ = fit(fsdp(), module=TinyLM(scheduler="step"), max_epochs=2)
    first, trainer = fit(fsdp(), module=TinyLM(scheduler="step"), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    state_dict = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)["state_dict"]
    plain = TinyLM()
    plain.configure_model()
    plain.load_state_dict(state_dict)
    resumed, _ = fit(fsdp(), module=TinyLM(scheduler="step"), max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert_losses_close(first.losses + resumed.losses, uninterrupted.losses, 1e-5)


def test_a_second_fit_of_the_sharded_module_resumes_in_the_same_process(tmp_path) -> None:
    uninterrupted, _ = fit(fsdp(), module=TinyLM(scheduler="step"), max_epochs=2)
    module, trainer = fit(fsdp(), module=TinyLM(scheduler="step"), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    fit(fsdp(), module=module, max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert_losses_close(module.losses, uninterrupted.losses, 1e-5)


class BlocksSharingAWeight(TinyLM):
    def configure_model(self) -> None:
        if self.net is None:
            super().configure_model()
            self.net.blocks[1].proj.weight = self.net.blocks[0].proj.weight


def test_blocks_sharing_a_weight_are_sharded_together_and_match_the_plain_run() -> None:
    from torch.distributed.fsdp import FSDPModule

    reference, _ = fit("auto", module=BlocksSharingAWeight())
    module, _ = fit(fsdp(block_classes=["Block"]), module=BlocksSharingAWeight())
    assert_losses_close(module.losses, reference.losses, FUSED_ADAMW_RTOL)
    assert module.net.blocks[1].proj.weight is module.net.blocks[0].proj.weight
    assert all(isinstance(block, FSDPModule) for block in module.net.blocks)


class AddsInPlaceToViewsTheBlocksReturn(TinyLM):
    """Each block returns a view of its output, and the network adds to it in place, as some users' models do."""

    def configure_model(self) -> None:
        if self.net is None:
            super().configure_model()
            for block in self.net.blocks:
                forward = block.forward
                block.forward = lambda x, forward=forward: forward(x).view(x.shape)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.embed(tokens) + net.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in net.blocks:
            h = block(x)
            h += 0.5 * x
            x = h
        return net.head(net.norm(x))


def test_in_place_ops_on_views_the_blocks_return_match_the_plain_run() -> None:
    reference, _ = fit("auto", module=AddsInPlaceToViewsTheBlocksReturn())
    module, _ = fit(fsdp(), module=AddsInPlaceToViewsTheBlocksReturn())
    assert_losses_close(module.losses, reference.losses, FUSED_ADAMW_RTOL)


class BlockSharingAWeightWithTheFinalNorm(TinyLM):
    def configure_model(self) -> None:
        if self.net is None:
            super().configure_model()
            self.net.norm.weight = self.net.blocks[0].attn_norm.weight


def test_a_block_sharing_a_weight_outside_the_blocks_is_left_to_the_root_unit_and_matches_the_plain_run() -> None:
    from torch.distributed.fsdp import FSDPModule

    reference, _ = fit("auto", module=BlockSharingAWeightWithTheFinalNorm())
    with pytest.warns(UserWarning, match=r"\['net.blocks.0'\] share a weight with a module outside the blocks"):
        module, _ = fit(fsdp(block_classes=["Block"]), module=BlockSharingAWeightWithTheFinalNorm())
    assert_losses_close(module.losses, reference.losses, FUSED_ADAMW_RTOL)
    assert not isinstance(module.net.blocks[0], FSDPModule) and isinstance(module.net.blocks[1], FSDPModule)


def test_second_fit_on_the_same_trainer_keeps_bf16() -> None:
    from tests.conftest import token_batches

    module, trainer = fit(fsdp(), precision="bf16-mixed", max_epochs=1)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, train_dataloaders=token_batches(8))
    assert trainer.strategy.backend._precision == "bf16-mixed" and len(module.losses) == 16


def test_a_module_sharded_by_an_earlier_fit_refuses_another_precision_by_name() -> None:
    module, _ = fit(fsdp(), num_batches=2)
    with pytest.raises(ValueError, match=r"sharded by an earlier `fit` for `precision='32-true'`.*cannot train with "
                                         r"'bf16-mixed'. Fit it with `precision='32-true'`, or build a fresh module"):
        fit(fsdp(), module=module, precision="bf16-mixed", num_batches=2)


def test_unsupported_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported by the `fsdp` backend"):
        fit(fsdp(), precision="bf16-true")
