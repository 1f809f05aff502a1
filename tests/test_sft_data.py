"""SFT rows: each format converts as documented, bad rows are named, mixtures keep their shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from hfpipe.data.sft_rows import convert_row, detect_format, prepare_source
from hfpipe.data.sources import Source, mix
from hfpipe.errors import DataError
from hfpipe.train.sft import length_report

ROWS = {
    "instruction": {"instruction": "Name a king.", "input": "", "output": "Lear."},
    "instruction_input": {"instruction": "Reverse the word.", "input": "crown", "output": "nworc"},
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
    "conversations": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    "prompt_completion": {"prompt": "2 + 2 =", "completion": " 4"},
    "text": {"text": "Once upon a time."},
}


def source(name: str, rows: list[dict]) -> Source:
    return Source(name, Dataset.from_list(rows))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("instruction", "instruction"),
        ("instruction_input", "instruction"),
        ("messages", "messages"),
        ("conversations", "messages"),
        ("prompt_completion", "prompt_completion"),
        ("text", "text"),
    ],
)
def test_formats_are_detected_from_columns(row: str, expected: str) -> None:
    assert detect_format(list(ROWS[row]), "rows.jsonl") == expected


def test_unknown_columns_are_one_clear_error() -> None:
    with pytest.raises(
        DataError, match=r"rows\.jsonl: cannot tell the row format from its columns \(answer, question\)"
    ):
        detect_format(["question", "answer"], "rows.jsonl")


def test_instruction_layout_without_chat_template() -> None:
    assert convert_row(ROWS["instruction"], "instruction", chat=False, system_prompt=None) == {
        "prompt": "### Instruction:\nName a king.\n\n### Response:\n",
        "completion": "Lear.",
    }
    assert convert_row(ROWS["instruction_input"], "instruction", chat=False, system_prompt=None) == {
        "prompt": "### Instruction:\nReverse the word.\n\n### Input:\ncrown\n\n### Response:\n",
        "completion": "nworc",
    }


def test_instruction_rows_become_conversations_with_a_chat_template() -> None:
    converted = convert_row(ROWS["instruction_input"], "instruction", chat=True, system_prompt="Be kind.")
    assert converted == {
        "prompt": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Reverse the word.\n\ncrown"},
        ],
        "completion": [{"role": "assistant", "content": "nworc"}],
    }


def test_from_value_conversations_become_role_content_messages() -> None:
    converted, row_format, skipped = prepare_source(source("c.jsonl", [ROWS["conversations"]]), True, None, False)
    assert row_format == "messages" and skipped == 0
    assert converted[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def test_conversations_without_a_chat_template_are_refused() -> None:
    with pytest.raises(DataError, match="conversation rows need a chat template.*chat_template: chatml"):
        prepare_source(source("c.jsonl", [ROWS["messages"]]), False, None, False)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"instruction": "Say hi.", "output": ""}, "row 2: 'output' is empty"),
        ({"instruction": " ", "output": "hi"}, "row 2: 'instruction' is empty"),
    ],
)
def test_bad_rows_name_the_file_and_row(row: dict, problem: str) -> None:
    rows = [ROWS["instruction"], row, ROWS["instruction"]]
    with pytest.raises(DataError, match=rf"train\.jsonl: {problem}\. Fix the row, or set skip_bad_rows: true"):
        prepare_source(source("train.jsonl", rows), False, None, False)
    converted, _, skipped = prepare_source(source("train.jsonl", rows), False, None, True)
    assert skipped == 1 and len(converted) == 2


def test_conversation_must_end_with_the_assistant() -> None:
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(DataError, match="row 1: the last message must be the assistant's"):
        prepare_source(source("m.jsonl", rows), True, None, False)
    rows = [{"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError, match="row 1: 'messages' message 1 needs a role"):
        prepare_source(source("m.jsonl", rows), True, None, False)


def test_mixture_fractions_are_normalised_without_oversampling() -> None:
    big = Dataset.from_list([{"text": str(i)} for i in range(100)])
    small = Dataset.from_list([{"text": str(i)} for i in range(10)])
    parts = mix([big, small], [3.0, 1.0])
    assert [len(part) for part in parts] == [30, 10]  # 75% / 25%, capped by the smaller source
    assert [len(part) for part in mix([big, small], [None, None])] == [100, 10]
    with pytest.raises(DataError, match="set 'fraction' on every dataset"):
        mix([big, small], [1.0, None])


def test_length_report_counts_truncation_and_refuses_hopeless_rows(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = [{"prompt": "the king " * 3, "completion": "speaks " * 20}, {"prompt": "the ", "completion": "king"}]
    dataset = Dataset.from_list(rows)
    kept, report = length_report(dataset, tokenizer, max_length=16, skip_bad_rows=False, source="train.jsonl")
    assert len(kept) == 2
    assert report["rows_truncated_fraction"] == 0.5 and report["tokens_truncated_fraction"] > 0
    long_prompt = Dataset.from_list([{"prompt": "the king " * 40, "completion": "yes"}] + rows)
    with pytest.raises(DataError, match=r"train\.jsonl: row 1: the prompt alone is \d+ tokens, max_length is 16"):
        length_report(long_prompt, tokenizer, max_length=16, skip_bad_rows=False, source="train.jsonl")
    kept, _ = length_report(long_prompt, tokenizer, max_length=16, skip_bad_rows=True, source="train.jsonl")
    assert len(kept) == 2


def test_shipped_instruction_set_is_valid_and_large_enough() -> None:
    root = Path(__file__).resolve().parents[1] / "data" / "instructions"
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    assert len(train) + len(test) >= 300 and len(test) >= 30
    assert not {row["instruction"] + row["input"] for row in test} & {
        row["instruction"] + row["input"] for row in train
    }
    converted, row_format, skipped = prepare_source(source("train.jsonl", train), False, None, False)
    assert row_format == "instruction" and skipped == 0 and len(converted) == len(train)


def test_a_row_format_added_in_one_place_is_detected_checked_and_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    from hfpipe.data.sft_rows import ROW_FORMATS, RowFormat

    question_answer = RowFormat(
        "question_answer",
        lambda names: {"question", "answer"} <= names,
        lambda row: None if row["answer"].strip() else "'answer' is empty",
        lambda row, chat, system: {"prompt": f"Q: {row['question']}\nA:", "completion": f" {row['answer']}"},
    )
    monkeypatch.setitem(ROW_FORMATS, "question_answer", question_answer)
    rows = [{"question": "Who wrote Lear?", "answer": "Shakespeare."}, {"question": "And Faust?", "answer": " "}]
    converted, row_format, skipped = prepare_source(source("qa.jsonl", rows), False, None, skip_bad_rows=True)
    assert (row_format, skipped) == ("question_answer", 1)
    assert converted[0] == {"prompt": "Q: Who wrote Lear?\nA:", "completion": " Shakespeare."}
    with pytest.raises(DataError, match="qa.jsonl: row 2: 'answer' is empty"):
        prepare_source(source("qa.jsonl", rows), False, None, skip_bad_rows=False)


def test_an_unknown_row_format_raises_instead_of_falling_into_another() -> None:
    with pytest.raises(ValueError, match="unknown row format 'chosen_rejected'"):
        convert_row({"text": "x"}, "chosen_rejected", chat=False, system_prompt=None)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_sft_rows_in_a_file_opening_with_a_utf8_bom_keep_their_column_names(suffix: str, tmp_path: Path) -> None:
    import pandas as pd

    from hfpipe.data.sources import load_source

    rows = [{"prompt": "Name a king.", "completion": " Lear."}, {"prompt": "Name a queen.", "completion": " Gertrude."}]
    paths = [tmp_path / f"{name}{suffix}" for name in ("first", "second")]
    for path in paths:
        if suffix == ".jsonl":
            text = "".join(json.dumps(row) + "\n" for row in rows)
        elif suffix == ".json":
            text = json.dumps(rows, indent=2)
        else:
            text = pd.DataFrame(rows).to_csv(index=False)
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    dataset = load_source(str(tmp_path / f"*{suffix}"), "sft.yaml")
    assert dataset.column_names == ["prompt", "completion"] and dataset.to_list() == rows * 2
    converted, row_format, _ = prepare_source(Source("rows", dataset), False, None, False)
    assert row_format == "prompt_completion" and len(converted) == 4


def test_sft_file_of_blank_lines_and_array_lines_are_one_line(tmp_path: Path) -> None:
    from hfpipe.data.sources import load_source

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n   \n")
    with pytest.raises(DataError, match=r"blank\.jsonl: the file has no rows"):
        load_source(str(blank), "sft.yaml")
    arrays = tmp_path / "arrays.jsonl"
    arrays.write_text(json.dumps(ROWS["prompt_completion"]) + "\n" + json.dumps(["2 + 2 =", " 4"]) + "\n")
    with pytest.raises(DataError, match=r"arrays\.jsonl: line 2 is not a JSON object \(it is an array\)"):
        load_source(str(arrays), "sft.yaml")
