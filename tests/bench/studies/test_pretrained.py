"""bench/studies/pretrained.py on the CPU at the tiny size: a saved checkpoint fine-tuned through `from_pretrained` gets the
plan the same model built from its config gets."""

from __future__ import annotations

from bench.studies.pretrained import fit_one, save_checkpoint


def test_a_checkpoint_loaded_in_configure_model_is_planned_as_its_config_built_twin(tmp_path) -> None:
    assert save_checkpoint("tiny", tmp_path) > 0 and save_checkpoint("tiny", tmp_path) == 0
    runs = {source: fit_one("tiny", str(tmp_path), source, "default", steps=2, warmup=1, micro_batch=1, seq=8)
            for source in ("config", "pretrained")}
    assert runs["pretrained"]["plan"] == runs["config"]["plan"] is not None
    assert all(len(run["step_s"]) == 2 for run in runs.values())
