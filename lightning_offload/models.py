"""The language model the main job trains: a LightningModule around a small byte-level GPT or a `transformers` Llama.

The network is built in `configure_model`, so offload engines can build it already partitioned; nothing here knows
about offloading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lightning_offload.losses import ChunkedLMHeadLoss


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.n_heads, -1).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    """A decoder-only transformer over bytes, with the output layer tied to the input embedding.

    `forward(tokens)` gives the logits; `forward(tokens, targets)` the mean cross-entropy, computed without them.
    """

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 max_seq_len: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = ChunkedLMHeadLoss(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x), targets)


def build_network(arch: str, config: dict[str, Any], config_file: str | None = None) -> nn.Module:
    """`arch="hf"`: the `transformers` causal LM that `config_file` (a config.json, or its folder) describes, with
    `config`'s keys overriding the file's; random weights, nothing is downloaded."""
    if arch == "gpt":
        return TinyGPT(**config)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = LlamaForCausalLM(LlamaConfig(**config))
        return _TransformersNetwork(llama)
    if arch == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        return _TransformersNetwork(AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(config_json(config_file), **config)))
    raise ValueError(f"Unknown model `arch={arch!r}`. Choose 'gpt', 'llama' or 'hf'.")


def config_json(path: str | None) -> Path:
    """The transformers config.json at `path` (the file or the folder holding it), refused by name when missing."""
    if path is None:
        raise ValueError("`model=hf` needs the transformers config.json to build: pass "
                         "`model.config=/path/to/config.json` (or the model's folder).")
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"`model.config={path}`: no such file. Pass a transformers config.json or the folder "
                         "holding it, e.g. `model.config=/models/Llama-3.1-8B/config.json`.")
    return file


def config_json_value(path: str | None, key: str) -> Any:
    """One key of a transformers config.json (the `config_json:` resolver of the YAML configs)."""
    return json.loads(config_json(path).read_text())[key]


class _TransformersNetwork(nn.Module):
    """A `transformers` causal LM seen as tokens -> logits, or (tokens, targets) -> loss, like `TinyGPT`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        ChunkedLMHeadLoss.adopt(model.get_output_embeddings())

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=tokens, use_cache=False).last_hidden_state
        return self.model.get_output_embeddings()(hidden, targets)


class CausalLM(pl.LightningModule):
    """Next-token prediction with AdamW (decay on matrices only), linear warm-up then cosine decay per step.

    `arch`: "gpt" (`TinyGPT(**network)`), "llama" (`LlamaConfig(**network)`) or "hf" (the transformers causal LM of
    the config.json `config`, `network` overriding its keys)."""

    DEFAULT_LR = 3e-3

    def __init__(self, arch: str = "gpt", network: dict[str, Any] | None = None, lr: float = DEFAULT_LR,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 20,
                 max_steps: int = 1000, config: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        # exp of the mean validation loss per token: the perplexity, without the logits.
        self.val_token_loss = MeanMetric()

    def configure_model(self) -> None:
        if self.net is None:
            self.net = build_network(self.hparams.arch, dict(self.hparams.network or {}), self.hparams.config)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with `targets` the mean cross-entropy (computed without materialising the logits)."""
        assert self.net is not None
        return self.net(tokens, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(*batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self(*batch)
        self.val_token_loss.update(loss, weight=batch[1].numel())
        self.log("val/loss", loss, sync_dist=True)  # one value over all processes

    def on_validation_epoch_end(self) -> None:
        self.log("val/perplexity", self.val_token_loss.compute().exp(), prog_bar=True)
        self.val_token_loss.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_warmup_cosine(self, lr=self.hparams.lr, betas=self.hparams.betas,
                                        weight_decay=self.hparams.weight_decay,
                                        warmup_steps=self.hparams.warmup_steps, max_steps=self.hparams.max_steps)

    @torch.no_grad()
    def generate(self, prompt: bytes, max_new_bytes: int = 64, temperature: float = 0.0) -> bytes:
        """Continues `prompt` byte by byte (greedy when `temperature` is 0); for a quick look at a trained model."""
        tokens = torch.tensor(list(prompt), dtype=torch.long, device=self.device)[None]
        for _ in range(max_new_bytes):
            logits = self(tokens[:, -self._context_length():])[0, -1].float()
            if temperature > 0:
                next_token = torch.multinomial(torch.softmax(logits / temperature, -1), 1)
            else:
                next_token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token[None]], dim=1)
        return bytes(tokens[0].tolist())

    def _context_length(self) -> int:
        network = dict(self.hparams.network or {})
        return int(network.get("max_seq_len", network.get("max_position_embeddings", 256)))


def adamw_with_warmup_cosine(model: nn.Module, *, lr: float, betas: Any, weight_decay: float, warmup_steps: int,
                             max_steps: int) -> dict[str, Any]:
    """`configure_optimizers`' answer: AdamW with weight decay on matrices only, a linear warmup into a cosine decay
    to 10% of `lr`, stepped every optimizer step. Frozen weights (a LoRA base) get no optimizer state."""
    # Grouped by module type, not by `p.ndim`: parameters built under DeepSpeed's zero.Init are 0-element
    # placeholders until gathered.
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight"
            (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))
    total = max(max_steps, 1)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
