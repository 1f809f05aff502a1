"""`hfpipe eval` on a reward model run: the rewards of a file of answers, preference accuracy by reward, the tasks a
scorer cannot do (and --answers on a causal LM) refused before loading, eval_* keys after a reward run's training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_recipe
from test_reward import EASY_HELD_OUT, write_reward_config
from test_sft import write_sft_config

from hfpipe.cli import main
from hfpipe.errors import ConfigError

# The held-out prompts of the reward tests, answered yes (what the reward model learned to prefer) or no; in each of
# the answer formats a row may use.
AFFIRM = [
    {"instruction": "Is 1 a word?", "output": "yes yes yes"},
    {"instruction": "Is 2 a word?", "input": "", "completion": "yes yes yes"},
    {"prompt": "### Instruction:\nIs 3 a word?\n\n### Response:\n", "response": "yes yes yes"},
]
DENY = [{**row, next(key for key in ("output", "completion", "response") if key in row): "no no no"} for row in AFFIRM]
LORA = "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [c_attn, c_proj]\n"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), "utf-8")
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(["eval", *argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_reward(directory: Path, base: Path, extra: str = "") -> tuple[Path, dict]:
    """A reward model trained on the easy pairs, which also scores the affirming answers and the held-out pairs
    after training (its eval_* keys); its run dir and metrics."""
    directory.mkdir(parents=True, exist_ok=True)
    answers = write_jsonl(directory / "affirm.jsonl", AFFIRM)
    extra += f"eval_answer_files: [{answers}]\neval_preference_files: [{directory / 'test.jsonl'}]\n"
    metrics = load_recipe("reward").main(["--config", str(write_reward_config(directory, base, extra, steps=12))])
    return directory / "run", metrics


@pytest.fixture(scope="module")
def reward_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return train_reward(tmp_path_factory.mktemp("reward"), tiny_gpt2_dir)


def evaluate(run: Path, flags: list[str], tmp_path: Path, capsys, name: str = "results.json") -> dict:
    output = tmp_path / name
    code, out, err = run_cli([str(run), *flags, "--output", str(output)], capsys)
    assert code == 0, err
    assert f"Results written to {output}" in out
    return json.loads(output.read_text())


def test_a_reward_run_scores_affirming_answers_above_denying_ones(reward_run, tmp_path: Path, capsys) -> None:
    run, trained = reward_run
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in (("affirm", AFFIRM), ("deny", DENY))}
    results = {
        name: evaluate(run, ["--answers", str(path)], tmp_path, capsys, f"{name}.json") for name, path in files.items()
    }
    affirm, deny = results["affirm"]["metrics"], results["deny"]["metrics"]
    assert set(affirm) == {"reward_mean", "reward_std", "reward_min", "reward_max", "reward_rows"}
    assert affirm["reward_rows"] == deny["reward_rows"] == 3
    assert affirm["reward_min"] > deny["reward_max"], "every affirming answer scores above every denying one"
    assert affirm["reward_min"] <= affirm["reward_mean"] <= affirm["reward_max"] and affirm["reward_std"] >= 0
    assert results["affirm"]["tasks"][0]["task"] == "reward" and results["affirm"]["model"] == str(run)
    # The model reloaded from its dir scores as the trained model in memory did after training (eval_* keys).
    assert trained["reward_mean"] == pytest.approx(affirm["reward_mean"], rel=1e-4)
    assert trained["reward_rows"] == 3


def test_preferences_on_a_reward_run_are_scored_by_reward(reward_run, tmp_path: Path, capsys) -> None:
    run, trained = reward_run
    results = evaluate(run, ["--preferences", str(run.parent / "test.jsonl")], tmp_path, capsys)
    metrics = results["metrics"]
    assert metrics["pref_accuracy"] == 1.0 and metrics["pref_rows"] == len(EASY_HELD_OUT) and metrics["pref_margin"] > 0
    assert "pref_accuracy_per_token" not in metrics  # a log-likelihood figure: not what a reward model measures
    # The same figures as the recipe's own held-out check, which reuses the same pair scoring.
    assert metrics["pref_margin"] == pytest.approx(trained["heldout_pair_margin_after"], rel=1e-4)
    assert trained["pref_accuracy"] == 1.0


def test_a_lora_reward_run_loads_onto_its_base_and_scores_as_trained(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys
) -> None:
    run, trained = train_reward(tmp_path / "lora", tiny_gpt2_dir, LORA)
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()
    answers = write_jsonl(tmp_path / "affirm.jsonl", AFFIRM)
    results = evaluate(
        run, ["--answers", str(answers), "--preferences", str(run.parent / "test.jsonl")], tmp_path, capsys
    )
    assert results["base"] == str(tiny_gpt2_dir)
    assert [task["task"] for task in results["tasks"]] == ["pref", "reward"]
    assert results["metrics"]["reward_mean"] == pytest.approx(trained["reward_mean"], rel=1e-4)
    assert results["metrics"]["pref_margin"] == pytest.approx(trained["pref_margin"], rel=1e-4)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("load_for_inference", "load_scorer_for_inference", "load_reward_scorer"):
        monkeypatch.setattr(f"hfpipe.models.trained.{name}", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--text", "doc.txt"), ("--choices", "mc.jsonl"), ("--lm-eval", "hellaswag")],
)
def test_a_reward_run_refuses_the_causal_lm_tasks_before_loading(
    flag: str, value: str, reward_run, tmp_path: Path, capsys, no_loading
) -> None:
    run, _ = reward_run
    code, _, err = run_cli([str(run), flag, str(tmp_path / value)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"command line: {flag}: needs a causal LM, and {run} is a reward model run" in err
    assert "evaluate it with --preferences or --answers" in err


def test_answers_on_a_causal_lm_are_refused_before_loading(tiny_gpt2_dir: Path, tmp_path: Path, capsys, no_loading):
    answers = write_jsonl(tmp_path / "affirm.jsonl", AFFIRM)
    code, _, err = run_cli([str(tiny_gpt2_dir), "--answers", str(answers)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert (
        f"--answers: needs a reward model run (a recipes/reward.py output), and {tiny_gpt2_dir} is a causal LM" in err
    )


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "Is 1 a word?"}, "line 2: the answer is missing: give 'completion' (or 'output', 'response')"),
        ({"completion": "yes"}, "line 2: 'prompt' (or 'instruction') is missing"),
        ({"prompt": "Hi", "output": "a", "response": "b"}, "line 2: gives both 'output' and 'response'"),
        (
            {"prompt": "Hi", "completion": [{"role": "assistant", "content": "a"}]},
            "line 2: 'completion' is a message list, which needs",
        ),
        (
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "a"}]},
            "line 2: every message of 'completion' must be the assistant's",
        ),
        ({"instruction": "Is 1 a word?", "output": 3}, "line 2: 'output' must be a string"),
        ('{"prompt": "Hi",', "line 2 is not valid JSON"),
    ],
)
def test_a_bad_answers_row_names_its_file_and_line_before_loading(
    row: dict | str, expected: str, reward_run, tmp_path: Path, capsys, no_loading
) -> None:
    run, _ = reward_run
    answers = write_jsonl(tmp_path / "answers.jsonl", [AFFIRM[0], row])
    code, _, err = run_cli([str(run), "--answers", str(answers)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{answers}: {expected}" in err


def test_eval_keys_follow_the_model_each_stage_trains(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from hfpipe.stages import get_stage

    answers = write_jsonl(tmp_path / "affirm.jsonl", AFFIRM)
    sft = write_sft_config(tmp_path / "sft", tiny_gpt2_dir, extra=f"eval_answer_files: [{answers}]\n")
    with pytest.raises(ConfigError) as refused:
        get_stage("sft").parse(["--config", str(sft)])
    message = str(refused.value)
    assert "\n" not in message and f"{sft}: eval_answer_files: needs a reward model run" in message
    assert "recipes/sft.py trains a causal LM" in message

    text = tmp_path / "doc.txt"
    text.write_text("yes yes yes", encoding="utf-8")
    (tmp_path / "reward").mkdir()
    reward = write_reward_config(tmp_path / "reward", tiny_gpt2_dir, f"eval_text_files: [{text}]\n")
    with pytest.raises(ConfigError, match="eval_text_files: needs a causal LM, and recipes/reward.py trains a reward"):
        get_stage("reward").parse(["--config", str(reward)])
    reward.write_text(
        reward.read_text().replace("eval_text_files", "eval_answer_files").replace(str(text), str(answers))
    )
    assert get_stage("reward").parse(["--config", str(reward)]) is not None


def test_a_pipeline_eval_stage_refuses_answers(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from hfpipe.tools.pipeline import read_pipeline

    answers = write_jsonl(tmp_path / "affirm.jsonl", AFFIRM)
    sft = write_sft_config(tmp_path / "sft", tiny_gpt2_dir)
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"stages:\n  - {{name: sft, config: {sft}}}\n  - {{name: eval, eval: {{answers: [{answers}]}}}}\n")
    with pytest.raises(ConfigError) as refused:
        read_pipeline(path)
    message = str(refused.value)
    assert "\n" not in message and "stage 'eval': eval: answers: needs a reward model" in message
    assert "the latest generating model ('sft')" in message


def test_rewards_do_not_depend_on_the_batch(reward_run, tmp_path: Path, capsys) -> None:
    run, _ = reward_run
    rows = [
        {"instruction": "Is 1 a word?", "output": "yes"},
        {"prompt": "Is 2 a word? Answer:", "completion": " no no"},
    ]
    answers = write_jsonl(tmp_path / "mixed.jsonl", [*rows, *AFFIRM])
    one, eight = (
        evaluate(run, ["--answers", str(answers), "--batch-size", size], tmp_path, capsys, f"{size}.json")["metrics"]
        for size in ("1", "8")
    )
    assert one == pytest.approx(eight, rel=1e-4) and one["reward_max"] > one["reward_min"]


def test_answer_rows_render_as_the_reward_stage_trains(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from hfpipe.data.chat_templates import CHATML, render_ids
    from hfpipe.data.preference_rows import convert_preference_row
    from hfpipe.evaluation.reward_scoring import answer_row, convert_answer_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    pair = {"instruction": "Is 1 a word?", "input": "Say.", "chosen": "yes", "rejected": "no"}
    for template in (None, CHATML):  # the `### Instruction:` layout, then one user turn and an assistant answer
        tokenizer.chat_template = template
        trained = convert_preference_row(pair, "instruction", bool(template), None)
        expected = render_ids(tokenizer, {"prompt": trained["prompt"], "completion": trained["chosen"]})
        row = answer_row({"instruction": "Is 1 a word?", "input": "Say.", "output": "yes"})
        assert render_ids(tokenizer, convert_answer_row(row, bool(template))) == expected
    messages = answer_row({"prompt": [{"role": "user", "content": "Hi"}], "response": "Hello."})
    assert convert_answer_row(messages, True)["completion"] == [{"role": "assistant", "content": "Hello."}]
