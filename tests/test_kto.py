"""The KTO recipe: unpaired rows and unrolled pairs, reference choices (precompute, copy, adapter), held-out metrics
on rows never trained on, weights that change, and bad input refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_recipe
from datasets import Dataset
from safetensors.torch import load_file
from test_dpo import HELD_OUT, PAIRS, convert, sft_adapter, write_rows  # noqa: F401 (sft_adapter: a fixture)

from hfpipe import cli
from hfpipe.data.chat_templates import apply_chat_template_choice
from hfpipe.data.kto_rows import prepare_unpaired_rows, unroll_pairs
from hfpipe.data.sources import Source
from hfpipe.errors import DataError
from hfpipe.sections import TuningArguments

UNPAIRED = [
    {"instruction": f"King {i}?", "output": f"Lear {i}." if i % 2 else "No.", "label": bool(i % 2)} for i in range(24)
]


@pytest.fixture(scope="module")
def kto_recipe():
    return load_recipe("kto")


def write_kto_config(
    directory: Path, base: Path, rows: list[dict] = PAIRS, extra: str = "", held_out: list[dict] | None = HELD_OUT
) -> Path:
    """A KTO config for the model dir `base` on `rows` (24 pairs by default) and, unless `held_out` is None, 8
    held-out pairs; 2 steps of 4 rows, writing to directory/run."""
    train = write_rows(directory / "train.jsonl", rows)
    validation = f"validation_files: [{write_rows(directory / 'test.jsonl', held_out)}]\n" if held_out else ""
    config = directory / "kto.yaml"
    config.write_text(
        f"""# accelerate launch recipes/kto.py --config {config}
model_name_or_path: {base}
train_files: [{train}]
{validation}output_dir: {directory}/run
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
def kto_config(tmp_path: Path, tiny_gpt2_dir: Path):
    """Factory: `write_kto_config` into tmp_path, for `model` (the tiny GPT-2 by default)."""

    def make(
        rows: list[dict] = PAIRS, extra: str = "", held_out: list[dict] | None = HELD_OUT, model: Path | None = None
    ) -> Path:
        return write_kto_config(tmp_path, model or tiny_gpt2_dir, rows, extra, held_out)

    return make


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model dirs loaded through the policy loader, in order."""
    import hfpipe.train.dpo

    loads: list[str] = []
    original = hfpipe.train.dpo.load_model

    def counting(parsed, name, tokenizer):
        loads.append(name)
        return original(parsed, name, tokenizer)

    monkeypatch.setattr(hfpipe.train.dpo, "load_model", counting)
    return loads


def test_pairs_unroll_into_a_desirable_and_an_undesirable_row_each() -> None:
    pairs = convert(PAIRS[:6])
    rows = unroll_pairs(pairs)
    assert len(rows) == 2 * len(pairs)
    for pair in pairs:
        answers = {row["completion"]: row["label"] for row in rows if row["prompt"] == pair["prompt"]}
        assert answers == {pair["chosen"]: True, pair["rejected"]: False}
    # TRL gives each row its predecessor's answer for the KL term, and batches rows in order.
    assert all(rows[i]["prompt"] != rows[i + 1]["prompt"] for i in range(len(rows) - 1))
    assert [row["label"] for row in rows][:4] == [True, False, True, False]


def test_unpaired_rows_convert_as_sft_rows_with_their_label(tiny_gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    source = Source("rows.jsonl", Dataset.from_list(UNPAIRED[:2]))
    rows, row_format, skipped = prepare_unpaired_rows(source, False, TuningArguments(), tokenizer, 64)
    assert row_format == "instruction+label" and skipped == 0
    assert rows[1] == {"prompt": "### Instruction:\nKing 1?\n\n### Response:\n", "completion": "Lear 1.", "label": True}
    kept = Dataset.from_list([{"prompt": "Q: who?\nA:", "completion": " Lear.", "label": False}])
    assert prepare_unpaired_rows(Source("kept.jsonl", kept), False, TuningArguments(), tokenizer, 64)[0][0] == {
        "prompt": "Q: who?\nA:",
        "completion": " Lear.",
        "label": False,
    }
    user, answer = [{"role": "user", "content": "Who?"}], [{"role": "assistant", "content": "Lear."}]
    messages = Source("chat.jsonl", Dataset.from_list([{"prompt": user, "completion": answer, "label": True}]))
    with pytest.raises(DataError, match="chat.jsonl: message rows need a chat template"):
        prepare_unpaired_rows(messages, False, TuningArguments(), tokenizer, 64)
    apply_chat_template_choice("chatml", tokenizer)
    rows = prepare_unpaired_rows(messages, True, TuningArguments(), tokenizer, 64)[0]
    assert rows[0] == {"prompt": user, "completion": answer, "label": True}


def test_full_fine_tune_on_pairs_precomputes_the_reference_and_changes_weights(
    kto_config, kto_recipe, tiny_gpt2_dir: Path, model_loads: list[str]
) -> None:
    config = kto_config(extra="num_train_epochs: 1\n")
    metrics = kto_recipe.main(["--config", str(config), "--max_steps", "-1"])  # sees every row: precompute
    run = config.parent / "run"
    assert metrics["stage"] == "kto" and metrics["reference"] == "precompute" and len(model_loads) == 1
    assert metrics["global_step"] == 2 * len(PAIRS) // 4
    before, after = load_file(tiny_gpt2_dir / "model.safetensors"), load_file(run / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert metrics["train_rows"] == 2 * len(PAIRS) and metrics["train_desirable_rows"] == len(PAIRS)
    assert metrics["validation_rows"] == 2 * len(HELD_OUT) and metrics["heldout_pairs"] == len(HELD_OUT)
    assert metrics["eval_rewards/margins_at_start"] == 0.0 and metrics["eval_kl_at_start"] == 0.0  # policy == ref
    assert metrics["eval_rewards/margins"] > 0 and "eval_kl" in metrics
    assert 0.0 <= metrics["heldout_policy_preference_before"] <= 1.0
    assert 0.0 <= metrics["heldout_policy_preference_after"] <= 1.0
    assert (run / "rewards.png").stat().st_size > 0 and (run / "loss.png").is_file()
    assert (run / "config.yaml").read_text().startswith("# accelerate launch recipes/kto.py")


def test_short_full_run_uses_a_frozen_copy_and_never_trains_on_held_out_rows(
    kto_config, kto_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    class Recording(kto_recipe.KTOTrainer):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kto_recipe, "KTOTrainer", Recording)
    # No validation file: test_split_size of the pairs is held out, before they are unrolled.
    metrics = kto_recipe.main(["--config", str(kto_config(held_out=None, extra="test_split_size: 0.25\n"))])
    assert metrics["reference"] == "copy"  # 2 steps x 4 rows < 36 rows
    assert seen["ref_model"] is not None and seen["ref_model"] is not seen["model"]
    assert not any(parameter.requires_grad for parameter in seen["ref_model"].parameters())
    train, held_out = seen["train_dataset"], seen["eval_dataset"]
    assert len(train) == 2 * 18 and len(held_out) == 2 * 6
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}
    assert sorted(held_out["label"]) == [False] * 6 + [True] * 6


def test_lora_on_unpaired_rows_uses_the_adapter_disabled_as_reference(
    kto_config, kto_recipe, model_loads: list[str]
) -> None:
    config = kto_config(
        rows=UNPAIRED, held_out=UNPAIRED[:8], extra="use_peft: true\nlora_r: 4\nlora_target_modules: [c_attn]\n"
    )
    metrics = kto_recipe.main(["--config", str(config)])
    assert metrics["reference"] == "adapter" and len(model_loads) == 1
    adapter = load_file(config.parent / "run" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero: it moved
    assert metrics["train_rows"] == len(UNPAIRED) and metrics["train_desirable_rows"] == len(UNPAIRED) // 2
    assert "heldout_policy_preference_after" not in metrics  # unpaired held-out rows: no pairs to compare


def test_sft_adapter_is_continued_against_its_own_copy(
    kto_config, kto_recipe, model_loads: list[str], request: pytest.FixtureRequest
) -> None:
    adapter_dir = request.getfixturevalue("sft_adapter")  # test_dpo's 2-step LoRA SFT run
    config = kto_config(model=adapter_dir)
    metrics = kto_recipe.main(["--config", str(config)])
    assert metrics["reference"] == "sft adapter copy" and len(model_loads) == 1
    sft_weights, kto_weights = (
        load_file(d / "adapter_model.safetensors") for d in (adapter_dir, config.parent / "run")
    )
    assert sft_weights.keys() == kto_weights.keys()
    assert any(not torch.equal(sft_weights[name], kto_weights[name]) for name in sft_weights)


@pytest.mark.parametrize(
    ("rows", "extra", "expected"),
    [
        ([*UNPAIRED[:2], {**UNPAIRED[2], "label": "yes"}], "", "train.jsonl: row 3: 'label' must be true or false"),
        ([*UNPAIRED[:3], {**UNPAIRED[3], "label": 1}], "", "train.jsonl: row 4: 'label' must be true or false, not 1"),
        (
            [UNPAIRED[0], {key: v for key, v in UNPAIRED[1].items() if key != "label"}],
            "",
            "train.jsonl: row 2: 'label' is missing",
        ),
        ([UNPAIRED[0], {**UNPAIRED[1], "output": " "}], "", "train.jsonl: row 2: 'output' is empty"),
        ([{"prompt": "Who?", "completion": "Lear."}], "", "no 'label' column and no 'chosen'/'rejected' pair"),
        ([{**UNPAIRED[0], "output": "Lear " * 80}], "", "row 1: prompt + completion is"),
        ([*PAIRS[:2], {**PAIRS[2], "rejected": ""}], "", "train.jsonl: row 3: 'rejected' is empty"),
        (PAIRS, ["--per_device_train_batch_size", "1"], "KTO estimates its KL term from the other rows of a batch"),
        (PAIRS, "train_sampling_strategy: random\n", "train_sampling_strategy: random: KTO pairs each row"),
        (PAIRS, "use_peft: true\nsync_ref_model: true\n", "sync_ref_model: true updates a frozen reference copy"),
        (PAIRS, "reference: adapter\n", "reference: adapter needs use_peft: true"),
    ],
)
def test_bad_kto_input_is_one_line_before_any_model_loads(
    kto_config, kto_recipe, model_loads: list[str], capsys, rows, extra, expected
) -> None:
    flags = extra if isinstance(extra, list) else []  # a key the config already sets is overridden by a flag
    config = kto_config(rows=rows, extra="" if flags else extra)
    with pytest.raises(SystemExit) as exit_info:
        kto_recipe.main(["--config", str(config), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()  # progress bars may come first: the error is the last line
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: ") and expected in err.splitlines()[-1], (
        err
    )
    assert model_loads == []
    run = config.parent / "run"
    assert not (run / "metrics.json").exists() and not list(run.glob("*.safetensors"))


def test_hfpipe_check_validates_a_kto_config(kto_config, capsys) -> None:
    cli.main(["check", str(kto_config(extra="beta: 0.2\n"))])
    out = capsys.readouterr().out
    assert "valid for recipes/kto.py" in out and "beta: 0.2" in out and "learning_rate: 0.01" in out
