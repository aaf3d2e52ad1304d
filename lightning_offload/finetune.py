"""The fine-tuning recipe's pieces: a causal LM loaded from a local checkpoint, and the export at the end of the fit.

    python -m lightning_offload.train experiment=finetune model.pretrained=/path/to/model data.path=/path/train.jsonl
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_offload.models import adamw_with_warmup_cosine
from lightning_offload.pretrained import pretrained

log = logging.getLogger(__name__)


class FineTuneLM(pl.LightningModule):
    """A `transformers` causal LM from the folder `pretrained`, trained on (inputs, next-token targets) batches
    with AdamW, linear warm-up then cosine decay per step.

    Args:
        pretrained: a folder written by `save_pretrained` (safetensors); nothing is downloaded.
        lora: `peft.LoraConfig` fields (e.g. ``{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}``):
            the base is frozen and the adapters train. None: every weight trains.
    """

    def __init__(self, pretrained: str | None = None, lora: dict[str, Any] | None = None, lr: float = 2e-5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 10,
                 max_steps: int = 1000) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: nn.Module | None = None

    def lora_config(self) -> Any:
        if self.hparams.lora is None:
            return None
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **dict(self.hparams.lora))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.hparams.pretrained is None:
            raise ValueError("`model.pretrained` is not set: pass the folder of the checkpoint to fine-tune, e.g. "
                             "`model.pretrained=/models/Llama-3.1-8B`.")
        self.model = pretrained(self.hparams.pretrained, lora=self.lora_config())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model(input_ids=tokens, use_cache=False).logits

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_warmup_cosine(self, lr=self.hparams.lr, betas=self.hparams.betas,
                                        weight_decay=self.hparams.weight_decay,
                                        warmup_steps=self.hparams.warmup_steps, max_steps=self.hparams.max_steps)


class ExportHF(pl.Callback):
    """At the end of a fit, saves a checkpoint to `checkpoint` and exports it to `out_dir` as a Hugging Face folder
    (`lightning_offload.export_hf`): LoRA adapters merged, or alone with `adapter_only=True`."""

    def __init__(self, out_dir: str, checkpoint: str, dtype: str = "bf16", adapter_only: bool = False) -> None:
        self.out_dir, self.checkpoint, self.dtype, self.adapter_only = out_dir, checkpoint, dtype, adapter_only

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_offload.export import export_hf

        if not isinstance(pl_module, FineTuneLM):
            raise TypeError(f"`ExportHF` exports a `FineTuneLM`, not a {type(pl_module).__name__}.")
        trainer.save_checkpoint(self.checkpoint)
        if trainer.is_global_zero:
            out = export_hf(self.checkpoint, self.out_dir, config=pl_module.hparams.pretrained, dtype=self.dtype,
                            lora=pl_module.lora_config(), adapter_only=self.adapter_only)
            log.info("Exported the fine-tuned model to %s (load it with `from_pretrained`)", Path(out).resolve())
        trainer.strategy.barrier("ExportHF")
