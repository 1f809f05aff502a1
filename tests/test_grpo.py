"""The GRPO recipe: rewards from YAML (built-ins, a reward model, the user's function), the advantage TRL computes
from them, held-out prompts scored before and after and never trained on; full and LoRA; refusals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import load_recipe
from safetensors.torch import load_file
from test_dpo import write_rows

from hfpipe.errors import ConfigError
from hfpipe.train.rewards import build_reward_funcs, read_reward_entries

PROBLEMS = [{"instruction": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
TRAIN, HELD_OUT = PROBLEMS[:28], PROBLEMS[28:]
REWARDS = "rewards:\n  - {numeric: answer}\n  - {regex: '\\d+', name: format, weight: 0.5}\n  - {eos: true}\n"


@pytest.fixture(scope="module")
def grpo_main():
    return load_recipe("grpo").main


def write_grpo_config(directory: Path, base: Path, extra: str = REWARDS, steps: int = 2) -> Path:
    """A GRPO config for the model dir `base` on small additions and 8 held-out ones, writing to directory/run."""
    train = write_rows(directory / "train.jsonl", TRAIN)
    held_out = write_rows(directory / "test.jsonl", HELD_OUT)
    config = directory / "grpo.yaml"
    config.write_text(
        f"""# accelerate launch recipes/grpo.py --config {config}
model_name_or_path: {base}
train_files: [{train}]
validation_files: [{held_out}]
output_dir: {directory}/run
num_generations: 4
per_device_train_batch_size: 8
max_completion_length: 8
max_steps: {steps}
save_steps: {steps}
logging_steps: 1
learning_rate: 1.0e-3
{extra}"""
    )
    return config


def user_rewards(directory: Path, body: str) -> str:
    """Write a module of reward functions into `directory` (on the import path) and return its name."""
    name = f"user_rewards_{abs(hash(str(directory))) % 10**8}"
    (directory / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_grpo_trains_and_scores_held_out_prompts_before_and_after(
    tmp_path: Path, tiny_gpt2_dir: Path, grpo_main, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the user's reward module lives in the working directory
    module = user_rewards(
        tmp_path,
        f"""
        import json

        def seen(prompts, completions, trainer_state=None, **_):
            if trainer_state is not None:  # called by the trainer, not by the held-out scoring
                with open({str(tmp_path / "seen.jsonl")!r}, "a") as handle:
                    handle.write(json.dumps(prompts) + "\\n")
            return [0.0] * len(prompts)
        """,
    )
    config = write_grpo_config(tmp_path, tiny_gpt2_dir, REWARDS + f"  - {{function: '{module}:seen'}}\n")
    metrics = grpo_main(["--config", str(config)])
    run = tmp_path / "run"
    assert metrics["stage"] == "grpo" and metrics["global_step"] == 2
    for key in ("reward", "reward/numeric", "reward/format", "reward/eos", "reward/seen", "accuracy"):
        assert f"heldout_{key}_before" in metrics and f"heldout_{key}_after" in metrics
    assert metrics["heldout_prompts"] == len(HELD_OUT)
    before, after = load_file(tiny_gpt2_dir / "model.safetensors"), load_file(run / "model.safetensors")
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert (run / "rewards.png").is_file()
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {sample["step"] for sample in samples} == {0, 2} and len(samples) == 2 * len(HELD_OUT)
    # The trainer saw training prompts only: never a held-out one.
    trained_on = {prompt for line in (tmp_path / "seen.jsonl").read_text().splitlines() for prompt in json.loads(line)}
    held_out = {row["instruction"] for row in HELD_OUT}
    assert trained_on and not any(question in prompt for question in held_out for prompt in trained_on)
    log = [
        entry
        for entry in json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        if "reward" in entry
    ]
    assert log and all(f"rewards/{name}/mean" in log[0] for name in ("numeric", "format", "eos", "seen"))
    assert "completions/mean_length" in log[0] and "completions/clipped_ratio" in log[0]


def test_a_lora_grpo_run_saves_an_adapter(tmp_path: Path, tiny_gpt2_dir: Path, grpo_main) -> None:
    lora = REWARDS + "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [c_attn]\n"
    grpo_main(["--config", str(write_grpo_config(tmp_path, tiny_gpt2_dir, lora))])
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)


def test_the_advantage_is_each_rewards_weighted_sum_against_its_prompt_group(tmp_path: Path, tiny_gpt2_dir: Path):
    """TRL's advantage from hfpipe's rewards: (r - mean of the prompt's group) / (std of the group + 1e-4), with r
    the weighted sum of a deterministic length reward and the ends-with-EOS reward."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    entries = read_reward_entries([{"length": 4, "weight": 2.0}, {"eos": True, "weight": 0.5}], "test")
    funcs = build_reward_funcs(entries, [tokenizer.eos_token_id], load_scorer=None)
    args = GRPOConfig(
        output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_completion_length=8,
        reward_weights=[entry.weight for entry in entries], report_to="none", use_cpu=True, bf16=False,
        temperature=1.0,
    )  # fmt: skip
    rows = Dataset.from_list([{"prompt": "the cat"}, {"prompt": "a dog"}])
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=rows, processing_class=tokenizer)
    torch.manual_seed(0)
    batch = [rows[0]] * 4 + [rows[1]] * 4
    output = trainer._generate_and_score_completions(batch)
    lengths = output["completion_mask"].sum(dim=1).tolist()
    ids = [row[: int(n)].tolist() for row, n in zip(output["completion_ids"], lengths, strict=True)]
    eos = [float(row[-1] == tokenizer.eos_token_id) for row in ids]
    tokens = [len(row) - flag for row, flag in zip(ids, eos, strict=True)]
    rewards = torch.tensor([2.0 * max(0.0, 1 - abs(n - 4) / 4) + 0.5 * e for n, e in zip(tokens, eos, strict=True)])
    groups = rewards.view(2, 4)
    expected = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(output["advantages"], expected.flatten(), atol=1e-4)


@pytest.mark.parametrize(
    ("completion", "answer", "scores"),
    [
        ("42", "42", {"numeric": 1.0, "exact": 1.0, "format": 1.0}),
        (" 42\n", "42", {"numeric": 1.0, "exact": 1.0, "format": 1.0}),
        ("It is 40, no: 42", "42", {"numeric": 1.0, "exact": 0.0, "format": 0.0}),
        ("42 or 41", "42", {"numeric": 0.0, "exact": 0.0, "format": 0.0}),
        ("1,234", "1234", {"numeric": 1.0, "exact": 0.0, "format": 0.0}),
        ("", "0", {"numeric": 0.0, "exact": 0.0, "format": 0.0}),
    ],
)
def test_the_built_in_rewards_score_a_completion(completion: str, answer: str, scores: dict[str, float]) -> None:
    entries = read_reward_entries(
        [{"numeric": "answer"}, {"exact": "answer"}, {"regex": r"\d+", "name": "format"}], "t"
    )
    funcs = build_reward_funcs(entries, [0], load_scorer=None)
    for func in funcs:
        for shaped in (completion, [{"role": "assistant", "content": completion}]):
            got = func(prompts=["p"], completions=[shaped], completion_ids=[[5]], answer=[answer])
            assert got == [scores[func.__name__]], (func.__name__, completion)


def test_the_length_and_eos_rewards_read_the_completion_tokens() -> None:
    length, eos = build_reward_funcs(read_reward_entries([{"length": 4}, {"eos": True}], "t"), [0], None)
    ids = [[7, 7, 7, 7, 0], [7, 7], [7] * 8, [7] * 12]
    assert length(prompts=[""] * 4, completions=[""] * 4, completion_ids=ids) == [1.0, 0.5, 0.0, 0.0]
    assert eos(prompts=[""] * 4, completions=[""] * 4, completion_ids=ids) == [1.0, 0.0, 0.0, 0.0]
    tolerant = build_reward_funcs(read_reward_entries([{"numeric": "a", "tolerance": 0.01}], "t"), [0], None)[0]
    assert tolerant(prompts=["", ""], completions=["3.14", "3.2"], completion_ids=[[], []], a=["3.141", "3.141"]) == [
        1.0,
        0.0,
    ]


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        ("rewards: []", "GRPO needs at least one reward"),
        ("rewards:\n  - {exakt: answer}", "rewards entry 1: unknown key 'exakt'. Did you mean 'exact'?"),
        ("rewards:\n  - {exact: answer, regex: x}", "needs exactly one kind key"),
        ("rewards:\n  - {regex: '(unclosed'}", "rewards entry 1: regex: '(unclosed' is not a valid pattern"),
        ("rewards:\n  - {exact: answer, weight: heavy}", "rewards entry 1: weight: 'heavy' is not a number"),
        ("rewards:\n  - {length: 0}", "length: expected a target number of completion tokens"),
        ("rewards:\n  - {eos: false}", "eos: expected true"),
        ("rewards:\n  - {exact: answer, tolerance: 1}", "tolerance applies to numeric entries only"),
        ("rewards:\n  - {model: no/such/dir}", "model: 'no/such/dir' is not a directory"),
        ("rewards:\n  - {function: nosuchmodule_xyz:f}", "module 'nosuchmodule_xyz' cannot be imported"),
        ("rewards:\n  - {function: 'not a spec'}", "expected 'module:function'"),
        ("rewards:\n  - {exact: answer}\n  - {numeric: answer, name: exact}", "the name 'exact' is used twice"),
        (REWARDS + "use_vllm: true", "use_vllm: true generates with vLLM on a GPU"),
    ],
)
def test_bad_reward_entries_are_one_line_before_anything_loads(
    tmp_path: Path, tiny_gpt2_dir: Path, grpo_main, capsys, rewards: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        grpo_main(["--config", str(write_grpo_config(tmp_path, tiny_gpt2_dir, rewards))])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and str(tmp_path / "grpo.yaml") in error[0]
    assert not (tmp_path / "run").exists()


def test_answers_that_cannot_be_grouped_by_prompt_are_refused(
    tmp_path: Path, tiny_gpt2_dir: Path, grpo_main, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        grpo_main(["--config", str(write_grpo_config(tmp_path, tiny_gpt2_dir)), "--num_generations", "3"])
    assert exit_info.value.code == 2
    assert "must be a multiple of num_generations (3)" in capsys.readouterr().err


def test_a_missing_function_name_suggests_the_one_the_module_has(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = user_rewards(tmp_path, "def brevity(completions, **_):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match="has no function 'brevty'. Did you mean 'brevity'?"):
        read_reward_entries([{"function": f"{module}:brevty"}], "t")


@pytest.mark.parametrize(
    ("rows_extra", "rewards", "message"),
    [
        ("drop_answer", "rewards:\n  - {exact: answer}", "rewards entry 1 (exact: answer) reads column 'answer'"),
        ("empty_answer", "rewards:\n  - {exact: answer}", "row 3: 'answer' is empty (a reward reads it)"),
        ("ok", "rewards:\n  - {function: MODULE:broken}", "rewards entry 1 (function: MODULE:broken) raised KeyError"),
        ("ok", "rewards:\n  - {function: MODULE:short}", "returned 1 values; expected one number"),
    ],
)
def test_bad_data_or_a_failing_function_is_one_line_and_nothing_is_written(
    tmp_path: Path, tiny_gpt2_dir: Path, grpo_main, capsys, monkeypatch, rows_extra: str, rewards: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    module = user_rewards(
        tmp_path,
        """
        def broken(completions, **columns):
            return [float(columns["solution"][0])] * len(completions)

        def short(completions, **_):
            return [1.0]
        """,
    )
    config = write_grpo_config(tmp_path, tiny_gpt2_dir, rewards.replace("MODULE", module))
    rows = [dict(row) for row in TRAIN]
    if rows_extra == "drop_answer":
        rows = [{"instruction": row["instruction"]} for row in rows]
    elif rows_extra == "empty_answer":
        rows[2]["answer"] = " "
    write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        grpo_main(["--config", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # after the data loading progress bars
    assert message.replace("MODULE", module) in last and last.startswith("error: ") and "Traceback" not in error
    assert not (tmp_path / "run").exists()
