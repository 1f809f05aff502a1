"""Generation speed: `hfpipe generate`'s code path vs a plain `model.generate` call on the same model and prompts.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate_throughput.py            # 10 alternating rounds

Models: the quickstart models `outputs/quickstart/pretrain` (raw prompts) and `outputs/quickstart/sft` (questions
in its '### Instruction:' layout), and a randomly initialised GPT-2 of the `tiny` preset (6 layers, 6 heads, 384
dims, same 2k tokenizer, 512 positions) for a heavier figure. A quickstart model that is missing is replaced by a
random GPT-2 of its shape (4x4x128, 2048 tokens).

Both contenders decode greedily with the KV cache, one prompt at a time, and are timed over the whole per-prompt
work: rendering and tokenizing the prompt, generating, decoding the text. hfpipe's side loads the model with
`load_for_inference` and runs `render_prompt`, `encode_prompt`, `generate_ids` and `decode` with the generation
config `prepare` builds, as `hfpipe generate` does; the plain side loads with `AutoModelForCausalLM.from_pretrained`
and calls `tokenizer(...)`, `model.generate(..., do_sample=False)` and `tokenizer.decode`. They alternate prompt
by prompt (the order flipping each time) over `--rounds` rounds of all prompts, and the median of the per-round
tokens/s ratios is reported; plain `model.generate` with `use_cache=False` runs one round per model for reference.
Both sides must produce the same tokens.
Writes benchmarks/results/generate_throughput.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from readme_table import write_marked_table
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfpipe.tools.decoding import generate_ids
from hfpipe.tools.generate import add_arguments, decode, prepare
from hfpipe.tools.prompts import encode_prompt, render_prompt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "generate-table"
RAW_PROMPTS = [
    "ROMEO:\n",
    "To be, or not to be",
    "KING HENRY.\n",
    "Now is the winter of our discontent",
    "JULIET.\nO Romeo, Romeo,",
    "Friends, Romans, countrymen,",
    "HAMLET.\n",
    "Shall I compare thee",
]


def instruction_prompts(count: int = 8) -> list[str]:
    """The first held-out questions of the shipped instruction set."""
    lines = (ROOT / "data/instructions/test.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["instruction"] for line in lines]


def build_random_gpt2(directory: Path, shape: dict[str, int], tokenizer_dir: Path | None) -> Path:
    """A randomly initialised GPT-2 of `shape`, saved with the quickstart tokenizer (or a 2k BPE trained on the
    shipped corpus when there is none)."""
    from hfpipe.data.tokenizers import train_bpe
    from hfpipe.models.gpt2 import build_gpt2

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        texts = [path.read_text() for path in sorted((ROOT / "data/shakespeare/train").glob("*.txt"))]
        tokenizer = train_bpe(texts, 2048)
    torch.manual_seed(0)
    model = build_gpt2(shape, 0.0, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def model_dirs(work: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (model dir, prompts, how it was obtained)."""
    micro = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 128}
    quickstart = ROOT / "outputs/quickstart"
    tokenizer_dir = quickstart / "pretrain" if (quickstart / "pretrain/tokenizer.json").is_file() else None
    models = {}
    for stage, prompts in (("pretrain", RAW_PROMPTS), ("sft", instruction_prompts())):
        trained = quickstart / stage / "metrics.json"
        if trained.is_file():
            models[f"quickstart/{stage}"] = (quickstart / stage, prompts, "trained")
        else:
            directory = build_random_gpt2(work / stage, micro, tokenizer_dir)
            models[f"quickstart/{stage}"] = (directory, prompts, "random 4x4x128 (quickstart run missing)")
    tiny = {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 512}
    models["gpt2 6x6x384"] = (build_random_gpt2(work / "tiny", tiny, tokenizer_dir), RAW_PROMPTS, "random init")
    return models


def hfpipe_side(model_dir: Path, prompts: list[str], max_new_tokens: int) -> tuple[Callable[[int], list[int]], Any]:
    """hfpipe generate's per-prompt work, as a callable taking a prompt's index and returning its new ids; and what
    `prepare` returned (model, format, generation config)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(model_dir), "--prompt", prompts[0], "--max-new-tokens", str(max_new_tokens)])
    prepared = prepare(args.model, prompts, args)
    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer

    def run(index: int) -> list[int]:
        text = render_prompt(tokenizer, prompts[index], prepared.prompt_format)
        ids = generate_ids(model, encode_prompt(tokenizer, text, prepared.prompt_format), prepared.generation_config)
        decode(tokenizer, ids)
        return ids

    return run, prepared


def plain_side(
    model_dir: Path, texts: list[str], max_new_tokens: int, use_cache: bool = True
) -> Callable[[int], list[int]]:
    """The same prompts (already in the model's layout) through a plain `model.generate` call."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def run(index: int) -> list[int]:
        inputs = tokenizer(texts[index], return_tensors="pt")
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        ids = output[0, inputs["input_ids"].shape[1] :].tolist()
        tokenizer.decode(ids, skip_special_tokens=True)
        return ids

    return run


def one_round(contenders: dict[str, Callable[[int], list[int]]], prompts: int, flip: bool) -> dict[str, tuple]:
    """Every prompt through every contender, alternating per prompt (the order flips from prompt to prompt and
    round to round, so that a burst of load from other processes falls on both); returns (tokens/s, outputs)."""
    seconds = dict.fromkeys(contenders, 0.0)
    outputs: dict[str, list[list[int]]] = {name: [] for name in contenders}
    for index in range(prompts):
        names = list(contenders)
        for name in names[::-1] if (index % 2 == 1) != flip else names:
            start = time.perf_counter()
            outputs[name].append(contenders[name](index))
            seconds[name] += time.perf_counter() - start
    return {name: (sum(map(len, outputs[name])) / seconds[name], outputs[name]) for name in contenders}


def measure(model_dir: Path, prompts: list[str], max_new_tokens: int, rounds: int) -> dict:
    """Alternate the contenders `rounds` times on one model; return their tokens/s and the median ratio."""
    ours, prepared = hfpipe_side(model_dir, prompts, max_new_tokens)
    texts = [render_prompt(prepared.loaded.tokenizer, prompt, prepared.prompt_format) for prompt in prompts]
    contenders = {"hfpipe generate": ours, "model.generate": plain_side(model_dir, texts, max_new_tokens)}
    one_round(contenders, len(prompts), flip=False)  # warm-up: first calls allocate and pick kernels
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    reference = None
    for index in range(rounds):
        for name, (speed, outputs) in one_round(contenders, len(prompts), flip=index % 2 == 1).items():
            runs[name].append(speed)
            reference = reference or outputs
            if outputs != reference:
                raise SystemExit(f"{model_dir}: {name} generated other tokens than the other contender")
    no_cache = {"model.generate use_cache=False": plain_side(model_dir, texts, max_new_tokens, use_cache=False)}
    no_cache_speed, no_cache_outputs = one_round(no_cache, len(prompts), flip=False)["model.generate use_cache=False"]
    ratios = [a / b for a, b in zip(runs["hfpipe generate"], runs["model.generate"], strict=True)]
    model = prepared.loaded.model
    config = model.config
    return {
        "model_dir": str(model_dir),
        "format": prepared.prompt_format,
        "shape": f"{config.n_layer}x{config.n_head}x{config.n_embd}",
        "parameters": model.num_parameters(),
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "generated_tokens_per_round": sum(len(ids) for ids in reference),
        "tokens_per_second": runs,
        "model.generate use_cache=False": no_cache_speed,
        "no_cache_same_tokens": no_cache_outputs == reference,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
    }


def write_table(result: dict) -> None:
    """Rewrite the table between the generate-table markers in benchmarks/README.md (re-read just before)."""
    rows = []
    for name, entry in result["models"].items():
        ours, plain = (
            statistics.median(entry["tokens_per_second"][key]) for key in ("hfpipe generate", "model.generate")
        )
        rows.append(
            f"| {name} ({entry['origin']}) | {entry['shape']}, {entry['parameters'] / 1e6:.1f}M | {entry['format']} | "
            f"{entry['prompts']} x {entry['max_new_tokens']} ({entry['generated_tokens_per_round']} generated) | "
            f"{ours:,.0f} | {plain:,.0f} | "
            f"**{entry['median_ratio']:.3f}** ({min(entry['ratios']):.2f}-{max(entry['ratios']):.2f}) | "
            f"{entry['model.generate use_cache=False']:,.0f} |"
        )
    table = "\n".join(
        [
            f"OMP_NUM_THREADS={result['omp_num_threads']} (torch threads: {result['torch_threads']}), "
            f"{result['rounds']} alternating rounds, greedy, KV cache on, one prompt at a time. tokens/s are medians "
            "over rounds; the ratio is the median of per-round ratios (range in brackets).",
            "",
            "| model | shape, parameters | prompt format | prompts x max new tokens | hfpipe generate tok/s | "
            "model.generate tok/s | ratio | model.generate use_cache=False tok/s (1 round) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_marked_table(MARKER, table)


def main() -> None:
    """Measure every model and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for the quickstart models (context 128)")
    parser.add_argument("--large-max-new-tokens", type=int, default=128, help="for the 6x6x384 model")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch_threads": torch.get_num_threads(),
        "rounds": options.rounds,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as work:
        for name, (model_dir, prompts, origin) in model_dirs(Path(work)).items():
            tokens = options.large_max_new_tokens if name.startswith("gpt2") else options.max_new_tokens
            entry = measure(model_dir, prompts, tokens, options.rounds)
            result["models"][name] = {"origin": origin, **entry}
            print(
                f"{name}: median ratio {entry['median_ratio']:.3f}, {json.dumps(entry['tokens_per_second'])}",
                flush=True,
            )
    if options.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result)


if __name__ == "__main__":
    main()
