"""The fine-tuning recipe: `experiment=finetune` on a local checkpoint and a local JSONL file, ending with an export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

import lightning_offload
from lightning_offload.text_data import LocalText
from lightning_offload.train import train
from tests.test_train import compose_config

transformers = pytest.importorskip("transformers")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to"]


def save_tiny_with_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                         eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, documents: int = 40) -> Path:
    generator = torch.Generator().manual_seed(0)
    with path.open("w") as file:
        for _ in range(documents):
            words = [WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=generator)]
            file.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def run_recipe(tmp_path: Path, *extra: str) -> tuple[Path, dict[str, float]]:
    folder = save_tiny_with_tokenizer(tmp_path / "pretrained")
    data = write_jsonl(tmp_path / "train.jsonl")
    cfg = compose_config(tmp_path / "run", [
        "experiment=finetune", f"model.pretrained={folder}", "data=jsonl", f"data.path={data}", "data.seq_len=16",
        "data.batch_size=4", "data.val_fraction=0.1", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "model.lr=1e-2", "model.warmup_steps=1",
        *extra])
    HydraConfig.instance().set_config(cfg)
    return folder, train(cfg)


def test_recipe_fine_tunes_and_exports_a_loadable_model(tmp_path: Path) -> None:
    folder, metrics = run_recipe(tmp_path)
    assert metrics["val/loss"] > 0
    out = tmp_path / "run" / "hf"
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(exported.parameters()).dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file()
    trained = lightning_offload.consolidate(tmp_path / "run" / "checkpoints" / "final.ckpt", prefix="model.")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained[name].to(torch.bfloat16)), name
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], pretrained["model.layers.0.mlp.up_proj.weight"])


def test_recipe_with_lora_exports_the_merged_model(tmp_path: Path) -> None:
    folder, _ = run_recipe(tmp_path, "+model.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
                           "callbacks.export_hf.dtype=fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").state_dict()
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    changed = {name for name in pretrained if not torch.equal(exported[name], pretrained[name])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}


def test_packing_holds_out_the_last_documents(tmp_path: Path) -> None:
    data = LocalText(str(write_jsonl(tmp_path / "train.jsonl", documents=20)), seq_len=8, batch_size=2,
                     val_fraction=0.1)
    data.setup()
    documents = data.documents()
    train_tokens, val_tokens = data.tokens(documents[:18]), data.tokens(documents[18:])
    assert len(data.train_set) == (len(train_tokens) - 1) // 8 and len(data.val_set) == (len(val_tokens) - 1) // 8
    inputs, targets = data.train_set[1]
    assert torch.equal(inputs, train_tokens[8:16]) and torch.equal(targets, train_tokens[9:17])


@pytest.mark.parametrize("record,message", [('{"body": "x"}', "data.text_key"), ("", "data.val_fraction=0")])
def test_bad_data_is_refused_with_the_fix(tmp_path: Path, record: str, message: str) -> None:
    (tmp_path / "train.jsonl").write_text(record + "\n")
    with pytest.raises(ValueError, match=message):
        LocalText(str(tmp_path / "train.jsonl")).setup()
