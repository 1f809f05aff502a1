"""Parity: what hfpipe trains, saves and reloads is the model plain transformers and peft load, token for token;
and GPT-2's logits equal a minimal GPT-2 forward pass written here in plain torch."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfpipe.models.trained import load_for_inference
from hfpipe.tools.decoding import generate_ids
from hfpipe.tools.generate import add_arguments, prepare

PROMPT = "the king shall"


def generate_args(*argv: str) -> argparse.Namespace:
    """Flags as `hfpipe generate` parses them."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def hfpipe_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """The new tokens `hfpipe generate MODEL --prompt PROMPT --format raw` decodes greedily, through its code path."""
    args = generate_args(str(model_dir), "--prompt", prompt, "--format", "raw", "--max-new-tokens", str(max_new_tokens))
    prepared = prepare(args.model, [prompt], args)
    return generate_ids(prepared.loaded.model, prepared.prompt_ids[0], prepared.generation_config)


def plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return output[0, ids.shape[1] :].tolist()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_a_pretrained_run_reloads_identically(tiny_config, pretrain_main) -> None:
    config = tiny_config()
    pretrain_main(["--config", str(config)])
    run = config.parent / "run"
    ours = load_for_inference(str(run), device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = tokenizer("the queen and the king speak now", return_tensors="pt").input_ids
    assert torch.equal(logits_of(ours.model, ids), logits_of(plain, ids))
    assert ours.model.dtype == torch.float32 and not ours.model.training
    tokens = hfpipe_greedy(run, PROMPT, 20)
    assert tokens == plain_greedy(plain, tokenizer, PROMPT, 20) and len(tokens) > 0


@pytest.fixture
def lora_run(tmp_path: Path, tiny_gpt2_dir: Path) -> Path:
    """A LoRA SFT run of 2 steps on the tiny GPT-2: its output dir holds the adapter only."""
    rows = [{"instruction": f"Who is king number {i}?", "output": f"The king number {i} is Lear."} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"""# accelerate launch recipes/sft.py --config {config}
model_name_or_path: {tiny_gpt2_dir}
train_files: [{data}]
output_dir: {tmp_path}/run
max_length: 64
per_device_train_batch_size: 4
max_steps: 2
eval_strategy: "no"
eval_on_start: false
learning_rate: 5.0e-2
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: all-linear
sample_max_new_tokens: 4
"""
    )
    load_recipe("sft").main(["--config", str(config)])
    return tmp_path / "run"


def test_an_adapter_run_equals_base_plus_adapter_by_hand(lora_run: Path, tiny_gpt2_dir: Path) -> None:
    from peft import PeftModel

    assert (lora_run / "adapter_model.safetensors").is_file() and not (lora_run / "model.safetensors").exists()
    ours = load_for_inference(str(lora_run), device="cpu")
    assert ours.base == str(tiny_gpt2_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(lora_run)
    prompt = "### Instruction:\nWho is king number 3?\n\n### Response:\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    base_logits = logits_of(base, ids)
    by_hand = PeftModel.from_pretrained(base, lora_run).eval()  # unmerged: base layers plus the LoRA path
    expected = logits_of(by_hand, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter learned something
    torch.testing.assert_close(logits_of(ours.model, ids), expected, rtol=1e-5, atol=1e-5)  # merged: rounding only
    assert hfpipe_greedy(lora_run, prompt, 16) == plain_greedy(by_hand, tokenizer, prompt, 16)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def minimal_gpt2(
    state: dict[str, torch.Tensor], n_layer: int, n_head: int, eps: float, ids: torch.Tensor, act=gelu_new
):
    """GPT-2 logits from a state_dict: token + position embeddings; per block pre-LN causal self-attention and a
    GELU MLP, both residual, with Conv1D weights (x @ W + b, W stored as in x out); final LN; LM head tied to wte."""
    wte = state["transformer.wte.weight"]
    length = ids.shape[1]
    x = wte[ids] + state["transformer.wpe.weight"][:length]
    width = x.shape[-1]
    head = width // n_head
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for i in range(n_layer):
        p = lambda name: state[f"transformer.h.{i}.{name}"]  # noqa: B023, E731
        h = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
        q, k, v = (h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")).split(width, dim=-1)
        q, k, v = (t.view(1, length, n_head, head).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head)
        attention = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(1, length, width)
        x = x + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = layer_norm(x, p("ln_2.weight"), p("ln_2.bias"), eps)
        x = x + act(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    x = layer_norm(x, state["transformer.ln_f.weight"], state["transformer.ln_f.bias"], eps)
    return x @ wte.T


def test_gpt2_logits_equal_a_minimal_forward_pass(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    # Freshly initialised weights (std 0.02, unit layer norms, zero biases) give near-uniform logits that would hide
    # a wrong bias or norm: spread every tensor out first.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(tmp_path / "model")

    loaded = load_for_inference(str(tmp_path / "model"), device="cpu")
    config = loaded.model.config
    state = load_file(tmp_path / "model" / "model.safetensors")
    assert "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    ids = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    expected = minimal_gpt2(state, config.n_layer, config.n_head, config.layer_norm_epsilon, ids)
    actual = logits_of(loaded.model, ids)
    assert expected.abs().max() > 1.0  # logits far from uniform
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The tolerance is tight enough to tell the tanh GELU from the exact one.
    exact = minimal_gpt2(state, config.n_layer, config.n_head, config.layer_norm_epsilon, ids, act=gelu_exact)
    assert (exact - actual).abs().max() > 1e-4
