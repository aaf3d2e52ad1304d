"""Training data that is already on every machine, so the main job needs no download.

`StdlibText` reads the sources of Python's standard library as bytes; `RandomTokens` makes synthetic token batches
for throughput runs of large vocabularies.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """The first `max_bytes` of the standard library's `.py` files (sorted by path, tests excluded) as uint8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if relative[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in relative:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"".join(chunks)[:max_bytes]
    if len(text) < max_bytes:
        raise RuntimeError(f"The standard library at {root} holds only {len(text)} bytes of source; lower max_bytes.")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


class _Windows(Dataset):
    """Non-overlapping windows of `seq_len + 1` bytes, split into inputs and next-byte targets."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[index * self.seq_len : (index + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]


class StdlibText(pl.LightningDataModule):
    def __init__(self, max_bytes: int = 2_000_000, seq_len: int = 128, batch_size: int = 16,
                 val_fraction: float = 0.05, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = stdlib_bytes(self.hparams.max_bytes)
        split = int(len(data) * (1 - self.hparams.val_fraction))
        train_set, val_set = _Windows(data[:split], self.hparams.seq_len), _Windows(data[split:], self.hparams.seq_len)
        if len(train_set) < self.hparams.batch_size or len(val_set) < 1:
            # One full training batch and one validation window: fewer would train on nothing without a word.
            needed = int((self.hparams.batch_size * self.hparams.seq_len + 1) / (1 - self.hparams.val_fraction)) + 1
            needed = max(needed, int((self.hparams.seq_len + 1) / self.hparams.val_fraction) + 1)
            raise ValueError(
                f"`max_bytes={self.hparams.max_bytes}` holds {len(train_set)} training and {len(val_set)} validation "
                f"windows of `seq_len={self.hparams.seq_len}` bytes, fewer than one batch of `batch_size="
                f"{self.hparams.batch_size}` and one validation window. Raise `max_bytes` to at least {needed}, or "
                "lower `seq_len` / `batch_size`."
            )
        self.train_set, self.val_set = train_set, val_set

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          generator=generator, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


class RandomTokens(pl.LightningDataModule):
    """Uniformly random tokens: throughput runs only (the loss has nothing to learn)."""

    def __init__(self, vocab_size: int, seq_len: int = 2048, batch_size: int = 4, num_batches: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, num_batches: int, seed: int) -> DataLoader:
        hp = self.hparams
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, hp.vocab_size, (num_batches * hp.batch_size, hp.seq_len + 1), generator=generator)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=hp.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.num_batches, self.hparams.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(2, self.hparams.seed + 1)
