"""Local text for fine-tuning: a `.txt` file or a `.jsonl` file of documents, tokenized, packed to a fixed length.

Documents are tokenized with the pretrained model's tokenizer (or as bytes with `tokenizer=None`), joined with its
end-of-text token and cut into windows of `seq_len + 1` tokens; the last `val_fraction` of the documents (at least
one) is the validation split. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_offload.data import _Windows


class LocalText(pl.LightningDataModule):
    """
    Args:
        path: a `.jsonl` file (one JSON object per line, its text under `text_key`) or any other file read as
            plain text (documents separated by blank lines).
        tokenizer: a folder with a `transformers` tokenizer (usually the pretrained model's); None: bytes
            (token ids 0-255, for byte-level models).
    """

    def __init__(self, path: str | None = None, tokenizer: str | None = None, text_key: str = "text",
                 seq_len: int = 512, batch_size: int = 4, val_fraction: float = 0.05, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: _Windows | None = None
        self.val_set: _Windows | None = None

    def documents(self) -> list[str]:
        hp = self.hparams
        if hp.path is None:
            raise ValueError("`data.path` is not set: pass the file to train on, e.g. `data.path=/data/train.jsonl`.")
        path = Path(hp.path)
        if not path.is_file():
            raise FileNotFoundError(f"`data.path={hp.path!r}` is not a file.")
        if path.suffix != ".jsonl":
            return [doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if hp.text_key not in record:
                raise ValueError(f"{hp.path}:{number} has no {hp.text_key!r} field (it has {sorted(record)}); pass "
                                 "the field holding the text as `data.text_key=...`.")
            documents.append(str(record[hp.text_key]))
        return documents

    def tokens(self, documents: list[str]) -> torch.Tensor:
        if self.hparams.tokenizer is None:
            return torch.tensor(list(b"\n\n".join(doc.encode() for doc in documents)), dtype=torch.long)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer, local_files_only=True)
        separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        ids = [token for doc in documents for token in tokenizer(doc, add_special_tokens=False)["input_ids"] +
               separator]
        return torch.tensor(ids, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        documents = self.documents()
        held_out = max(1, round(len(documents) * hp.val_fraction)) if hp.val_fraction > 0 else 0
        if len(documents) <= held_out:
            raise ValueError(f"`data.path={hp.path!r}` holds {len(documents)} document(s): too few to hold out "
                             f"{held_out} for validation. Add documents or set `data.val_fraction=0`.")
        split = len(documents) - held_out
        self.train_set = _Windows(self.tokens(documents[:split]), hp.seq_len)
        self.val_set = _Windows(self.tokens(documents[split:]), hp.seq_len) if held_out else None
        if len(self.train_set) < hp.batch_size:
            raise ValueError(f"`data.path={hp.path!r}` packs into {len(self.train_set)} window(s) of "
                             f"{hp.seq_len + 1} tokens, fewer than one batch of {hp.batch_size}: lower "
                             "`data.seq_len` or `data.batch_size`, or add text.")

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          generator=generator, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or len(self.val_set) == 0:
            return []
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
