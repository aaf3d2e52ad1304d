"""LoRA fine-tuning (`pretrained(path, lora=...)`): only the adapters train, under every CPU backend, and export
merges them into the base weights or writes them alone."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from tests.conftest import fit, token_batches
from tests.test_pretrained import CPU_BACKENDS, FineTune, first_tokens, reference_loss, save_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj"]
# The merged layer computes x (W + B A s)^T where the adapted one computes x W^T + (x A^T B^T) s: the same sum
# rounded in another order, measured up to 3e-7 apart on these logits.
MERGE_ATOL = 1e-5


def lora_config() -> object:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


def train_lora(tmp_path: Path, backend: str) -> tuple[FineTune, Path, Path]:
    folder = save_tiny(tmp_path / "pretrained")
    strategy = SingleGPUOffloadStrategy(backend=backend.removesuffix("_built_in_host_memory"), **CPU_BACKENDS[backend])
    load = functools.partial(lightning_offload.pretrained, lora=lora_config())
    module, trainer = fit(strategy, num_batches=2, module=FineTune(folder, load=load, lr=1e-2))
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module, folder, checkpoint


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_only_adapters_train_under_every_cpu_backend(tmp_path: Path, backend: str) -> None:
    module, folder, checkpoint = train_lora(tmp_path, backend)
    # B starts at zero: the adapted model's first loss is the pretrained model's.
    assert module.losses[0] == pytest.approx(reference_loss(folder, first_tokens(2)), rel=1e-6)
    trained = lightning_offload.consolidate(checkpoint, prefix="model.base_model.model.")
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    adapters = [name for name in trained if "lora_" in name]
    assert len(adapters) == 2 * len(TARGETS) * 2  # A and B, per target, per layer
    assert not torch.equal(trained[adapters[1]], torch.zeros_like(trained[adapters[1]]))  # lora_B moved
    for name, value in trained.items():
        if "lora_" not in name:
            assert torch.equal(value, pretrained[name.replace("base_layer.", "")].float()), name


def test_optimizer_holds_state_for_adapters_only(tmp_path: Path) -> None:
    module, _, _ = train_lora(tmp_path, "device")
    optimizer = module.trainer.optimizers[0]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS) * 2
    assert set(optimizer.state) == set(trainable)


def test_merged_export_reproduces_the_adapted_models_logits(tmp_path: Path) -> None:
    module, folder, checkpoint = train_lora(tmp_path, "device")
    out = lightning_offload.export_hf(checkpoint, tmp_path / "merged", config=folder, dtype="fp32", lora=lora_config())
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokens = next(iter(token_batches(1)))[0]
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=tokens).logits
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, rtol=0, atol=MERGE_ATOL)
        base = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert (base(input_ids=tokens).logits - expected).abs().max() > 100 * MERGE_ATOL  # the adapters mattered
    peft_merged = module.model.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(value, peft_merged[name]), name


def test_adapter_export_loads_with_peft(tmp_path: Path) -> None:
    module, folder, checkpoint = train_lora(tmp_path, "device")
    out = lightning_offload.export_hf(checkpoint, tmp_path / "adapter", config=folder, dtype="fp32", lora=lora_config(),
                                      adapter_only=True)
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out)
    tokens = next(iter(token_batches(1)))[0]
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=tokens).logits, module.model(input_ids=tokens).logits)


def test_export_of_adapters_without_their_config_is_refused(tmp_path: Path) -> None:
    _, folder, checkpoint = train_lora(tmp_path, "device")
    with pytest.raises(ValueError, match="pass `lora=`"):
        lightning_offload.export_hf(checkpoint, tmp_path / "out", config=folder)


def test_blocks_are_the_decoder_layers_not_the_more_numerous_lora_layers(tmp_path: Path) -> None:
    from lightning_offload.activation_checkpointing import find_blocks

    model = lightning_offload.pretrained(save_tiny(tmp_path / "pretrained"), lora=lora_config())
    assert {type(block).__name__ for block in find_blocks(model)} == {"LlamaDecoderLayer"}
