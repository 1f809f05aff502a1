"""QLoRA vs LoRA on SmolLM2-135M-Instruct: peak RSS and steps/s of configs/sft/smollm2_qlora.yaml beside
configs/sft.yaml on the same rows, the same number of steps, alternately.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/qlora_memory.py            # 3 alternating rounds of 12 steps

Both run recipes/sft.py as shipped, with a fixed number of steps, no evaluation or checkpoints and no merge, so that
the figures are those of the training phase. Writes benchmarks/results/qlora_memory.json and a table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from readme_table import write_marked_table
from sft_throughput import run_measured  # the same peak-RSS sampler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "LoRA (configs/sft.yaml)": "configs/sft.yaml",
    "QLoRA nf4 (smollm2_qlora.yaml)": "configs/sft/smollm2_qlora.yaml",
}
SECTION = """## QLoRA: peak memory and speed beside LoRA

`benchmarks/qlora_memory.py` trains `configs/sft/smollm2_qlora.yaml` (SmolLM2-135M in 4-bit nf4 with double
quantization, LoRA r16 on every linear layer) and `configs/sft.yaml` (the same adapter on the bf16/fp32
base) on the same rows for the same steps, alternately, with bitsandbytes' CPU backend.
"""


def run_once(config: str, out: Path, env: dict[str, str], steps: int) -> dict[str, float]:
    """One training run of `config` for `steps` steps: steps/s over the training phase and peak RSS."""
    flags = ["--max_steps", str(steps), "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no"]
    flags += ["--merge_adapter", "false", "--output_dir", str(out), "--sample_max_new_tokens", "4"]
    command = [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", config, *flags]
    wall, peak, output = run_measured(command, env)
    runtime = float(re.findall(r"'train_runtime': '?([0-9.]+)", output)[-1])
    return {"steps_per_second": steps / runtime, "peak_rss_mb": peak / 2**20, "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    options = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "2")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(options.repeats):
            for index, (name, config) in enumerate(CONFIGS.items()):
                runs[name].append(run_once(config, Path(scratch) / f"r{repeat}-{index}", env, options.steps))
                print(f"round {repeat}: {name}: {runs[name][-1]}", flush=True)
    lora, qlora = runs.values()
    result = {
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "steps": options.steps,
        "runs": runs,
        "median_rss_ratio_qlora_over_lora": statistics.median(
            q["peak_rss_mb"] / lo["peak_rss_mb"] for q, lo in zip(qlora, lora, strict=True)
        ),
        "median_speed_ratio_qlora_over_lora": statistics.median(
            q["steps_per_second"] / lo["steps_per_second"] for q, lo in zip(qlora, lora, strict=True)
        ),
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "qlora_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    table = "\n".join(
        [
            f"OMP_NUM_THREADS={result['omp_num_threads']}, {options.repeats} alternating rounds of {options.steps} "
            f"steps. QLoRA / LoRA: peak RSS **{result['median_rss_ratio_qlora_over_lora']:.2f}x**, steps/s "
            f"**{result['median_speed_ratio_qlora_over_lora']:.2f}x** (medians of per-round ratios)",
            "",
            "| config | peak RSS MB | steps/s |",
            "| --- | --- | --- |",
            *(
                f"| {name} | {median(r, 'peak_rss_mb'):,.0f} | {median(r, 'steps_per_second'):.3f} |"
                for name, r in runs.items()
            ),
        ]
    )
    write_marked_table("qlora-table", table, section_if_missing=SECTION)
    print(table)


if __name__ == "__main__":
    main()
