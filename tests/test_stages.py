"""The stage registry is the one place a stage is known: a stage registered there alone shows up in `hfpipe check`,
the pipeline planner, the tools' pick of the latest finished run, generation's prompt format and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfpipe import cli
from hfpipe.hub.card import model_card
from hfpipe.hub.files import Upload
from hfpipe.rundir import latest_finished_run, model_or_latest_run, stage_of
from hfpipe.stages import STAGES, Stage, get_stage, register
from hfpipe.tools.pipeline import plan, read_pipeline, stage_command
from hfpipe.tools.prompts import pick_format

TOY = Stage(
    "toy",
    "hfpipe.train.sft",  # a toy stage configured like SFT
    card_title="Toy tuning",
    card_tags=("toy-tag",),
    instruction_layout=True,
    pick_rank=99,
)


@pytest.fixture
def toy_stage(monkeypatch: pytest.MonkeyPatch) -> Stage:
    monkeypatch.setitem(STAGES, "toy", TOY)  # as register(TOY) would, undone after the test
    return TOY


def _toy_config(path: Path, model: Path, rows: Path) -> Path:
    path.write_text(
        f"# accelerate launch recipes/toy.py --config {path.name}\n"
        f"model_name_or_path: {model}\ntrain_files: [{rows}]\nmax_length: 64\noutput_dir: {path.parent / 'toy-run'}\n"
    )
    return path


def _finished_run(run_dir: Path, stage: str, metrics: dict | None = None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"# accelerate launch recipes/{stage}.py --config x.yaml\nmax_steps: 2\n")
    (run_dir / "metrics.json").write_text(json.dumps({"stage": stage, "global_step": 2, **(metrics or {})}))
    return run_dir


def test_register_adds_a_stage_and_get_stage_names_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hfpipe.stages.STAGES", dict(STAGES))
    from hfpipe import stages

    register(TOY)
    assert stages.STAGES["toy"] is TOY and TOY.recipe.name == "toy.py"
    with pytest.raises(Exception, match="unknown stage 'tyo'.*Did you mean 'toy'"):
        get_stage("tyo", "here")


def test_hfpipe_check_validates_a_config_of_a_registered_stage(
    toy_stage: Stage, tmp_path: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a b c"}\n' * 8)
    cli.main(["check", str(_toy_config(tmp_path / "toy.yaml", tiny_gpt2_dir, rows))])
    out = capsys.readouterr().out
    assert "valid for recipes/toy.py" in out and "run_name: toy-run" in out


def test_unknown_stage_in_check_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "x.yaml"
    config.write_text("# accelerate launch recipes/toy.py --config x.yaml\nmax_steps: 2\n")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["check", str(config)])
    assert stopped.value.code == 2
    assert "unknown stage 'toy'" in capsys.readouterr().err


def test_pipeline_plans_and_launches_a_registered_stage(
    toy_stage: Stage, tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a b c"}\n' * 8)
    config = _toy_config(tmp_path / "toy.yaml", tiny_gpt2_dir, rows)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"stages:\n  - {{name: first, config: {config}}}\n")
    stages, _, _ = read_pipeline(pipeline)
    plan(stages, None)
    assert stages[0].recipe == "toy" and stages[0].output_dir == tmp_path / "toy-run"
    assert str(TOY.recipe) in stage_command(stages[0], stages, rerun=False)


def test_tools_pick_the_highest_ranked_stage_and_card_and_format_follow_it(
    toy_stage: Stage, tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _finished_run(tmp_path / "outputs" / "dpo-run", "dpo")
    toy_run = _finished_run(tmp_path / "outputs" / "toy-run", "toy")
    assert latest_finished_run() == (Path("outputs/toy-run"), "toy")
    assert model_or_latest_run(None) == ("outputs/toy-run", "the newest finished toy run under outputs/")
    assert stage_of(toy_run) == "toy"

    card = str(model_card(toy_run, "someone/toy", Upload("model", {}, None, "full model")))
    assert "Toy tuning of" in card and "- toy-tag" in card and "- toy" in card

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)  # no chat template
    assert pick_format(None, tokenizer, str(toy_run))[0] == "instruction"
    monkeypatch.setitem(STAGES, "toy", Stage("toy", "hfpipe.train.sft", "Toy", pick_rank=99))
    assert pick_format(None, tokenizer, str(toy_run))[0] == "raw"


def test_a_stage_without_a_rank_is_never_picked(toy_stage: Stage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(STAGES, "toy", Stage("toy", "hfpipe.train.sft", "Toy", pick_rank=None))
    _finished_run(tmp_path / "sft-run", "sft")
    _finished_run(tmp_path / "toy-run", "toy")
    assert latest_finished_run(tmp_path) == (tmp_path / "sft-run", "sft")


def test_a_pipeline_stage_after_a_reward_model_starts_from_the_model_before_it(tmp_path: Path, tiny_gpt2_dir: Path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a b c"}\n' * 8)
    configs = {}
    for stage in ("sft", "reward", "dpo"):
        configs[stage] = tmp_path / f"{stage}.yaml"
        configs[stage].write_text(f"# accelerate launch recipes/{stage}.py --config x.yaml\nmax_steps: 2\n")
    pipeline = tmp_path / "pipeline.yaml"
    stages_text = "".join(f"  - {{name: {stage}, config: {configs[stage]}}}\n" for stage in configs)
    pipeline.write_text(f"stages:\n{stages_text}  - {{name: check, eval: {{text: [{rows}]}}}}\n")
    stages, _, _ = read_pipeline(pipeline)
    assert [(stage.name, stage.source) for stage in stages] == [
        ("sft", None),
        ("reward", "sft"),
        ("dpo", "sft"),
        ("check", "dpo"),
    ]
    pipeline.write_text(f"stages:\n{stages_text.replace('{name: dpo,', '{name: dpo, from: reward,')}")
    with pytest.raises(Exception, match="from: 'reward' is not an earlier training stage whose model generates"):
        read_pipeline(pipeline)
