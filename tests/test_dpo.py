"""The DPO recipe: preference formats, reference choices (adapter, precompute, copy, SFT adapter), held-out
metrics on unseen rows, weights that change, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_recipe
from datasets import Dataset
from safetensors.torch import load_file

from hfpipe.data.preference_rows import prepare_preference_rows
from hfpipe.data.sources import Source
from hfpipe.sections import TuningArguments

PAIRS = [{"instruction": f"King {i}?", "chosen": f"Lear {i}.", "rejected": "No."} for i in range(24)]
HELD_OUT = [{"instruction": f"Queen {i}?", "chosen": f"Hermione {i}.", "rejected": "None."} for i in range(8)]


@pytest.fixture(scope="module")
def dpo_recipe():
    return load_recipe("dpo")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_dpo_config(directory: Path, base: Path, rows: list[dict] = PAIRS, extra: str = "") -> Path:
    """A DPO config for the model dir `base` on `rows` and 8 held-out pairs, 2 steps, writing to directory/run."""
    train = write_rows(directory / "train.jsonl", rows)
    held_out = write_rows(directory / "test.jsonl", HELD_OUT)
    config = directory / "dpo.yaml"
    config.write_text(
        f"""# accelerate launch recipes/dpo.py --config {config}
model_name_or_path: {base}
train_files: [{train}]
validation_files: [{held_out}]
output_dir: {directory}/run
max_length: 64
per_device_train_batch_size: 4
per_device_eval_batch_size: 4
max_steps: 2
eval_steps: 2
logging_steps: 1
learning_rate: 1.0e-2
sample_max_new_tokens: 4
{extra}"""
    )
    return config


@pytest.fixture
def dpo_config(tmp_path: Path, tiny_gpt2_dir: Path):
    """Factory: a DPO config for the tiny GPT-2 on 24 training pairs and 8 held-out pairs, 2 steps."""

    def make(rows: list[dict] = PAIRS, extra: str = "", model: Path | None = None) -> Path:
        return write_dpo_config(tmp_path, model or tiny_gpt2_dir, rows, extra)

    return make


def convert(rows: list[dict], chat: bool = False) -> Dataset:
    converted, _, _ = prepare_preference_rows(Source("rows.jsonl", Dataset.from_list(rows)), chat, TuningArguments())
    return converted


def test_formats_convert_as_documented() -> None:
    layout = convert([{"instruction": "Who?", "input": "A play.", "chosen": "Lear.", "rejected": "Nobody."}])[0]
    assert layout == {
        "prompt": "### Instruction:\nWho?\n\n### Input:\nA play.\n\n### Response:\n",
        "chosen": "Lear.",
        "rejected": "Nobody.",
    }
    chat = convert([{"instruction": "Who?", "chosen": "Lear.", "rejected": "Nobody."}], chat=True)[0]
    assert chat["prompt"] == [{"role": "user", "content": "Who?"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "Lear."}]
    kept = convert([{"prompt": "Q: who?\nA:", "chosen": " Lear.", "rejected": " Nobody."}])[0]
    assert kept == {"prompt": "Q: who?\nA:", "chosen": " Lear.", "rejected": " Nobody."}
    user = {"role": "user", "content": "Who?"}
    implicit = convert(
        [
            {
                "chosen": [user, {"role": "assistant", "content": "Lear."}],
                "rejected": [user, {"role": "assistant", "content": "Nobody."}],
            }
        ],
        chat=True,
    )[0]
    assert implicit["prompt"] == [user] and implicit["chosen"] == [{"role": "assistant", "content": "Lear."}]


def test_full_fine_tune_precomputes_the_reference_and_changes_weights(dpo_config, dpo_recipe, tiny_gpt2_dir) -> None:
    config = dpo_config(extra="num_train_epochs: 1\n")
    metrics = dpo_recipe.main(["--config", str(config), "--max_steps", "-1"])  # sees every row: precompute
    run = config.parent / "run"
    assert metrics["reference"] == "precompute"
    before, after = load_file(tiny_gpt2_dir / "model.safetensors"), load_file(run / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert metrics["eval_rewards/accuracies_at_start"] == 0.0  # policy == reference: every reward is 0
    assert metrics["eval_rewards/accuracies"] > 0.5 and metrics["eval_rewards/margins"] > 0
    assert 0.0 <= metrics["heldout_policy_preference_before"] <= 1.0
    assert metrics["heldout_policy_preference_after"] >= metrics["heldout_policy_preference_before"]
    assert metrics["validation_rows"] == len(HELD_OUT) and metrics["train_rows"] == len(PAIRS)
    assert (run / "rewards.png").stat().st_size > 0 and (run / "loss.png").is_file()
    assert (run / "config.yaml").read_text().startswith("# accelerate launch recipes/dpo.py")


def test_short_full_run_uses_a_frozen_copy(dpo_config, dpo_recipe, monkeypatch) -> None:
    seen = {}

    class Recording(dpo_recipe.DPOTrainer):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dpo_recipe, "DPOTrainer", Recording)
    metrics = dpo_recipe.main(["--config", str(dpo_config())])  # 2 steps x 4 rows < 24 rows
    assert metrics["reference"] == "copy"
    assert seen["ref_model"] is not None and seen["ref_model"] is not seen["model"]
    assert not any(parameter.requires_grad for parameter in seen["ref_model"].parameters())
    train_prompts = {row["prompt"] for row in seen["train_dataset"]}
    assert not train_prompts & {row["prompt"] for row in seen["eval_dataset"]}  # held out: never trained on


def count_model_loads(monkeypatch) -> list[str]:
    import hfpipe.train.dpo

    loads: list[str] = []
    original = hfpipe.train.dpo.load_model

    def counting(parsed, name, tokenizer):
        loads.append(name)
        return original(parsed, name, tokenizer)

    monkeypatch.setattr(hfpipe.train.dpo, "load_model", counting)
    return loads


def test_lora_reference_is_the_adapter_disabled_in_one_model(dpo_config, dpo_recipe, monkeypatch) -> None:
    loads = count_model_loads(monkeypatch)
    config = dpo_config(extra="use_peft: true\nlora_r: 4\nlora_target_modules: [c_attn]\nmerge_adapter: true\n")
    metrics = dpo_recipe.main(["--config", str(config)])
    assert metrics["reference"] == "adapter" and len(loads) == 1
    run = config.parent / "run"
    assert all("lora_" in name for name in load_file(run / "adapter_model.safetensors"))
    assert (run / "merged" / "model.safetensors").is_file()


@pytest.fixture
def sft_adapter(tmp_path: Path, tiny_gpt2_dir: Path) -> Path:
    """A LoRA SFT run of 2 steps on the tiny GPT-2: an adapter dir."""
    rows = tmp_path / "sft.jsonl"
    write_rows(rows, [{"instruction": p["instruction"], "output": p["chosen"]} for p in PAIRS])
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"""# accelerate launch recipes/sft.py --config {config}
model_name_or_path: {tiny_gpt2_dir}
train_files: [{rows}]
output_dir: {tmp_path}/sft
max_length: 64
max_steps: 2
eval_steps: 2
use_peft: true
lora_r: 4
lora_target_modules: [c_attn]
sample_max_new_tokens: 4
"""
    )
    load_recipe("sft").main(["--config", str(config)])
    return tmp_path / "sft"


def test_sft_adapter_is_continued_against_its_own_copy(dpo_config, dpo_recipe, sft_adapter, monkeypatch) -> None:
    loads = count_model_loads(monkeypatch)
    config = dpo_config(model=sft_adapter)
    metrics = dpo_recipe.main(["--config", str(config)])
    assert metrics["reference"] == "sft adapter copy" and len(loads) == 1
    run = config.parent / "run"
    sft_weights, dpo_weights = (load_file(d / "adapter_model.safetensors") for d in (sft_adapter, run))
    assert sft_weights.keys() == dpo_weights.keys()
    assert any(not torch.equal(sft_weights[name], dpo_weights[name]) for name in sft_weights)
    base = json.loads((sft_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == base


def test_sft_adapter_merged_then_a_new_adapter(dpo_config, dpo_recipe, sft_adapter) -> None:
    from hfpipe.models.trained import load_for_inference

    config = dpo_config(model=sft_adapter, extra="sft_adapter: merge\nuse_peft: true\nlora_r: 4\n")
    metrics = dpo_recipe.main(["--config", str(config)])
    run = config.parent / "run"
    assert metrics["reference"] == "adapter"
    base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == run / "sft-merged" and (run / "sft-merged" / "model.safetensors").is_file()
    assert load_for_inference(str(run)).base == base  # loads onto the merged SFT model, not the original base


@pytest.mark.parametrize(
    ("rows", "extra", "expected"),
    [
        ([{"instruction": "Who?", "chosen": "Lear."}], "", "no 'rejected' column"),
        ([*PAIRS[:2], {**PAIRS[2], "rejected": ""}], "", "train.jsonl: row 3: 'rejected' is empty"),
        (
            [*PAIRS[:4], {**PAIRS[4], "rejected": PAIRS[4]["chosen"]}],
            "",
            "row 5: 'chosen' and 'rejected' are identical",
        ),
        ([{**PAIRS[0], "instruction": " "}], "", "row 1: 'instruction' is empty"),
        ([*PAIRS[:1], {**PAIRS[1], "chosen": "Lear " * 80}], "", "row 2: prompt + answer is"),
        (PAIRS, "reference: adapter\n", "reference: adapter needs use_peft: true"),
        (PAIRS, "reference: copi\n", "Did you mean 'copy'?"),
        (PAIRS, "beta: high\n", "beta"),
    ],
)
def test_bad_dpo_input_is_one_clear_line(dpo_config, dpo_recipe, capsys, rows, extra, expected) -> None:
    config = dpo_config(rows=rows, extra=extra)
    with pytest.raises(SystemExit) as exit_info:
        dpo_recipe.main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and expected in err.splitlines()[-1], err
    assert err.splitlines()[-1].startswith("error: ")
    assert not (config.parent / "run" / "metrics.json").exists()


def test_continuing_an_adapter_with_use_peft_is_refused(dpo_config, dpo_recipe, sft_adapter, capsys) -> None:
    config = dpo_config(model=sft_adapter, extra="use_peft: true\n")
    with pytest.raises(SystemExit):
        dpo_recipe.main(["--config", str(config)])
    assert "set sft_adapter: merge" in capsys.readouterr().err
