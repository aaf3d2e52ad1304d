"""The benchmark's models: Llama-shaped `transformers` models (issue #9's shapes), random init, untied embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def input_embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def block_weights(self) -> list[tuple[int, int]]:
        """(out, in) of a decoder layer's projections, no biases: q, k, v, o, gate, up, down."""
        kv_width = self.hidden // self.heads * self.kv_heads
        return [(self.hidden, self.hidden), (kv_width, self.hidden), (kv_width, self.hidden),
                (self.hidden, self.hidden), (self.intermediate, self.hidden), (self.intermediate, self.hidden),
                (self.hidden, self.intermediate)]

    @property
    def block_params(self) -> int:
        """One decoder layer's parameters: its projections and two RMSNorm weights."""
        return sum(out * inp for out, inp in self.block_weights) + 2 * self.hidden

    @property
    def params(self) -> int:
        # Input embedding and lm_head are separate matrices (untied); one final norm.
        return self.layers * self.block_params + 2 * self.input_embedding_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters that do a matmul per token: all but the input embedding (a lookup)."""
        return self.params - self.input_embedding_params

    def llama_config(self) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, num_hidden_layers=self.layers,
                           intermediate_size=self.intermediate, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           max_position_embeddings=4096, attn_implementation="sdpa",
                           tie_word_embeddings=False,
                           # Training never reads a KV cache; without this, layers not checkpointed by
                           # transformers itself (FSDP's policy) would keep one alive through the forward.
                           use_cache=False)


SIZES = {
    # Only for smoke tests on a CPU.
    "tiny": Shape(hidden=256, layers=4, intermediate=688, heads=4, kv_heads=2, vocab=32000),
    "1.5b": Shape(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256),
    "3.6b": Shape(hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8, vocab=128256),
    "8b": Shape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "14.8b": Shape(hidden=5120, layers=48, intermediate=13824, heads=40, kv_heads=8, vocab=152064),
    "19b": Shape(hidden=6144, layers=44, intermediate=16384, heads=48, kv_heads=8, vocab=152064),
    "32.8b": Shape(hidden=5120, layers=64, intermediate=27648, heads=40, kv_heads=8, vocab=152064),
    "40.8b": Shape(hidden=6144, layers=72, intermediate=24576, heads=48, kv_heads=8, vocab=152064),
    "49.5b": Shape(hidden=6144, layers=88, intermediate=24576, heads=48, kv_heads=8, vocab=152064),
}

# How each method recomputes activations. Every mode checkpoints every decoder layer; they differ in mechanism.
CHECKPOINTING = ("reentrant", "non_reentrant", "by_strategy")


def build_llama(size: str, dtype: torch.dtype | None = None, device: str | None = None) -> torch.nn.Module:
    """A randomly initialised model, created directly in `dtype` on `device` (no fp32 copy in host memory first).

    Without `dtype`/`device` it follows the surrounding context: a Lightning strategy's `configure_model` contexts
    (GPU, meta device, DeepSpeed's `zero.Init`) decide where and how it is built.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = SIZES[size].llama_config()
    if dtype is None and device is None:
        model = LlamaForCausalLM(config)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or previous)
        try:
            with torch.device(device or "cpu"):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model.train()


def enable_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Checkpoints every decoder layer with transformers' own hook, or leaves it to the strategy (`by_strategy`)."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"Unknown checkpointing mode {mode!r}; choose one of {CHECKPOINTING}.")
    if mode == "by_strategy":
        return
    # Explicit either way: transformers changed the default from reentrant to non-reentrant between releases.
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
