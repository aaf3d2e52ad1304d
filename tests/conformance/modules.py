"""LightningModules the project did not design, each as its author would write it: data and weights drawn from the
global random streams after `seed_everything`, shuffled loaders, dropout, hooks with their usual side effects.

Each kind is tiny (a few thousand parameters, a few steps) so the whole suite runs in minutes on two CPU cores.
`KINDS` maps a kind's name to a factory of a fresh module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ_LEN, BATCH, SAMPLES = 48, 12, 4, 16


def token_loader(samples: int = SAMPLES, shuffle: bool = True, batch_size: int = BATCH) -> DataLoader:
    """Random token sequences from the global stream (as a user's synthetic data would be), shuffled each epoch."""
    tokens = torch.randint(0, VOCAB, (samples, SEQ_LEN + 1))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=shuffle)


def boring_model() -> pl.LightningModule:
    from lightning.pytorch.demos.boring_classes import BoringModel

    return BoringModel()


def lightning_transformer() -> pl.LightningModule:
    from lightning.pytorch.demos.transformer import LightningTransformer

    class LocalTokens(LightningTransformer):
        """Lightning's demo transformer (lazily built positional table, dropout, SGD) on local tokens."""

        def prepare_data(self) -> None:
            pass

        def train_dataloader(self) -> DataLoader:
            return token_loader()

    return LocalTokens(vocab_size=VOCAB)


class _TokenLM(pl.LightningModule):
    """A language model trained with AdamW on the shuffled token loader; subclasses build the network."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return token_loader()


class _HuggingFaceModule(_TokenLM):
    """A transformers model trained on its own loss, as a fine-tuning script would."""

    def __init__(self, build: Callable[[], nn.Module], in_configure_model: bool = False) -> None:
        super().__init__()
        self.build = build
        self.model = None if in_configure_model else build()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build()

    def batch_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        return {"input_ids": inputs, "labels": targets}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.model(**self.batch_inputs(batch)).loss
        self.log("train_loss", loss)
        return loss


def _llama(tied: bool, kv_heads: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def llama_tied() -> pl.LightningModule:
    return _HuggingFaceModule(lambda: _llama(tied=True, kv_heads=4))


def llama_gqa_untied_in_configure_model() -> pl.LightningModule:
    """Grouped-query attention, untied output layer, built in `configure_model` from the global stream."""
    return _HuggingFaceModule(lambda: _llama(tied=False, kv_heads=2), in_configure_model=True)


def gpt2_conv1d() -> pl.LightningModule:
    """GPT-2: transformers' `Conv1D` layers (weights stored transposed), learned positions, tied output layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ_LEN)
    return _HuggingFaceModule(lambda: GPT2LMHeadModel(config))


def mixtral_moe_in_configure_model() -> pl.LightningModule:
    """Mixture of experts: each token routed to 2 of 4 experts (shapes that depend on the routing)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=SEQ_LEN)
    return _HuggingFaceModule(lambda: MixtralForCausalLM(config), in_configure_model=True)


class _TorchEncoderLM(_TokenLM):
    """torch's own `nn.TransformerEncoder` as a causal LM, built in `configure_model`: it deep-copies the layer it is
    given, whose `nn.MultiheadAttention` initialises through `torch.nn.init` functions imported by name."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.ModuleDict | None = None

    def configure_model(self) -> None:
        if self.net is None:
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
            self.net = nn.ModuleDict({"embedding": nn.Embedding(VOCAB, 32), "head": nn.Linear(32, VOCAB),
                                      "encoder": nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        causal = nn.Transformer.generate_square_subsequent_mask(inputs.shape[1], device=inputs.device)
        hidden = self.net["encoder"](self.net["embedding"](inputs), mask=causal, is_causal=True)
        loss = F.cross_entropy(self.net["head"](hidden).flatten(0, 1).float(), targets.flatten())
        self.log("train_loss", loss)
        return loss


def torch_transformer_encoder_in_configure_model() -> pl.LightningModule:
    return _TorchEncoderLM()


class _NormalisedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight_normed = nn.utils.parametrizations.weight_norm(nn.Linear(32, 32))
        self.spectral_normed = nn.utils.parametrizations.spectral_norm(nn.Linear(32, 32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.spectral_normed(torch.tanh(self.weight_normed(hidden))))


class _WeightNormLM(_TorchEncoderLM):
    """Residual blocks of weight- and spectral-normalised layers (`nn.utils.parametrizations`: speech models'
    convolutions, GAN discriminators), built in `configure_model`; spectral norm's vectors are drawn at random."""

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.ModuleDict({"embedding": nn.Embedding(VOCAB, 32), "head": nn.Linear(32, VOCAB),
                                      "blocks": nn.Sequential(*(_NormalisedBlock() for _ in range(3)))})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        logits = self.net["head"](self.net["blocks"](self.net["embedding"](inputs)))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self.log("train_loss", loss)
        return loss


def weight_norm_in_configure_model() -> pl.LightningModule:
    return _WeightNormLM()


class _LoRAModule(_HuggingFaceModule):
    """A fine-tuning script's LoRA: peft adapters (with dropout) on a Llama built in `configure_model`, the optimizer
    given the trainable parameters only."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _llama_with_lora() -> nn.Module:
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    return peft.get_peft_model(_llama(tied=False, kv_heads=2), config)


def llama_peft_lora_in_configure_model() -> pl.LightningModule:
    return _LoRAModule(_llama_with_lora, in_configure_model=True)


class _T5Module(_HuggingFaceModule):
    def batch_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        return {"input_ids": inputs, "labels": targets.flip(-1)}


def t5() -> pl.LightningModule:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    return _T5Module(lambda: T5ForConditionalGeneration(config))


class _MaskedLMModule(_HuggingFaceModule):
    def batch_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        inputs, _ = batch
        # Masks drawn from the global stream in every step: the masking a run sees is the strategy's to keep.
        masked = torch.rand(inputs.shape, device=inputs.device) < 0.3
        return {"input_ids": inputs.masked_fill(masked, 1), "labels": inputs.masked_fill(~masked, -100)}


def bert_mlm() -> pl.LightningModule:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=SEQ_LEN)
    return _MaskedLMModule(lambda: BertForMaskedLM(config))


class _Classifier(pl.LightningModule):
    """Images (random, from the global stream) into 4 classes; subclasses vary the network and the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = self.build()

    def build(self) -> nn.Module:
        # No bias before BatchNorm (it cancels it): its gradient would be rounding noise, which Adam makes steps of.
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 6 * 6, 4))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def images(self) -> TensorDataset:
        return TensorDataset(torch.randn(SAMPLES, 1, 6, 6), torch.randint(0, 4, (SAMPLES,)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.images(), batch_size=BATCH, shuffle=True)


def cnn_batchnorm() -> pl.LightningModule:
    return _Classifier()


class _FrozenTrunk(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.net[1].requires_grad_(False)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def frozen_trunk() -> pl.LightningModule:
    return _FrozenTrunk()


class _SharedParameter(_Classifier):
    def build(self) -> nn.Module:
        net = nn.Sequential(nn.Flatten(), nn.Linear(36, 36), nn.Tanh(), nn.Linear(36, 36), nn.Tanh(), nn.Linear(36, 4))
        net[3].weight = net[1].weight  # one weight, two layers
        return net


def shared_parameter() -> pl.LightningModule:
    return _SharedParameter()


class _ParamGroups(_Classifier):
    def configure_optimizers(self) -> Any:
        conv, norm, head = self.net[0], self.net[1], self.net[4]
        return torch.optim.AdamW([
            {"params": conv.parameters(), "lr": 2e-2},
            {"params": norm.parameters(), "lr": 5e-3, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": 1e-2, "betas": (0.8, 0.95)},
        ], lr=1e-2, weight_decay=0.1)


def param_groups() -> pl.LightningModule:
    return _ParamGroups()


class _Plateau(_Classifier):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        # patience 0 and a threshold no loss meets: the lr halves after every epoch, so its effect shows at once.
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, threshold=10.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss"}}


def reduce_lr_on_plateau() -> pl.LightningModule:
    return _Plateau()


class _OneCycle(_Classifier):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        # Reading `estimated_stepping_batches` makes Lightning set up the training data from inside this hook.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2,
                                                        total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def one_cycle_lr() -> pl.LightningModule:
    return _OneCycle()


class _Evaluated(_Classifier):
    """A validation loop with torchmetrics, then `validate`, `test` and `predict` after `fit`."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.accuracy = MulticlassAccuracy(num_classes=4)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.accuracy(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", self.accuracy)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.log("test_loss", F.cross_entropy(self(images), labels))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.images(), batch_size=BATCH)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


def evaluation_loops() -> pl.LightningModule:
    return _Evaluated()


class _Compiled(_Classifier):
    def build(self) -> nn.Module:
        # `aot_eager` traces forward and backward as inductor does, without a C++ compiler.
        return torch.compile(super().build(), backend="aot_eager")


def user_compiled() -> pl.LightningModule:
    return _Compiled()


class _Manual(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()


def manual_optimization() -> pl.LightningModule:
    return _Manual()


# Each kind's label in docs/conformance.md's table, by the factory's name (the test id).
LABELS: dict[str, str] = {
    "boring_model": "Lightning `BoringModel`",
    "lightning_transformer": "Lightning `LightningTransformer` (local tokens)",
    "llama_tied": "decoder-only (Llama), tied embeddings",
    "llama_gqa_untied_in_configure_model": "decoder-only, GQA, untied, built in `configure_model`",
    "llama_peft_lora_in_configure_model": "peft LoRA (with dropout) on a Llama built in `configure_model`",
    "gpt2_conv1d": "GPT-2 (`Conv1D` layers, learned positions, tied)",
    "torch_transformer_encoder_in_configure_model": "torch's `nn.TransformerEncoder` (cloned layers), built in "
                                                    "`configure_model`",
    "weight_norm_in_configure_model": "weight- and spectral-normalised layers (`nn.utils.parametrizations`), built in "
                                      "`configure_model`",
    "mixtral_moe_in_configure_model": "mixture of experts (Mixtral, 2 of 4 experts), built in `configure_model`",
    "t5": "encoder-decoder (T5)",
    "bert_mlm": "encoder-only (BERT masked LM)",
    "cnn_batchnorm": "CNN with BatchNorm, shuffled loader",
    "frozen_trunk": "frozen trunk, trainable head",
    "shared_parameter": "parameter shared by two layers",
    "param_groups": "param groups with their own lr and betas",
    "reduce_lr_on_plateau": "`ReduceLROnPlateau` with `monitor`",
    "one_cycle_lr": "`OneCycleLR` over `estimated_stepping_batches`",
    "evaluation_loops": "torchmetrics validation; `validate`/`test`/`predict` after `fit`",
    "user_compiled": "user-compiled module (`torch.compile`)",
    "manual_optimization": "manual optimization",
}
KINDS: dict[str, Callable[[], pl.LightningModule]] = {name: globals()[name] for name in LABELS}
