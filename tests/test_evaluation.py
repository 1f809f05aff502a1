"""`hfpipe eval` and the evaluation API: perplexity, multiple choice, preferences, lm-eval hook, results files."""

from __future__ import annotations

import json
import math
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hfpipe.cli import main
from hfpipe.errors import ConfigError, DataError
from hfpipe.evaluation.evaluate import EvalArguments, check_eval_args, run_evaluations
from hfpipe.evaluation.scoring import ChoiceRow, PreferenceRow, choice_logprobs, preference_logprobs, render_preference
from hfpipe.models.trained import LoadedModel, load_for_inference

PROSE = "The king doth speak of love and death, and the queen shall hear. "


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_for_inference(str(tiny_gpt2_dir), device="cpu")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), "utf-8")
    return path


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def logprob_of(model, context: list[int], continuation: list[int]) -> float:
    """Summed log-prob of `continuation` after `context`, from the model's own loss (independent of scoring.py)."""
    ids = torch.tensor([context + continuation])
    labels = ids.clone()
    labels[0, : len(context)] = -100
    with torch.no_grad():
        return -model(ids, labels=labels).loss.item() * len(continuation)


def guide_loss(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Mean NLL by the transformers perplexity guide's loop (counting exactly the labels the shift keeps)."""
    nll_sum, tokens, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        scored = (labels[:, 1:] != -100).sum().item()
        with torch.no_grad():
            nll_sum += model(window, labels=labels).loss.item() * scored
        tokens += scored
        previous_end = end
        if end == len(ids):
            break
    return nll_sum / tokens, tokens


def test_perplexity_of_one_window_is_exp_of_the_models_loss(loaded: LoadedModel, tmp_path: Path) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = ids_of(tokenizer, PROSE) + [tokenizer.eos_token_id]
    assert len(ids) <= 64  # one window of the fixture's context
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": PROSE}])
    metrics = run_evaluations(model, tokenizer, EvalArguments(eval_text_files=[str(path)]))
    with torch.no_grad():
        expected = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert metrics["text_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["text_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert metrics["text_tokens"] == len(ids) - 1


@pytest.mark.parametrize("stride", [None, 10])
def test_perplexity_windows_follow_the_transformers_guide(
    stride: int | None, loaded: LoadedModel, corpus: Path, tmp_path: Path
) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = [(corpus / "validation" / "doc.txt").read_text()[:600], PROSE]
    for index, text in enumerate(texts):
        (tmp_path / f"doc{index}.txt").write_text(text, encoding="utf-8")
    stream = [token for text in texts for token in ids_of(tokenizer, text) + [tokenizer.eos_token_id]]
    args = EvalArguments(eval_text_files=[str(tmp_path / "*.txt")], eval_max_length=32, eval_stride=stride)
    metrics = run_evaluations(model, tokenizer, args)
    expected, tokens = guide_loss(model, stream, 32, stride or 32)
    assert metrics["text_loss"] == pytest.approx(expected, rel=1e-5)
    # Non-overlapping windows leave each window's first token unscored; a sliding window scores all but the first.
    assert (
        metrics["text_tokens"] == tokens == (len(stream) - 1 if stride else len(stream) - math.ceil(len(stream) / 32))
    )


def test_multiple_choice_picks_the_likeliest_ending_and_acc_norm_divides_by_characters(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    context, endings = "The king", ["no", "sweet sweet"]  # 1 token vs 2 tokens of 11 characters
    lls = [logprob_of(model, ids_of(tokenizer, context), ids_of(tokenizer, " " + e)) for e in endings]
    by_sum = max(range(2), key=lambda i: lls[i])
    by_char = max(range(2), key=lambda i: lls[i] / len(endings[i]))
    assert by_sum != by_char, "the constructed case must flip under length normalisation"

    scored, cut = choice_logprobs(model, tokenizer, [ChoiceRow(context, endings, 0)], batch_size=2, max_length=64)
    assert scored[0] == pytest.approx(lls, rel=1e-4) and cut == 0
    path = write_jsonl(tmp_path / "mc.jsonl", [{"context": context, "endings": endings, "label": by_char}])
    metrics = run_evaluations(model, tokenizer, EvalArguments(eval_choice_files=[str(path)]))
    assert (metrics["mc_acc"], metrics["mc_acc_norm"], metrics["mc_rows"]) == (0.0, 1.0, 1)


def test_an_ending_on_a_new_line_gets_no_extra_space(loaded: LoadedModel) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = [ChoiceRow("KING.\nThe night", ["\nsweet", "sweet"], 0)]
    scored, _ = choice_logprobs(model, tokenizer, rows, 2, 64)
    context = ids_of(tokenizer, "KING.\nThe night")
    expected = [logprob_of(model, context, ids_of(tokenizer, text)) for text in ("\nsweet", " sweet")]
    assert scored[0] == pytest.approx(expected, rel=1e-4)


def test_long_pairs_are_cut_on_the_left_as_lm_eval_does(loaded: LoadedModel) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    context = PROSE.strip()
    ending = ids_of(tokenizer, " sweet")
    kept = (ids_of(tokenizer, context) + ending)[-8:]
    scored, cut = choice_logprobs(model, tokenizer, [ChoiceRow(context, ["sweet", "no"], 0)], 2, max_length=8)
    assert cut == 2
    assert scored[0][0] == pytest.approx(logprob_of(model, kept[: -len(ending)], ending), rel=1e-4)


def test_hellaswag_field_names_and_string_labels(loaded: LoadedModel, tmp_path: Path) -> None:
    endings = ["speak of love", "hear the night", "go to the day", "think of death"]
    lls = [
        logprob_of(loaded.model, ids_of(loaded.tokenizer, "The lady"), ids_of(loaded.tokenizer, " " + e))
        for e in endings
    ]
    best = max(range(4), key=lambda i: lls[i])
    rows = [
        {"ctx": "The lady", "endings": endings, "label": str(best)},
        {"ctx": "The lady", "endings": endings, "label": str((best + 1) % 4)},
    ]
    path = write_jsonl(tmp_path / "hellaswag.jsonl", rows)
    metrics = run_evaluations(
        loaded.model, loaded.tokenizer, EvalArguments(eval_choice_files=[str(path)], eval_tasks_batch_size=3)
    )
    assert metrics["mc_acc"] == 0.5


def test_preference_accuracy_prefers_a_memorised_answer(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    fresh = load_for_inference(str(tiny_gpt2_dir), device="cpu")  # its own copy: this test trains it
    model, tokenizer = fresh.model, fresh.tokenizer
    prompt, answer, others = "Who?", "Shakespeare.", ["A dog.", "Marlowe."]
    layout = f"### Instruction:\n{prompt}\n\n### Response:\n{answer}"
    ids = torch.tensor([ids_of(tokenizer, layout) + [tokenizer.eos_token_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    right = [{"instruction": prompt, "chosen": answer, "rejected": o} for o in others]
    wrong = [{"instruction": prompt, "chosen": o, "rejected": answer} for o in others]
    right, wrong = write_jsonl(tmp_path / "right.jsonl", right), write_jsonl(tmp_path / "wrong.jsonl", wrong)
    for path, expected in ((right, 1.0), (wrong, 0.0)):
        metrics = run_evaluations(model, tokenizer, EvalArguments(eval_preference_files=[str(path)]))
        assert (metrics["pref_accuracy"], metrics["pref_accuracy_per_token"], metrics["pref_rows"]) == (
            expected,
            expected,
            2,
        )

    row = PreferenceRow({"instruction": prompt, "chosen": answer, "rejected": others[0]}, "instruction")
    scores, cut = preference_logprobs(model, tokenizer, [row], 2, 64)
    assert cut == 0
    prompt_ids = ids_of(tokenizer, f"### Instruction:\n{prompt}\n\n### Response:\n")
    chosen = logprob_of(model, prompt_ids, ids_of(tokenizer, answer) + [tokenizer.eos_token_id])
    rejected = logprob_of(model, prompt_ids, ids_of(tokenizer, others[0]) + [tokenizer.eos_token_id])
    assert scores[0][0][0] == pytest.approx(chosen, rel=1e-4)
    assert scores[0][1][0] == pytest.approx(rejected, rel=1e-4)


def test_preference_rows_render_as_dpo_trains_on_them(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from hfpipe.data.chat_templates import CHATML

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    raw = PreferenceRow({"prompt": "Q: who?\nA:", "chosen": " Him.", "rejected": " Her."}, "prompt")
    (prompt_ids, chosen_ids), _ = render_preference(tokenizer, raw)  # a prompt string is used as written
    assert prompt_ids + chosen_ids == ids_of(tokenizer, "Q: who?\nA: Him.") + [tokenizer.eos_token_id]
    tokenizer.chat_template = CHATML
    row = PreferenceRow({"instruction": "Who?", "chosen": "Him.", "rejected": "Her."}, "instruction")
    (prompt_ids, response_ids), _ = render_preference(tokenizer, row)  # an instruction is one user turn
    user = [{"role": "user", "content": "Who?"}]
    whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "Him."}])
    assert prompt_ids == list(tokenizer.apply_chat_template(user, add_generation_prompt=True)["input_ids"])
    assert prompt_ids + response_ids == list(whole["input_ids"])


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(["eval", *argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_model(source: Path, destination: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, destination))


def test_adapter_dir_evaluates_as_the_merged_model(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True
    )
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    for name in ("adapter", "merged"):
        tokenizer.save_pretrained(tmp_path / name)
    text = tmp_path / "doc.txt"
    text.write_text(PROSE * 2, encoding="utf-8")
    choices = write_jsonl(tmp_path / "mc.jsonl", [{"context": "The king", "endings": ["speaks", "hears"], "label": 0}])
    results = {}
    for name in ("adapter", "merged", "base"):
        model = tiny_gpt2_dir if name == "base" else tmp_path / name
        output = tmp_path / f"{name}.json"
        code, out, err = run_cli(
            [str(model), "--text", str(text), "--choices", str(choices), "--output", str(output)], capsys
        )
        assert code == 0, err
        results[name] = json.loads(output.read_text())
    assert results["adapter"]["base"] == str(tiny_gpt2_dir)
    assert results["adapter"]["metrics"] == pytest.approx(results["merged"]["metrics"], rel=1e-5)
    assert results["adapter"]["metrics"]["text_loss"] != pytest.approx(
        results["base"]["metrics"]["text_loss"], rel=1e-3
    )


def test_results_file_is_written_and_never_overwritten(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    model = copy_model(tiny_gpt2_dir, tmp_path / "model")
    text = tmp_path / "doc.txt"
    text.write_text(PROSE, encoding="utf-8")
    for _ in range(2):
        code, out, err = run_cli([str(model), "--text", str(text)], capsys)
        assert code == 0, err
        assert "text" in out and "perplexity" in out
    written = sorted(model.glob("eval_results-*.json"))
    assert len(written) == 2
    first = [json.loads(path.read_text()) for path in written]
    assert all(result["metrics"]["text_tokens"] > 0 and result["model"] == str(model) for result in first)

    code, out, err = run_cli([str(model), "--text", str(text), "--output", str(written[0])], capsys)
    assert code == 2 and "already exists" in err and "never overwritten" in err
    assert json.loads(written[0].read_text()) == first[0]


ROWS = {"context": "The king", "endings": ["speaks", "hears"], "label": 0}


@pytest.mark.parametrize(
    ("flag", "lines", "expected"),
    [
        ("--text", None, "--text: no file matches"),
        ("--choices", [ROWS, "{bad json"], "mc.jsonl: line 2 is not valid JSON"),
        ("--choices", [{**ROWS, "label": 2}], "mc.jsonl: line 1: 'label' 2 is out of range for 2 endings (0 to 1)"),
        ("--choices", [ROWS, {**ROWS, "endings": ["one"]}], "mc.jsonl: line 2: 'endings' must be a list of at least 2"),
        ("--choices", [{"endings": ["a", "b"], "label": 0}], "mc.jsonl: line 1: 'context' (or 'ctx') is missing"),
        ("--choices", [{**ROWS, "label": "first"}], "line 1: 'label' must be the index of the right ending"),
        ("--choices", [], "mc.jsonl: the file has no rows"),
        ("--preferences", [{"prompt": "Hi", "chosen": "Yes.", "rejected": "Yes."}], "mc.jsonl: line 1: 'chosen' and "),
        ("--preferences", [{"prompt": "Hi", "chosen": "Yes."}], "mc.jsonl: line 1: 'rejected' is missing"),
        (
            "--preferences",
            [{"prompt": [{"role": "boss", "content": "Hi"}], "chosen": "a", "rejected": "b"}],
            "message 1",
        ),
        ("--lm-eval", None, "the lm-eval package (EleutherAI's LM Evaluation Harness) is not installed"),
        ("--stride", None, "--stride: 0 must be between 1 and the window length"),
        (None, None, "nothing to evaluate"),
    ],
)
def test_bad_input_is_one_clear_line_before_the_model_loads(
    flag: str | None, lines: list | None, expected: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hfpipe.models.trained.load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["some/model"]
    if lines is not None:
        argv += [flag, str(write_jsonl(tmp_path / "mc.jsonl", lines))]
    elif flag == "--text":
        argv += [flag, str(tmp_path / "nowhere" / "*.txt")]
    elif flag == "--lm-eval":
        argv += [flag, "hellaswag,arc_easy"]
    elif flag == "--stride":
        argv += ["--text", str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])), "--stride", "0"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    if flag == "--lm-eval":
        assert "pip install lm-eval" in err


def test_lm_eval_not_installed_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configs/x.yaml: eval_lm_tasks: the lm-eval package .* not installed"):
        check_eval_args(EvalArguments(eval_lm_tasks=["hellaswag"]), "configs/x.yaml")


def test_wrong_file_type_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "mc.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="eval_choice_files: .*mc.txt: expected a .jsonl file"):
        check_eval_args(EvalArguments(eval_choice_files=[str(path)]), "configs/x.yaml")


def test_message_lists_need_a_chat_template(loaded: LoadedModel, tmp_path: Path) -> None:
    answers = {name: [{"role": "assistant", "content": name}] for name in ("chosen", "rejected")}
    row = {"prompt": [{"role": "user", "content": "Hi"}], **answers}
    path = write_jsonl(tmp_path / "pref.jsonl", [row])
    with pytest.raises(DataError, match="pref.jsonl: line 1: message lists need a chat template"):
        run_evaluations(loaded.model, loaded.tokenizer, EvalArguments(eval_preference_files=[str(path)]))


@pytest.fixture
def fake_lm_eval(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A stand-in for the lm_eval package with the three names hfpipe uses; `calls` records what it was given."""
    calls: dict = {"outcome": None}

    class TaskManager:
        all_tasks = ["hellaswag", "arc_easy"]

    class HFLM:
        def __init__(self, **kwargs) -> None:
            calls["hflm"] = kwargs

    def simple_evaluate(model, tasks, **kwargs):
        calls["tasks"] = tasks
        if isinstance(calls["outcome"], Exception):
            raise calls["outcome"]
        return calls["outcome"]

    modules = {
        name: ModuleType(name) for name in ("lm_eval", "lm_eval.tasks", "lm_eval.models", "lm_eval.models.huggingface")
    }
    modules["lm_eval"].__spec__ = ModuleSpec("lm_eval", None)
    modules["lm_eval"].simple_evaluate = simple_evaluate
    modules["lm_eval.tasks"].TaskManager = TaskManager
    modules["lm_eval.models.huggingface"].HFLM = HFLM
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_lm_eval_results_are_flattened(fake_lm_eval: dict, loaded: LoadedModel) -> None:
    fake_lm_eval["outcome"] = {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5}
        },
        "n-samples": {"hellaswag": {"original": 4, "effective": 4}},
    }
    metrics = run_evaluations(loaded.model, loaded.tokenizer, EvalArguments(eval_lm_tasks=["hellaswag"]))
    assert metrics == {"lm_eval_hellaswag_acc": 0.25, "lm_eval_hellaswag_acc_norm": 0.5, "lm_eval_hellaswag_samples": 4}
    assert fake_lm_eval["hflm"]["pretrained"] is loaded.model and fake_lm_eval["tasks"] == ["hellaswag"]


def test_lm_eval_offline_without_task_data_is_one_line(
    fake_lm_eval: dict, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_lm_eval["outcome"] = OfflineModeIsEnabled(
        "Cannot reach https://huggingface.co/datasets/Rowan/hellaswag: offline mode is enabled."
    )
    with pytest.raises(DataError) as error:
        run_evaluations(loaded.model, loaded.tokenizer, EvalArguments(eval_lm_tasks=["hellaswag"]))
    message = str(error.value)
    assert "\n" not in message and "could not load the task data" in message and "HF_HUB_OFFLINE" in message


def test_unknown_lm_eval_task_is_named(fake_lm_eval: dict) -> None:
    with pytest.raises(ConfigError, match="lm-eval has no task 'helaswag'. Did you mean 'hellaswag'"):
        check_eval_args(EvalArguments(eval_lm_tasks=["helaswag"]), "command line")


def test_a_task_added_to_the_task_list_is_a_flag_a_config_key_a_pipeline_key_and_a_result(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hfpipe.config import parse
    from hfpipe.evaluation import evaluate, tasks
    from hfpipe.evaluation.inputs import FileReader, read_jsonl
    from hfpipe.tools.pipeline import read_pipeline

    count = tasks.EvalTask(
        name="count",
        setting="eval_count_files",
        flag="--count",
        key="count",
        help="Count the rows of these .jsonl files.",
        read=FileReader((".jsonl",), read_jsonl),
        score=lambda model, tokenizer, rows, settings: [tasks.Score({"lines": float(len(rows))}, len(rows), "rows")],
    )
    monkeypatch.setattr(tasks, "EVAL_TASKS", (*tasks.EVAL_TASKS, count))
    monkeypatch.setattr(evaluate, "EvalArguments", evaluate.eval_arguments_class(tasks.EVAL_TASKS))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"a": 2}, {"a": 3}])
    text = tmp_path / "doc.txt"
    text.write_text(PROSE, encoding="utf-8")

    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "--count FILE [FILE ...]" in out and "Count the rows of these .jsonl files." in out
    code, _, err = run_cli(["some/model"], capsys)
    assert "give --text, --choices, --preferences, --lm-eval or --count." in err
    code, _, err = run_cli(["some/model", "--count", str(tmp_path / "rows.txt")], capsys)
    assert "--count: no file matches" in err
    output = tmp_path / "results.json"
    code, out, err = run_cli(
        [str(tiny_gpt2_dir), "--count", str(rows), "--text", str(text), "--output", str(output)], capsys
    )
    assert code == 0, err
    results = json.loads(output.read_text())
    assert [task["task"] for task in results["tasks"]] == ["text", "count"]
    assert results["metrics"]["count_lines"] == 3.0 and results["metrics"]["count_rows"] == 3
    assert results["settings"]["eval_count_files"] == [str(rows)]

    config = tmp_path / "eval.yaml"
    config.write_text(f"eval_count_files: [{rows}]\neval_tasks_batch_size: 2\n", encoding="utf-8")
    parsed = parse([evaluate.EvalArguments], ["--config", str(config)], check=evaluate.check_config_evaluations)
    assert parsed.get(evaluate.EvalArguments).eval_count_files == [str(rows)]
    config.write_text("eval_count_files: [nowhere.jsonl]\n", encoding="utf-8")
    with pytest.raises(DataError, match="eval.yaml: eval_count_files: no file matches 'nowhere.jsonl'"):
        parse([evaluate.EvalArguments], ["--config", str(config)], check=evaluate.check_config_evaluations)

    sft = tmp_path / "sft.yaml"
    sft.write_text("# accelerate launch recipes/sft.py --config sft.yaml\n", encoding="utf-8")
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"stages:\n  - {{name: sft, config: {sft}}}\n  - {{name: eval, eval: {{count: [{rows}]}}}}\n")
    stages, _, _ = read_pipeline(path)
    assert stages[1].eval_flags == ["--count", str(rows)]


def test_eval_files_opening_with_a_utf8_bom_are_read_without_it(tmp_path: Path) -> None:
    from hfpipe.evaluation.inputs import read_jsonl, read_texts

    rows = tmp_path / "mc.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROWS) + "\n").encode())
    assert read_jsonl(str(rows)) == [(1, ROWS)]
    text = tmp_path / "doc.txt"
    text.write_bytes(b"\xef\xbb\xbf" + PROSE.encode())
    assert read_texts(str(text)) == [PROSE]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\n   \n\n", "blank.jsonl: the file has no rows"),
        (b'{"text": "a"}\n\n["a", "b"]\n', "blank.jsonl: line 3 is not a JSON object (it is an array)"),
        (b"\xef\xbb\xbf\n", "blank.jsonl: the file has no rows"),
    ],
)
def test_blank_and_non_object_eval_lines_are_named(content: bytes, expected: str, tmp_path: Path) -> None:
    from hfpipe.evaluation.inputs import read_jsonl

    path = tmp_path / "blank.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_jsonl(str(path))
    assert expected in str(info.value) and "\n" not in str(info.value)
