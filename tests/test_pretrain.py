"""The pretrain recipe end to end on tiny settings: from scratch, continued, outputs, caching, no overwrite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_from_scratch_run_writes_a_loadable_model_and_its_records(tiny_config, pretrain_main, capsys) -> None:
    config = tiny_config()
    metrics = pretrain_main(["--config", str(config), "--max_steps", "4"])
    out = capsys.readouterr().out
    run = config.parent / "run"

    model = AutoModelForCausalLM.from_pretrained(run)  # plain transformers, no hfpipe
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    assert model.config.vocab_size == len(tokenizer) <= 300
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("the king", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["global_step"] == 4
    assert saved["eval_perplexity"] == pytest.approx(torch.tensor(saved["eval_loss"]).exp().item(), rel=1e-6)
    assert saved["parameters"] == model.num_parameters()
    assert saved["train_tokens_per_second"] > 0
    assert (run / "loss.png").stat().st_size > 1000
    history = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    for entry in evaluations:
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]))
    assert all(entry["tokens_per_second"] > 0 for entry in history if "loss" in entry and entry["step"] > 1)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {sample["step"] for sample in samples} == {2, 4}
    assert all(sample["prompt"] for sample in samples)
    resolved = (run / "config.yaml").read_text()
    assert resolved.startswith("# accelerate launch recipes/pretrain.py --config ")
    assert "max_steps: 4" in resolved and "n_layer: 2" in resolved
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "parameters" in out and "tokens per step" in out and "tokens_per_second" in out
    assert list(run.glob("*.bin")) == [run / "training_args.bin"]  # weights are safetensors only


def test_training_changes_the_weights_of_a_continued_model(tiny_gpt2_dir, corpus, tmp_path, pretrain_main) -> None:
    config = write_config(
        tmp_path / "continued.yaml",
        f"""model_name_or_path: {tiny_gpt2_dir}
train_files: ["{corpus}/train/*.txt"]
validation_split_fraction: 0.1
block_size: 32
per_device_train_batch_size: 4
max_steps: 2
learning_rate: 1.0e-3
warmup_steps: 0
output_dir: {tmp_path}/run
""",
    )
    metrics = pretrain_main(["--config", str(config)])
    before = load_file(tiny_gpt2_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before), "every trained tensor moves after 2 AdamW steps"
    assert metrics["run_name"] == "run"
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_resaved_config_reruns_the_same_settings(tiny_config) -> None:
    from hfpipe.train.pretrain import parse as parse_pretrain
    from hfpipe.train.pretrain import resolved_settings
    from hfpipe.train.run import save_resolved_config

    first = parse_pretrain(["--config", str(tiny_config()), "--learning_rate", "2e-3"])
    saved = save_resolved_config(
        Path(first.values[0].output_dir).parent / "again", "pretrain", resolved_settings(first)
    )
    second = parse_pretrain(["--config", str(saved)])
    for name in ("learning_rate", "max_steps", "output_dir", "per_device_train_batch_size"):
        assert getattr(second.values[0], name) == getattr(first.values[0], name)


def test_finished_run_is_never_overwritten_unless_asked(tiny_config, pretrain_main, capsys) -> None:
    config = tiny_config()
    pretrain_main(["--config", str(config)])
    metrics_file = config.parent / "run" / "metrics.json"
    first = metrics_file.read_text()
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert metrics_file.read_text() == first
    pretrain_main(["--config", str(config), "--overwrite_output_dir", "true"])
    assert metrics_file.read_text() != first  # a new finished_at at least


def test_tokenized_data_and_tokenizer_are_cached(tiny_config, pretrain_main, capsys) -> None:
    config = tiny_config()
    pretrain_main(["--config", str(config), "--output_dir", str(config.parent / "a"), "--vocab_size", "290"])
    first = capsys.readouterr().out
    pretrain_main(["--config", str(config), "--output_dir", str(config.parent / "b"), "--vocab_size", "290"])
    second = capsys.readouterr().out
    assert "Training a bpe tokenizer" in first and "Reusing" not in first
    assert "Reusing the tokenizer" in second and "Reusing tokenized data" in second


def test_char_tokenizer_and_fraction_split(corpus, tmp_path, pretrain_main) -> None:
    config = write_config(
        tmp_path / "char.yaml",
        f"""train_files: ["{corpus}/train/doc0.txt"]
tokenizer_type: char
validation_split_fraction: 0.2
n_layer: 1
n_head: 2
n_embd: 16
block_size: 16
per_device_train_batch_size: 2
max_steps: 1
sample_prompts: ["The "]
output_dir: {tmp_path}/run
""",
    )
    pretrain_main(["--config", str(config)])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    text = "Thou king, speak!\nYes."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert len(tokenizer(text).input_ids) == len(text)
    samples = (tmp_path / "run" / "samples.jsonl").read_text()
    assert '"prompt": "The "' in samples


def test_smoke_runs_any_config_briefly_into_outputs_smoke(tiny_config, pretrain_main, monkeypatch) -> None:
    config = tiny_config()
    monkeypatch.chdir(config.parent)
    metrics = pretrain_main(["--config", str(config), "--max_steps", "500", "--smoke"])
    assert metrics["global_step"] == 4
    assert (config.parent / "outputs" / "smoke" / "run" / "metrics.json").is_file()
    assert not (config.parent / "run").exists()
    pretrain_main(["--config", str(config), "--smoke"])  # a smoke run may always be repeated


def test_best_checkpoint_is_kept_beside_the_latest(tiny_config, pretrain_main) -> None:
    config = tiny_config()
    # A learning rate this high makes the validation loss worse after the first evaluation.
    metrics = pretrain_main(
        [
            "--config",
            str(config),
            "--max_steps",
            "8",
            "--learning_rate",
            "3.0",
            "--warmup_steps",
            "0",
            "--lr_scheduler_type",
            "constant",
        ]
    )
    run = config.parent / "run"
    kept = sorted(p.name for p in run.glob("checkpoint-*"))
    best = Path(metrics["best_checkpoint"]).name
    assert best not in ("checkpoint-6", "checkpoint-8"), "the setup must make an early checkpoint the best"
    assert kept == sorted([best, "checkpoint-8"])  # save_total_limit defaults to 2: the best and the latest


def test_existing_tokenizer_dir_is_used_as_is(tiny_config, tiny_tokenizer_dir, pretrain_main) -> None:
    config = tiny_config()
    pretrain_main(["--config", str(config), "--tokenizer_name_or_path", str(tiny_tokenizer_dir)])
    saved = AutoTokenizer.from_pretrained(config.parent / "run")
    original = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert saved.get_vocab() == original.get_vocab() and len(saved) == 320


def test_hub_model_offline_is_one_clear_line(tiny_config, pretrain_main, capsys) -> None:
    config = tiny_config()
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--config", str(config), "--model_name_or_path", "someone/tiny-gpt2", "--n_layer", "2"])
    assert exit_info.value.code == 2
    assert "n_layer shapes a from-scratch model" in capsys.readouterr().err
    text = "\n".join(line for line in config.read_text().splitlines() if not line.startswith(("n_", "vocab")))
    config.write_text(text + "\nmodel_name_or_path: someone/tiny-gpt2\n")
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model_name_or_path: no tokenizer could be loaded from 'someone/tiny-gpt2'")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_eval_loss_is_the_mean_loss_over_every_prediction_of_the_validation_blocks(tiny_config, pretrain_main) -> None:
    from hfpipe.data import load_raw_splits
    from hfpipe.sections import DataArguments, RunArguments
    from hfpipe.train import pretrain

    config = tiny_config()
    metrics = pretrain_main(["--config", str(config)])
    parsed = pretrain.parse(["--config", str(config), "--overwrite_output_dir", "true"])
    smoke = parsed.get(RunArguments).smoke
    raw = load_raw_splits(parsed.get(DataArguments), str(config), smoke=smoke)
    tokenizer = pretrain.load_tokenizer(parsed, raw, smoke)
    validation = pretrain.load_blocks(parsed, raw, tokenizer, smoke)["validation"]
    blocks = torch.stack([row["input_ids"] for row in validation])
    model = AutoModelForCausalLM.from_pretrained(config.parent / "run").eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    # Each block of n tokens holds n - 1 predictions: the mean over all of them, computed without the Trainer.
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
    block = blocks.shape[1]
    assert metrics["eval_loss"] != pytest.approx(expected.item() * (block - 1) / block, rel=1e-5)


def test_a_block_size_beyond_the_models_positions_is_refused_before_loading(
    tiny_gpt2_dir, corpus, tmp_path, capsys, monkeypatch
) -> None:
    from hfpipe.cli import main as hfpipe_main

    config = write_config(
        tmp_path / "continued.yaml",
        f"model_name_or_path: {tiny_gpt2_dir}\ntrain_files: [\"{corpus}/train/*.txt\"]\nblock_size: 65\n",
    )
    monkeypatch.setattr("hfpipe.train.pretrain.load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stopped:
        hfpipe_main(["check", str(config)])
    assert stopped.value.code == 2
    assert "block_size=65 exceeds the model's 64 positions" in capsys.readouterr().err
