"""Strict configs: every shipped config parses; every bad config stops with a clear one-line error, exit 2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_config

from hfpipe.cli import main as hfpipe_main
from hfpipe.devices import cpu_bf16_decision
from hfpipe.models.pretrained import planned_model_dirs
from hfpipe.stages import STAGES, stage_named_in
from hfpipe.train.pretrain import parse as parse_pretrain
from hfpipe.train.sft import parse as parse_sft

SHIPPED = sorted((ROOT / "configs").glob("**/*.yaml"))
PIPELINES = [path for path in SHIPPED if path.read_text().startswith("# hfpipe pipeline ")]
RECIPE_CONFIGS = [path for path in SHIPPED if "accelerate" not in path.parts and path not in PIPELINES]


@pytest.fixture(scope="module", autouse=True)
def shakespeare_prepared() -> None:
    """Shipped configs point at data/shakespeare, which the setup prepares."""
    from hfpipe.data.corpus import prepare_shakespeare

    prepare_shakespeare(ROOT / "data" / "shakespeare")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_starts_with_its_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and any(cmd in first for cmd in ("recipes/", "accelerate launch", "hfpipe pipeline"))


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_config_parses(
    path: Path, monkeypatch: pytest.MonkeyPatch, long_context_gpt2_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.chdir(ROOT)
    recipe = stage_named_in(path)
    parse = STAGES[recipe].parse
    flags = ["--output_dir", str(tmp_path / "run")]
    if "model_name_or_path: outputs/" in path.read_text():  # an earlier stage's output, absent in a fresh clone
        flags += ["--model_name_or_path", str(long_context_gpt2_dir)]
    # Other dirs it reads (a GRPO reward model) are other shipped configs' outputs: planned, as a pipeline plans them.
    with planned_model_dirs({str(yaml.safe_load(other.read_text()).get("output_dir")) for other in RECIPE_CONFIGS}):
        parsed = parse(["--config", str(path.relative_to(ROOT)), *flags])
    training_args = parsed.values[0]
    # No GPU here: the device default (bf16 only for SFT and GRPO, where the CPU probe measured it faster), not
    # TRL's bf16 crash.
    assert training_args.bf16 is (recipe in ("sft", "grpo") and cpu_bf16_decision().bf16)
    assert training_args.output_dir == str(tmp_path / "run")


def run_expecting_error(main: Callable, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a recipe expecting a user error: exit code 2, one or two lines, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("error: ")
    return err


BAD_VALUES = [
    ("learnin_rate: 1.0e-3", ["unknown key 'learnin_rate'", "Did you mean 'learning_rate'?"]),
    ("n_layers: 3", ["unknown key 'n_layers'", "Did you mean 'n_layer'?"]),
    ("torch_dtype: float32", ["'torch_dtype' was renamed", "use 'dtype'"]),
    ("evaluation_strategy: steps", ["'evaluation_strategy' was renamed", "use 'eval_strategy'"]),
    ("max_seq_length: 64", ["'max_seq_length' was renamed", "use 'block_size'"]),
    ("learning_rate: fast", ["learning_rate: 'fast' is not valid; expected a number"]),
    ("per_device_train_batch_size: 2.5", ["per_device_train_batch_size: 2.5", "expected an integer"]),
    ("eval_strategy: step", ["eval_strategy: 'step'", "Did you mean 'steps'?"]),
    ("tokenizer_type: word", ["tokenizer_type: 'word'", "one of bpe, char"]),
    ("model_size: huge", ["model_size: 'huge'", "one of micro, tiny, small, medium, large, xl"]),
    ("n_embd: 33", ["n_embd=33 is not divisible by n_head=2"]),
    ("n_layer: 0", ["n_layer: 0 must be greater than 0"]),
    ("n_head: -2", ["n_head: -2 must be greater than 0"]),
    ("per_device_train_batch_size: 0", ["per_device_train_batch_size: 0 must be greater than 0"]),
    ("learning_rate: -1.0", ["learning_rate: -1.0 must be greater than 0"]),
    ("max_eval_samples: 0", ["max_eval_samples: 0 must be greater than 0"]),
    ("block_size: 0", ["block_size: 0 must be at least 2"]),
    ("bf16: true", ["bf16: true needs a GPU with bfloat16 support"]),
    ("fp16: true\nbf16: true", ["bf16 and fp16 are both true"]),
    ("fp16: true", ["fp16: true needs a CUDA GPU"]),
    ("train_files: [nowhere/*.txt]", ["train_files: no file matches 'nowhere/*.txt'"]),
    ("validation_files: [data.docx]", ["validation_files: no file matches 'data.docx'"]),
    ("model_name_or_path: ./no/such/model", ["model_name_or_path: './no/such/model' is not a directory"]),
    ("use_peft: true", ["use_peft: pretraining trains every weight"]),
]


@pytest.mark.parametrize(("line", "expected"), BAD_VALUES, ids=[line for line, _ in BAD_VALUES])
def test_bad_config_value_is_one_clear_line(
    line: str, expected: list[str], tmp_path: Path, corpus: Path, pretrain_main: Callable, capsys
) -> None:
    base = f'train_files: ["{corpus}/train/*.txt"]\nn_head: 2\nn_embd: 32\noutput_dir: {tmp_path}/run\n'
    keys = {entry.split(":")[0] for entry in line.splitlines()}
    base = "\n".join(entry for entry in base.splitlines() if entry.split(":")[0] not in keys)
    config = write_config(tmp_path / "bad.yaml", f"{base}\n{line}\n")
    err = run_expecting_error(pretrain_main, ["--config", str(config)], capsys)
    assert str(config) in err
    for fragment in expected:
        assert fragment in err
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad config"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("learning_rate: 1e-3\nmax_steps: [1,\n", "line 3"),
        ("- learning_rate\n- max_steps\n", "expected a mapping of 'key: value' lines at the top level, got a list"),
        ("just words\n", "got a str"),
        ("max_steps: 2\nmax_steps: 3\n", "key 'max_steps' is written twice"),
    ],
    ids=["empty", "comment-only", "syntax-error", "list-root", "scalar-root", "duplicate-key"],
)
def test_malformed_yaml_is_one_clear_line(text: str, expected: str, tmp_path: Path, pretrain_main, capsys) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    err = run_expecting_error(pretrain_main, ["--config", str(config)], capsys)
    assert str(config) in err and expected in err


def test_missing_config_file(tmp_path: Path, pretrain_main, capsys) -> None:
    err = run_expecting_error(pretrain_main, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml: config file not found" in err


def test_cli_flags_override_yaml_and_are_checked(tiny_config, pretrain_main, capsys) -> None:
    config = tiny_config()
    parsed = parse_pretrain(["--config", str(config), "--learning_rate", "3e-4", "--max_steps", "7"])
    training_args = parsed.values[0]
    assert training_args.learning_rate == pytest.approx(3e-4)
    assert training_args.max_steps == 7
    assert parsed.user_keys["learning_rate"] == pytest.approx(3e-4)
    err = run_expecting_error(pretrain_main, ["--config", str(config), "--learning_rat", "3e-4"], capsys)
    assert "unknown flag 'learning_rat'" in err and "Did you mean 'learning_rate'?" in err
    err = run_expecting_error(pretrain_main, ["--config", str(config), "--max_steps", "many"], capsys)
    assert "--max_steps" in err and "many" in err


def test_yaml_scientific_notation_without_dot_is_a_float(tiny_config, tmp_path: Path) -> None:
    config = tiny_config()
    config.write_text(config.read_text().replace("vocab_size: 300", "vocab_size: 300\nlearning_rate: 3e-4"))
    training_args = parse_pretrain(["--config", str(config)]).values[0]
    assert training_args.learning_rate == pytest.approx(3e-4)  # PyYAML reads 3e-4 as a string


def test_run_name_and_output_dir_are_derived(tiny_config, monkeypatch, tmp_path: Path) -> None:
    config = tiny_config()
    config.write_text("\n".join(line for line in config.read_text().splitlines() if "output_dir" not in line))
    monkeypatch.chdir(tmp_path)
    training_args = parse_pretrain(["--config", str(config)]).values[0]
    assert training_args.run_name == "pretrain-gpt2-micro-2x2x32-bpe300-ctx32"
    assert training_args.output_dir == "outputs/pretrain-gpt2-micro-2x2x32-bpe300-ctx32"


def test_check_command_prints_resolved_settings(tiny_config, capsys) -> None:
    config = tiny_config()
    hfpipe_main(["check", str(config), "--learning_rate", "2e-4"])
    out = capsys.readouterr().out
    assert "valid for recipes/pretrain.py" in out
    assert "learning_rate: 0.0002" in out and "n_layer: 2" in out and "bf16: false" in out
    assert "# output_dir: new run" in out


def test_check_command_rejects_bad_config(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "bad.yaml", "learning_rat: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        hfpipe_main(["check", str(config)])
    assert exit_info.value.code == 2
    assert "Did you mean 'learning_rate'?" in capsys.readouterr().err


def test_secrets_never_reach_the_saved_config(tmp_path: Path) -> None:
    from hfpipe.train.run import save_resolved_config

    path = save_resolved_config(tmp_path, "pretrain", {"hub_token": "hf_secret123", "learning_rate": 1e-3})
    assert "hf_secret123" not in path.read_text()
    assert "learning_rate" in path.read_text()


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_pipeline_checks_all_its_stages(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfpipe.tools.pipeline import plan, read_pipeline

    monkeypatch.chdir(ROOT)
    stages, _, _ = read_pipeline(path.relative_to(ROOT))
    plan(stages, None)  # later stages start from outputs that do not exist yet: planned, not refused
    assert all(stage.output_dir is not None for stage in stages)


def stage_config(stage: str, directory: Path, corpus: Path, model: Path, extra: str) -> Path:
    """A minimal config for `stage` (pretrain from scratch on the corpus; SFT and DPO from `model` on one row file),
    writing to directory/run unless `extra` sets output_dir."""
    if stage == "pretrain":
        base = f'train_files: ["{corpus}/train/*.txt"]\nn_head: 2\nn_embd: 32\n'
    else:
        rows = directory / "rows.jsonl"
        rows.write_text('{"prompt": "Hi", "completion": "Hello.", "chosen": "Hello.", "rejected": "Go."}\n')
        base = f"model_name_or_path: {model}\ntrain_files: [{rows}]\n"
    if "output_dir:" not in extra:
        base += f"output_dir: {directory}/run\n"
    path = directory / f"{stage}.yaml"
    path.write_text(f"# accelerate launch recipes/{stage}.py --config {path}\n{base}{extra}\n", encoding="utf-8")
    return path


# What transformers or the run would otherwise only refuse after the model has loaded.
RUN_SETTING_ERRORS = [
    ("report_to: wandbb", ["report_to: 'wandbb' is not valid; expected none, all", "Did you mean 'wandb'?"]),
    ("report_to: [tensorboard, tensorbord]", ["report_to: 'tensorbord' is not valid", "Did you mean 'tensorboard'?"]),
    ("report_to: [none, wandb]", ["report_to: 'none' is not valid", "alone"]),
    ("output_dir: {tmp}/a_file", ["output_dir: '{tmp}/a_file' is a file, not a directory"]),
    ("output_dir: {tmp}/a_file/run", ["output_dir: '{tmp}/a_file/run' cannot be created: '{tmp}/a_file' is a file"]),
    ("output_dir: {tmp}/locked/run", ["output_dir: '{tmp}/locked/run' cannot be written: '{tmp}/locked' is not"]),
]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
@pytest.mark.parametrize(("line", "expected"), RUN_SETTING_ERRORS, ids=[line for line, _ in RUN_SETTING_ERRORS])
def test_run_settings_that_fail_after_loading_are_refused_by_check(
    stage: str,
    line: str,
    expected: list[str],
    tmp_path: Path,
    corpus: Path,
    long_context_gpt2_dir: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "locked").mkdir()
    # Tests run as root, whom permission bits do not stop: the read-only directory is simulated.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != tmp_path / "locked" and real_access(path, mode, **kw)
    )
    config = stage_config(stage, tmp_path, corpus, long_context_gpt2_dir, line.format(tmp=tmp_path))
    err = run_expecting_error(hfpipe_main, ["check", str(config)], capsys)
    assert err.startswith(f"error: {config}: ") and len(err.splitlines()) == 1, err
    for fragment in expected:
        assert fragment.format(tmp=tmp_path) in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "locked" / "run").exists()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("size", [0, -4])
def test_max_length_of_zero_or_less_is_refused(
    stage: str, size: int, tmp_path: Path, corpus: Path, long_context_gpt2_dir: Path, capsys
) -> None:
    config = stage_config(stage, tmp_path, corpus, long_context_gpt2_dir, f"max_length: {size}")
    err = run_expecting_error(hfpipe_main, ["check", str(config)], capsys)
    assert f"{config}: max_length: {size} must be greater than 0" in err
    err = run_expecting_error(
        hfpipe_main,
        ["check", str(stage_config(stage, tmp_path, corpus, long_context_gpt2_dir, "")), "--max_length", "0"],
        capsys,
    )
    assert "command line: max_length: 0 must be greater than 0" in err


@pytest.mark.parametrize("value", ["none", "all", "tensorboard", "[tensorboard, wandb]", "[all]"])
def test_every_report_to_transformers_accepts_is_accepted(
    value: str, tmp_path: Path, corpus: Path, long_context_gpt2_dir: Path
) -> None:
    config = stage_config("sft", tmp_path, corpus, long_context_gpt2_dir, f"report_to: {value}")
    parse_sft(["--config", str(config)])
