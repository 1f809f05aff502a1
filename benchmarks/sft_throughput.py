"""SFT speed: `trl sft` as its docs show vs recipes/sft.py with hfpipe's defaults vs a hand-written loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sft_throughput.py            # 3 alternating rounds, 40 steps

Same 5M-parameter GPT-2 (4 layers, 256 dims, an 8k BPE vocabulary trained on the shipped corpus), same
prompt/completion rows (the shipped instruction set in the '### Instruction:' layout), batch 8, max_length 256,
learning rate 1e-4. Reports real (non-padding) training tokens per second over the training phase
(tokens / train_runtime), seconds outside training (process wall time less train_runtime: imports, model
and data preparation, final save and checks), peak RSS of the process, and the held-out loss at the end.
Evaluation time is left out of the training phase for all three. Writes benchmarks/results/sft_throughput*.json
and the tables in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from readme_table import write_marked_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BATCH, MAX_LENGTH, LR = 8, 256, 1e-4
DEFAULT_STEPS = 40


def speech_rows(count: int) -> list[dict[str, str]]:
    """Prompt/completion rows of varied length from the corpus: a speech's first line, then the rest of it."""
    import random

    rng = random.Random(0)
    speeches = []
    for path in sorted((ROOT / "data/shakespeare/train").glob("*.txt")):
        for block in path.read_text().split("\n\n"):
            lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
            if 3 <= len(lines) <= 24 and 200 <= len(block) <= 1000:
                speeches.append(lines)
    rows = []
    for lines in rng.sample(speeches, count):
        rows.append({"prompt": "Continue the speech:\n" + lines[0] + "\n", "completion": "\n".join(lines[1:])})
    return rows


def build_assets(work: Path, long_rows: bool) -> tuple[Path, Path]:
    """A 5M-parameter GPT-2 dir and prompt/completion JSONL rows (train.jsonl, test.jsonl): the shipped
    instruction set in the '### Instruction:' layout, or with `long_rows` speeches of 30-250 tokens."""
    from datasets import Dataset
    from transformers import set_seed

    from hfpipe.data.files import load_raw_splits
    from hfpipe.data.sft_rows import prepare_source
    from hfpipe.data.sources import Source
    from hfpipe.data.text_blocks import iter_texts
    from hfpipe.data.tokenizers import train_bpe
    from hfpipe.models.gpt2 import build_gpt2
    from hfpipe.sections import DataArguments

    raw = load_raw_splits(DataArguments(train_files=[str(ROOT / "data/shakespeare/train/*.txt")]), "bench")
    tokenizer = train_bpe(iter_texts(raw["train"]), 8192)
    set_seed(0)
    model = build_gpt2({"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 512}, 0.0, tokenizer)
    model_dir = work / "gpt2-5m"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = work / "rows"
    data_dir.mkdir()
    speeches = speech_rows(400) if long_rows else []
    for split in ("train", "test"):
        if long_rows:
            rows = speeches[:360] if split == "train" else speeches[360:]
        else:
            rows = [json.loads(line) for line in (ROOT / f"data/instructions/{split}.jsonl").read_text().splitlines()]
        converted, _, _ = prepare_source(Source(split, Dataset.from_list(rows)), False, None, False)
        converted.to_json(data_dir / f"{split}.jsonl")
    print(f"model: {model.num_parameters():,} parameters", flush=True)
    return model_dir, data_dir


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run a command; return wall seconds, the peak RSS of its process tree in bytes, and its output."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    done.set()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{output[-3000:]}")
    return time.perf_counter() - start, peak, output


def figures(output_dir: Path, wall: float, peak: int, token_key: str, output: str) -> dict[str, float]:
    """Tokens and held-out loss from the last checkpoint's log; train_runtime from the printed final log, less the
    evaluations inside it (the hand-written loop evaluates outside its timed steps too)."""
    state = json.loads(sorted(output_dir.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    history = state["log_history"]
    evaluating = sum(entry["eval_runtime"] for entry in history if "eval_runtime" in entry)
    runtime = float(re.findall(r"'train_runtime': '?([0-9.]+)", output)[-1]) - evaluating
    tokens = max(entry[token_key] for entry in history if token_key in entry)
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return {
        "real_tokens_per_second": tokens / runtime,
        "startup_seconds": wall - runtime,
        "peak_rss_mb": peak / 2**20,
        "eval_loss": evals[-1] if evals else float("nan"),
    }


def trl_run(model_dir: Path, data_dir: Path, out: Path, env: dict[str, str], steps: int) -> dict[str, float]:
    """`trl sft` with the YAML a user writes from TRL's docs, plus the use_cpu it needs on a CPU machine."""
    config = out.parent / "trl.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\ndataset_name: {data_dir}\noutput_dir: {out}\n"
        f"max_length: {MAX_LENGTH}\nper_device_train_batch_size: {BATCH}\nmax_steps: {steps}\nlearning_rate: {LR}\n"
        "eval_strategy: steps\n"
        f"eval_steps: {steps}\nsave_steps: {steps}\nreport_to: none\nuse_cpu: true\n"
    )
    wall, peak, output = run_measured([str(Path(sys.executable).parent / "trl"), "sft", "--config", str(config)], env)
    return figures(out, wall, peak, "num_tokens", output)


def hfpipe_run(model_dir: Path, data_dir: Path, out: Path, env: dict[str, str], steps: int) -> dict[str, float]:
    """recipes/sft.py with hfpipe's defaults and the same settings."""
    config = out.parent / "hfpipe.yaml"
    config.write_text(
        f"# accelerate launch recipes/sft.py --config {config}\nmodel_name_or_path: {model_dir}\n"
        f"train_files: [{data_dir}/train.jsonl]\nvalidation_files: [{data_dir}/test.jsonl]\noutput_dir: {out}\n"
        f"max_length: {MAX_LENGTH}\nper_device_train_batch_size: {BATCH}\nmax_steps: {steps}\nlearning_rate: {LR}\n"
        f"eval_steps: {steps}\neval_on_start: false\nsample_max_new_tokens: 16\n"
    )
    wall, peak, output = run_measured([sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", str(config)], env)
    return figures(out, wall, peak, "num_input_tokens_seen", output)


def handwritten_run(model_dir: Path, data_dir: Path, out: Path, env: dict[str, str], steps: int) -> dict[str, float]:
    """The loop a user writes by hand: shuffled batches padded to their longest row, prompt and padding masked."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "loop.py"
    script.write_text(
        HANDWRITTEN.format(
            model_dir=model_dir,
            data_dir=data_dir,
            steps=steps,
            batch=BATCH,
            max_length=MAX_LENGTH,
            lr=LR,
            result=out / "result.json",
        )
    )
    wall, peak, _ = run_measured([sys.executable, str(script)], env)
    result = json.loads((out / "result.json").read_text())
    return {
        "real_tokens_per_second": result["tokens"] / result["train_seconds"],
        "startup_seconds": wall - result["train_seconds"],
        "peak_rss_mb": peak / 2**20,
        "eval_loss": result["eval_loss"],
    }


HANDWRITTEN = """
import json, random, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{model_dir}")
model = AutoModelForCausalLM.from_pretrained("{model_dir}", attn_implementation="sdpa")

def encode(path):
    rows = [json.loads(line) for line in open(path)]
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = (tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id])[:{max_length}]
        out.append((full, [-100] * len(prompt) + full[len(prompt):]))
    return out

def collate(rows):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
        mask[i, :len(row_ids)] = 1
    return ids, mask, labels

train, test = encode("{data_dir}/train.jsonl"), encode("{data_dir}/test.jsonl")
random.seed(0)
optimizer = torch.optim.AdamW(model.parameters(), lr={lr}, fused=True)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / {steps})
order = []
tokens, seconds = 0, 0.0
model.train()
for step in range({steps}):
    if len(order) < {batch}:
        order += random.sample(range(len(train)), len(train))
    batch, order = [train[i] for i in order[:{batch}]], order[{batch}:]
    start = time.perf_counter()
    ids, mask, labels = collate(batch)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds += time.perf_counter() - start
    tokens += int(mask.sum())
model.eval()
losses = []
with torch.no_grad():
    for i in range(0, len(test), 8):
        ids, mask, labels = collate(test[i:i + 8])
        losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
json.dump({{"tokens": tokens, "train_seconds": seconds, "eval_loss": sum(losses) / len(losses)}}, open("{result}", "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per run (135 = 3 epochs)")
    parser.add_argument("--long-rows", action="store_true", help="speeches of 30-250 tokens instead of short Q&A")
    options = parser.parse_args()
    steps = options.steps
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    contenders = {
        "trl sft (docs + use_cpu)": trl_run,
        "hfpipe recipe": hfpipe_run,
        "hand-written loop": handwritten_run,
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir, data_dir = build_assets(work, options.long_rows)
        for repeat in range(options.repeats):
            for index, (name, run) in enumerate(contenders.items()):
                out = work / f"r{repeat}-{index}" / "out"
                out.parent.mkdir(parents=True)
                runs[name].append(run(model_dir, data_dir, out, env, steps))
                print(f"round {repeat}: {name}: {runs[name][-1]}", flush=True)
    trl, ours, hand = (runs[name] for name in contenders)

    def ratio(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
        return statistics.median(
            x["real_tokens_per_second"] / y["real_tokens_per_second"] for x, y in zip(a, b, strict=True)
        )

    result = {
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "settings": {
            "rows": "speeches" if options.long_rows else "instructions",
            "steps": steps,
            "batch": BATCH,
            "max_length": MAX_LENGTH,
            "learning_rate": LR,
        },
        "runs": runs,
        "median_hfpipe_over_trl": ratio(ours, trl),
        "median_hfpipe_over_handwritten": ratio(ours, hand),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = ("_long" if options.long_rows else "") + ("" if steps == DEFAULT_STEPS else f"_{steps}steps")
    name = f"sft_throughput{tag}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    marker = "sft" + ("-long" if options.long_rows else "") + ("" if steps == DEFAULT_STEPS else f"-{steps}")
    write_table(result, f"{marker}-table")


def write_table(result: dict, marker: str) -> None:
    """Rewrite the table between `<!-- marker -->` comments in benchmarks/README.md."""
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    rows = [
        f"| {name} | {median(runs, 'real_tokens_per_second'):,.0f} | {median(runs, 'startup_seconds'):.1f} | "
        f"{median(runs, 'peak_rss_mb'):,.0f} | {median(runs, 'eval_loss'):.3f} |"
        for name, runs in result["runs"].items()
    ]
    table = "\n".join(
        [
            f"OMP_NUM_THREADS={result['omp_num_threads']}, {len(next(iter(result['runs'].values())))} alternating "
            f"rounds of {result['settings']['steps']} steps. "
            f"hfpipe / TRL: **{result['median_hfpipe_over_trl']:.2f}x**; "
            f"hfpipe / hand-written: **{result['median_hfpipe_over_handwritten']:.2f}x** (medians of per-round ratios)",
            "",
            "| contender | real tokens/s | s outside training (start-up, final save) | peak RSS MB | held-out loss |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_marked_table(marker, table)


if __name__ == "__main__":
    main()
