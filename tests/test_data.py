"""Data loading: every file format, packing with EOS between documents, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hfpipe.data.files import load_raw_splits
from hfpipe.data.text_blocks import pack_texts
from hfpipe.errors import DataError
from hfpipe.sections import DataArguments

DOCUMENTS = ["First document, with a line.\nAnd a second line.", "Second document.", "Third, the last one."]


def write_format(directory: Path, suffix: str, column: str = "text") -> Path:
    import pandas as pd

    path = directory / f"corpus{suffix}"
    frame = pd.DataFrame({column: DOCUMENTS, "id": range(len(DOCUMENTS))})
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_table_formats_load_their_text_column(suffix: str, tmp_path: Path) -> None:
    path = write_format(tmp_path, suffix, column="body")
    raw = load_raw_splits(DataArguments(train_files=[str(path)], text_column="body"), "cfg.yaml")
    assert raw["train"].column_names == ["text"]
    assert raw["train"]["text"] == DOCUMENTS
    assert "validation" not in raw


def test_txt_files_are_one_document_each_with_line_breaks(tmp_path: Path) -> None:
    for index, text in enumerate(DOCUMENTS):
        (tmp_path / f"{index}.txt").write_text(text)
    raw = load_raw_splits(DataArguments(train_files=[str(tmp_path / "*.txt")]), "cfg.yaml")
    assert sorted(raw["train"]["text"]) == sorted(DOCUMENTS)


def test_packing_ends_documents_with_eos_and_cuts_full_blocks(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    dataset = Dataset.from_dict({"text": DOCUMENTS})
    blocks = pack_texts(dataset, tokenizer, block_size=8)
    stream = [token for text in DOCUMENTS for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert [row["input_ids"] for row in blocks] == [stream[i : i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
    assert all(row["labels"] == row["input_ids"] for row in blocks)
    assert stream.count(tokenizer.eos_token_id) == len(DOCUMENTS)


def test_missing_text_column_names_the_file_and_suggests(tmp_path: Path) -> None:
    path = write_format(tmp_path, ".jsonl", column="texts")
    with pytest.raises(DataError, match=r"corpus\.jsonl: no column 'text' \(columns: texts, id\).*'texts'"):
        load_raw_splits(DataArguments(train_files=[str(path)]), "cfg.yaml")


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine line\nna\xefve caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: line 2 is not UTF-8"):
        load_raw_splits(DataArguments(train_files=[str(path)]), "cfg.yaml")


def test_malformed_jsonl_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON") as info:
        load_raw_splits(DataArguments(train_files=[str(path)]), "cfg.yaml")
    assert "\n" not in str(info.value)


def test_empty_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_raw_splits(DataArguments(train_files=[str(path)]), "cfg.yaml")


def test_unsupported_and_mixed_file_types(tmp_path: Path) -> None:
    (tmp_path / "a.docx").write_text("x")
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"unsupported file type \.docx"):
        load_raw_splits(DataArguments(train_files=[str(tmp_path / "a.docx")]), "cfg.yaml")
    with pytest.raises(DataError, match="mixes file types"):
        load_raw_splits(DataArguments(train_files=[str(tmp_path / "b.txt"), str(tmp_path / "c.csv")]), "cfg.yaml")


def test_hub_dataset_offline_is_one_clear_line(tiny_config, pretrain_main, capsys) -> None:
    config = tiny_config()
    text = "\n".join(line for line in config.read_text().splitlines() if not line.startswith(("train_", "valid")))
    config.write_text(text + "\ndataset_name: someone/shakespeare-corpus\n")
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset_name: 'someone/shakespeare-corpus'") and "Traceback" not in err
    assert len(err.splitlines()) == 1


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_files_opening_with_a_utf8_bom_are_read_without_it(suffix: str, tmp_path: Path) -> None:
    # Two files: datasets' json builder drops a BOM from the first file it reads only.
    paths = []
    for name in ("first", "second"):
        directory = tmp_path / name
        directory.mkdir()
        if suffix == ".txt":
            path = directory / "corpus.txt"
            path.write_text(DOCUMENTS[0], encoding="utf-8")
        else:
            path = write_format(directory, suffix, column="body")
        path.write_bytes(BOM + path.read_bytes())
        paths.append(str(path))
    column = "text" if suffix == ".txt" else "body"
    raw = load_raw_splits(DataArguments(train_files=paths, text_column=column), "cfg.yaml")
    expected = [DOCUMENTS[0]] * 2 if suffix == ".txt" else DOCUMENTS * 2
    assert raw["train"]["text"] == expected


@pytest.mark.parametrize(
    ("suffix", "holds"), [(".jsonl", "rows"), (".json", "rows"), (".csv", "rows"), (".txt", "text")]
)
def test_a_file_of_blank_lines_holds_no_rows(suffix: str, holds: str, tmp_path: Path) -> None:
    path = tmp_path / f"blank{suffix}"
    path.write_bytes(BOM + b"\n  \n\t\r\n\n")
    with pytest.raises(DataError, match=rf"blank\{suffix}: the file has no {holds} \(every line is blank\)") as info:
        load_raw_splits(DataArguments(train_files=[str(path)]), "cfg.yaml")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("line", "kind"), [('["a", "b"]', "an array"), ('"just text"', "a string"), ("7", "a number")])
def test_a_jsonl_line_that_is_not_an_object_is_named_by_its_line(line: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"text": "one"}}\n\n{line}\n{{"text": "two"}}\n')
    with pytest.raises(DataError, match=rf"rows\.jsonl: line 3 is not a JSON object \(it is {kind}\)"):
        load_raw_splits(DataArguments(train_files=[str(path)]), "cfg.yaml")
