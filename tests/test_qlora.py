"""QLoRA on the CPU (bitsandbytes' CPU backend): a tiny Llama loaded in 4-bit nf4 trains a LoRA adapter; only the
adapter trains; the adapter loads onto the unquantized base; the merged model equals base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file  # noqa: E402
from test_sft import ROWS, write_sft_config  # noqa: E402

QLORA = """use_peft: true
load_in_4bit: true
bnb_4bit_quant_type: nf4
use_bnb_nested_quant: true
lora_r: 4
lora_alpha: 8
lora_target_modules: all-linear
"""


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer grouped-query Llama (hidden size 64: a multiple of the 4-bit block) with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qlora_trains_the_adapter_only_and_merges_onto_the_unquantized_base(
    tiny_llama_dir: Path, tmp_path: Path, sft_main
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hfpipe.models.trained import save_merged_model

    metrics = sft_main(["--config", str(write_sft_config(tmp_path, tiny_llama_dir, ROWS, QLORA))])
    run = tmp_path / "run"
    assert metrics["global_step"] == 2 and not (run / "model.safetensors").exists()
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    # Only the adapter trained: every trainable parameter is in it, and its B matrices moved from their zero start.
    assert metrics["trainable_parameters"] == sum(tensor.numel() for tensor in adapter.values())
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama_dir)

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run).eval()  # the adapter onto the unquantized base
    merged = AutoModelForCausalLM.from_pretrained(save_merged_model(run, tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(_logits(merged, ids), _logits(adapted, ids), atol=1e-5)

    # What was trained is the nf4 base + adapter: merged onto the dequantized base it is the same model, and the
    # merged fp32 model differs from it by the base's own quantization error, no more.
    def nf4_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            tiny_llama_dir,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map="cpu",
        )

    trained = _logits(PeftModel.from_pretrained(nf4_base(), run).eval(), ids)
    dequantized = nf4_base().dequantize()
    merged_on_dequantized = PeftModel.from_pretrained(dequantized, run).merge_and_unload().eval()
    # Within bf16 rounding: TRL keeps a QLoRA adapter in bf16 (measured here: 0.003 on logits of about 0.3).
    assert (_logits(merged_on_dequantized, ids) - trained).abs().max().item() < 0.01
    quantization_error = (_logits(nf4_base(), ids) - _logits(base, ids)).abs().max().item()
    gap = (trained - _logits(merged, ids)).abs().max().item()
    assert gap <= quantization_error, f"merged fp32 vs nf4 + adapter: {gap}; nf4 vs fp32 base: {quantization_error}"


def test_qlora_without_an_adapter_is_refused_before_loading(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from hfpipe import cli

    config = write_sft_config(tmp_path, tiny_llama_dir, ROWS, "load_in_4bit: true\n")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["check", str(config)])
    assert stopped.value.code == 2
    assert "load_in_4bit quantizes the base model" in capsys.readouterr().err
