"""GRPO: hfpipe's recipe with its defaults against TRL's own CLI (`trl grpo`) on the same model, data, rewards,
LoRA, learning rate and number of steps: steps/s, peak RSS, held-out reward and accuracy after training.

    python benchmarks/grpo_throughput.py                 # 2 alternating pairs of 20 steps, SmolLM2-135M + LoRA
    python benchmarks/grpo_throughput.py --steps 40 --repeats 3
    python benchmarks/grpo_throughput.py --shipped       # the shipped config start to end: time, held-out accuracy

`trl grpo` gets the YAML TRL's docs show for its CLI (model, dataset, reward_funcs as dotted import paths, LoRA
keys, output_dir) plus what the task and this machine need: the shipped config's task settings (learning rate,
max_completion_length, num_generations and per_device_train_batch_size: the same work per step) and LoRA, and
`use_cpu: true` on a machine without a GPU. Everything else is TRL's default (gradient checkpointing, bf16 autocast
on fp32 weights, ...). hfpipe runs configs/grpo/smollm2_arithmetic.yaml as shipped but for max_steps. Both get the
same rewards (this file's functions for TRL are hfpipe's built-ins) and the prompts rendered by the same chat
template; both final adapters are scored by the same greedy held-out scoring (the 100 prompts of
data/arithmetic/test.jsonl). Steps/s is 1 / the mean of TRL's per-step `step_time` (generation, rewards, forward and
backward; the first step left out); peak RSS is the whole process's (/usr/bin/time). Writes
benchmarks/results/grpo_throughput.json and the table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import yaml
from readme_table import write_marked_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "configs/grpo/smollm2_arithmetic.yaml"
MARKER = "grpo-table"


def _entries():
    from hfpipe.train.rewards import read_reward_entries

    return read_reward_entries(yaml.safe_load((ROOT / CONFIG).read_text())["rewards"], CONFIG)


@cache
def _funcs(eos_id: int | None = None):
    from hfpipe.train.rewards import build_reward_funcs

    if eos_id is None:  # in TRL's process: the model's
        from transformers import AutoTokenizer

        eos_id = AutoTokenizer.from_pretrained(model_dir()).eos_token_id
    return build_reward_funcs(_entries(), [eos_id], load_scorer=None)


# TRL imports these by dotted path (`reward_funcs: [grpo_throughput.numeric, ...]`): hfpipe's built-ins, unchanged.
def numeric(**kwargs):
    """The config's numeric reward."""
    return _funcs()[0](**kwargs)


def exact(**kwargs):
    """The config's exact reward."""
    return _funcs()[1](**kwargs)


def eos(**kwargs):
    """The config's ends-with-EOS reward."""
    return _funcs()[2](**kwargs)


def model_dir() -> str:
    """SmolLM2-135M-Instruct converted from the shipped GGUF (cached)."""
    from hfpipe.data.files import cache_root
    from hfpipe.models.gguf import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct", cache_root())


def trl_data(scratch: Path) -> Path:
    """The training rows in TRL's conversational prompt format (the same user turn hfpipe renders)."""
    rows = [json.loads(line) for line in (ROOT / "data/arithmetic/train.jsonl").read_text().splitlines()]
    path = scratch / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": row["instruction"]}], "answer": row["answer"]}) + "\n"
            for row in rows
        )
    )
    return path


def timed(command: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run `command` under /usr/bin/time; return its output and peak RSS in MiB."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_RSS_KB %M", *command],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stdout[-3000:]}")
    return result.stdout, int(re.findall(r"PEAK_RSS_KB (\d+)", result.stdout)[-1]) // 1024


def seconds_per_step(output_dir: Path) -> float:
    """The mean of TRL's `step_time` over the training steps (logged every step; the first, warm-up, left out),
    from the last checkpoint's trainer_state.json."""
    checkpoint = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    times = [entry["step_time"] for entry in state["log_history"] if "step_time" in entry]
    return statistics.mean(times[1:] or times)


# The task's settings, the same for both: what is learned from what, and how much work one step is.
TASK_KEYS = ("learning_rate", "max_completion_length", "num_generations", "per_device_train_batch_size")
LORA_KEYS = ("use_peft", "lora_r", "lora_alpha", "lora_target_modules")


def task_settings() -> dict:
    """The shipped config's task and LoRA settings, as hfpipe resolves them."""
    from hfpipe.train.grpo import parse

    parsed = parse(["--config", CONFIG, "--output_dir", tempfile.mkdtemp()])
    values = {key: getattr(section, key) for section in parsed.values for key in (*TASK_KEYS, *LORA_KEYS)
              if hasattr(section, key)}  # fmt: skip
    values["lora_target_modules"] = yaml.safe_load((ROOT / CONFIG).read_text())["lora_target_modules"]
    return values


def run_trl(scratch: Path, steps: int, env: dict[str, str]) -> dict:
    """`trl grpo` with its documented YAML plus the task's and the CPU's needs."""
    output_dir = scratch / "trl"
    config = {
        "model_name_or_path": model_dir(),
        "datasets": [{"path": "json", "data_files": str(trl_data(scratch))}],
        "reward_funcs": [f"grpo_throughput.{name}" for name in ("numeric", "exact", "eos")],
        "reward_weights": [entry.weight for entry in _entries()],
        **task_settings(),
        "max_steps": steps,
        "save_steps": steps,
        "logging_steps": 1,
        "output_dir": str(output_dir),
        "report_to": "none",
        **({"use_cpu": True} if not _has_gpu() else {}),
    }
    path = scratch / "trl_grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    trl_env = {**env, "PYTHONPATH": f"{ROOT / 'benchmarks'}:{env.get('PYTHONPATH', '')}"}
    _, rss = timed([str(Path(sys.executable).parent / "trl"), "grpo", "--config", str(path)], trl_env)
    return {"output_dir": str(output_dir), "seconds_per_step": seconds_per_step(output_dir), "peak_rss_mib": rss}


def run_hfpipe(scratch: Path, steps: int, env: dict[str, str]) -> dict:
    """recipes/grpo.py with the shipped config (its held-out scoring skipped here: scored below like TRL's)."""
    output_dir = scratch / "hfpipe"
    command = [sys.executable, "recipes/grpo.py", "--config", CONFIG, "--output_dir", str(output_dir)]
    command += ["--max_steps", str(steps), "--save_steps", str(steps), "--logging_steps", "1", "--heldout_prompts", "1"]
    _, rss = timed(command, env)
    return {"output_dir": str(output_dir), "seconds_per_step": seconds_per_step(output_dir), "peak_rss_mib": rss}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def heldout(output_dir: str) -> dict[str, float]:
    """Greedy held-out scores of a trained adapter, as hfpipe's recipe scores them."""
    from datasets import load_dataset

    from hfpipe.data.prompt_rows import convert_prompt_row
    from hfpipe.models.trained import load_for_inference
    from hfpipe.train.grpo import heldout_scores

    loaded = load_for_inference(output_dir)
    rows = load_dataset("json", data_files=str(ROOT / "data/arithmetic/test.jsonl"))["train"]
    rows = rows.map(lambda row: convert_prompt_row(row, "instruction", True, None), remove_columns=["instruction"])
    funcs = _funcs(loaded.tokenizer.eos_token_id)
    scores, _ = heldout_scores(loaded.model, loaded.tokenizer, rows, funcs, _entries(), 16, 16)
    return scores


def shipped_run(env: dict[str, str]) -> None:
    """The shipped config as a user runs it, start to end: wall time, held-out accuracy before and after."""
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(scratch) / "run"
        command = [sys.executable, "recipes/grpo.py", "--config", CONFIG, "--output_dir", str(output_dir)]
        start = time.perf_counter()
        _, rss = timed(command, env)
        wall = time.perf_counter() - start
        metrics = json.loads((output_dir / "metrics.json").read_text())
    result = {
        "config": CONFIG,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_seconds": wall,
        "peak_rss_mib": rss,
        **{
            key: metrics[key]
            for key in metrics
            if key.startswith("heldout_") or key in ("global_step", "train_runtime")
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_shipped_run.json").write_text(json.dumps(result, indent=2) + "\n")
    line = (
        f"| `{CONFIG}` | {result['global_step']} | {wall / 60:.1f} min | {rss} MiB | "
        f"{result['heldout_accuracy_before']:.2f} -> {result['heldout_accuracy_after']:.2f} | "
        f"{result['heldout_reward_before']:.3f} -> {result['heldout_reward_after']:.3f} |"
    )
    table = "\n".join(
        [
            f"OMP_NUM_THREADS={result['omp_num_threads']}, {result['machine']}",
            "",
            "| config | steps | wall (whole command) | peak RSS | held-out accuracy | held-out reward |",
            "|---|---|---|---|---|---|",
            line,
        ]
    )
    write_marked_table("grpo-shipped-table", table, section_if_missing=SHIPPED_SECTION)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shipped", action="store_true", help="run the shipped config start to end instead")
    options = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if options.shipped:
        shipped_run(env)
        return
    runs = []
    with tempfile.TemporaryDirectory() as scratch_root:
        for repeat in range(options.repeats):
            pair = {}
            order = ("trl", "hfpipe") if repeat % 2 == 0 else ("hfpipe", "trl")
            for name in order:
                scratch = Path(scratch_root) / f"{name}{repeat}"
                scratch.mkdir()
                run = (run_trl if name == "trl" else run_hfpipe)(scratch, options.steps, env)
                run["steps_per_second"] = 1 / run["seconds_per_step"]
                run["heldout"] = heldout(run.pop("output_dir"))
                pair[name] = run
            print(f"repeat {repeat}: {json.dumps(pair)}", flush=True)
            runs.append(pair)
    ratios = [pair["hfpipe"]["steps_per_second"] / pair["trl"]["steps_per_second"] for pair in runs]
    result = {
        "config": CONFIG,
        "steps": options.steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "runs": runs,
        "median_speedup": statistics.median(ratios),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    write_marked_table(MARKER, table(result), section_if_missing=SECTION)
    print(table(result))


def _median(runs: list[dict], name: str, *keys: str) -> float:
    values = []
    for run in runs:
        value = run[name]
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def table(result: dict) -> str:
    """The README table: medians over the repeats."""
    runs = result["runs"]
    lines = [
        f"{result['steps']} steps, {len(runs)} alternating repeats, OMP_NUM_THREADS={result['omp_num_threads']}, "
        f"{result['machine']}; median speedup {result['median_speedup']:.2f}x",
        "",
        "| contender | steps/s | peak RSS (MiB) | held-out reward | held-out accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("trl", "`trl grpo` (TRL's defaults)"), ("hfpipe", "recipes/grpo.py (hfpipe's defaults)")):
        lines.append(
            f"| {label} | {_median(runs, name, 'steps_per_second'):.3f} | {_median(runs, name, 'peak_rss_mib'):.0f} "
            f"| {_median(runs, name, 'heldout', 'reward'):.3f} | {_median(runs, name, 'heldout', 'accuracy'):.2f} |"
        )
    return "\n".join(lines)


SECTION = """## GRPO: hfpipe vs `trl grpo`

`python benchmarks/grpo_throughput.py`: SmolLM2-135M-Instruct + LoRA (r 16, all linear layers) on the shipped
arithmetic task, the same rewards, learning rate and steps for both; held-out scores are greedy answers to the 100
held-out prompts after training."""

SHIPPED_SECTION = """## GRPO: the shipped SmolLM2 task, start to end

`python benchmarks/grpo_throughput.py --shipped`: `recipes/grpo.py --config configs/grpo/smollm2_arithmetic.yaml`
as a user runs it (conversion of the shipped GGUF cached), timed as a whole; held-out accuracy is the numeric reward
of greedy answers to the 100 held-out prompts, before and after. Target: +0.2 in at most 15 minutes on 2 cores."""


if __name__ == "__main__":
    main()
