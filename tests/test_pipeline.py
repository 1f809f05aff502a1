"""`hfpipe pipeline`: stages run in order as their own processes, each from the previous one's output; finished
stages are skipped on rerun; a failing stage stops the pipeline by name and keeps what finished; --from reruns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PAIRS = [{"instruction": f"King {i}?", "chosen": f"Lear {i}.", "rejected": "No."} for i in range(16)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tuning_config(path: Path, recipe: str, data: Path, extra: str = "") -> Path:
    path.write_text(
        f"""# accelerate launch recipes/{recipe}.py --config {path}
model_name_or_path: set-by-the-pipeline
train_files: [{data}]
output_dir: {path.parent}/{recipe}
max_length: 96
per_device_train_batch_size: 4
max_steps: 2
eval_steps: 2
sample_max_new_tokens: 4
{extra}"""
    )
    return path


@pytest.fixture
def pipeline(tmp_path: Path, tiny_config) -> Path:
    """A pretrain -> sft -> dpo -> eval pipeline of 2-step runs on the tiny fixtures."""
    pretrain = tiny_config("pretrain.yaml")
    pretrain.write_text(pretrain.read_text() + "n_positions: 96\n")  # room for the SFT and DPO rows
    sft_rows = write_jsonl(
        tmp_path / "sft.jsonl", [{"instruction": p["instruction"], "output": p["chosen"]} for p in PAIRS]
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    sft = tuning_config(tmp_path / "sft.yaml", "sft", sft_rows)
    dpo = tuning_config(tmp_path / "dpo.yaml", "dpo", pairs)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"""# hfpipe pipeline {path}
stages:
  - {{name: pretrain, config: {pretrain}}}
  - {{name: sft, config: {sft}}}
  - {{name: dpo, config: {dpo}}}
  - {{name: eval, eval: {{preferences: [{pairs}]}}}}
chat_prompts: ["King 1?", "King 2?"]
chat_max_new_tokens: 4
"""
    )
    return path


def run_pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfpipe.cli", "pipeline", *args], capture_output=True, text=True, timeout=600
    )


def test_stages_chain_skip_when_finished_and_rerun_from_a_stage(pipeline: Path) -> None:
    result = run_pipeline(str(pipeline))
    assert result.returncode == 0, result.stderr[-2000:]
    root = pipeline.parent
    assert "--model_name_or_path " + str(root / "run") in result.stdout  # sft starts from the pretrain output
    assert f"model_name_or_path: {root / 'run'}" in (root / "sft" / "config.yaml").read_text()
    assert (root / "dpo" / "metrics.json").is_file() and (root / "dpo" / "eval_results.json").is_file()
    summary = result.stdout.split("=== summary")[1]
    for name in ("pretrain", "sft", "dpo", "eval"):
        assert f"\n{name} " in summary
    assert "pref_accuracy" in summary and ">>> King 1?" in result.stdout

    again = run_pipeline(str(pipeline))
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 4
    assert "skipped" in again.stdout.split("=== summary")[1]

    rerun = run_pipeline(str(pipeline), "--from", "dpo")
    assert rerun.returncode == 0 and rerun.stdout.count("finished earlier") == 2
    assert "=== dpo: " in rerun.stdout and "=== eval: " in rerun.stdout


def test_a_failing_stage_stops_the_pipeline_by_name(pipeline: Path) -> None:
    write_jsonl(pipeline.parent / "pairs.jsonl", [*PAIRS[:3], {**PAIRS[3], "rejected": PAIRS[3]["chosen"]}])
    result = run_pipeline(str(pipeline))
    assert result.returncode != 0  # accelerate launch turns the recipe's exit code 2 into 1
    assert "pipeline stopped: stage 'dpo' failed with exit code" in result.stderr
    assert "finished stages kept: pretrain, sft" in result.stderr
    assert "row 4: 'chosen' and 'rejected' are identical" in result.stderr
    assert (pipeline.parent / "sft" / "metrics.json").is_file()


def test_a_bad_pipeline_file_is_one_line_before_any_stage_runs(pipeline: Path) -> None:
    text = pipeline.read_text()
    pipeline.write_text(text.replace("chat_prompts:", "chat_promts:"))
    result = run_pipeline(str(pipeline))
    assert result.returncode == 2 and "unknown key 'chat_promts'. Did you mean 'chat_prompts'?" in result.stderr
    assert "===" not in result.stdout
    pipeline.write_text(text)
    result = run_pipeline(str(pipeline), "--from", "sfx")
    assert result.returncode == 2 and "--from: no stage named 'sfx'. Did you mean 'sft'?" in result.stderr


def test_an_eval_stage_with_several_files_evaluates_every_one(tmp_path: Path) -> None:
    import argparse

    from hfpipe.evaluation import evaluate
    from hfpipe.tools.pipeline import _eval_flags

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    flags = _eval_flags({"text": [str(first), str(second)], "lm_eval": ["hellaswag", "arc_easy"]}, "here")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["model", *flags])
    assert args.eval_text_files == [str(first), str(second)]
    assert args.eval_lm_tasks == ["hellaswag", "arc_easy"]
