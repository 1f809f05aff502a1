"""The shipped recipe configs run for 2 steps each, once per test session (a run another config starts from is reused,
as the pipeline hands it on): the `shipped_runs` fixture of conftest.py."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT
from test_config import RECIPE_CONFIGS

from hfpipe.stages import stage_named_in

STEPS = 2
SHORT = [
    *("--max_steps", str(STEPS), "--eval_steps", str(STEPS), "--save_steps", str(STEPS)),
    *("--logging_steps", "1", "--sample_max_new_tokens", "4"),
]
# Only where the config as written cannot take 2 steps in CI: the model and data stay the config's own.
OVERRIDES = {
    # 64 sequences of 1024 tokens per step through a 124M model (8 x 8 accumulated), 20 s each on 2 cores: over 20
    # minutes a step, and 256 held-out blocks.
    "configs/pretrain/gpt2_small.yaml": [
        *("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"),
        *("--max_eval_samples", "2", "--per_device_eval_batch_size", "2"),
    ],
    # 100 held-out prompts answered greedily before and after, by a 135M model.
    "configs/grpo/smollm2_arithmetic.yaml": ["--heldout_prompts", "8"],
}
# A run stuck for this long is hung, not slow (the slowest config takes minutes).
TIMEOUT_SECONDS = 3600


@cache
def settings_of(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text(encoding="utf-8")) or {}


def writer_of(output: str, config: Path) -> Path:
    """The shipped config whose output_dir is `output` (an outputs/... dir `config` reads)."""
    writers = [other for other in RECIPE_CONFIGS if settings_of(other).get("output_dir") == output]
    assert writers, f"{config.relative_to(ROOT)} reads {output}, which no shipped config writes"
    return writers[0]


def start_of(config: Path) -> Path | None:
    """The shipped config whose output `config` starts from (`model_name_or_path: outputs/...`), if any."""
    name = str(settings_of(config).get("model_name_or_path", ""))
    return writer_of(name, config) if name.startswith("outputs/") else None


def reward_models_of(config: Path) -> dict[str, Path]:
    """The shipped configs that write the reward model dirs a GRPO config's rewards read (`model: outputs/...`)."""
    entries = settings_of(config).get("rewards") or []
    dirs = [entry["model"] for entry in entries if str(entry.get("model", "")).startswith("outputs/")]
    return {name: writer_of(name, config) for name in dirs}


def stages_before(config: Path) -> int:
    needed = [start_of(config), *reward_models_of(config).values()]
    return max((1 + stages_before(other) for other in needed if other is not None), default=0)


@dataclass
class ShippedRun:
    """One config's 2-step run: where it wrote, the model dir it started from (None: from scratch or a named
    model), and how it went."""

    config: Path
    output_dir: Path
    start: Path | None
    returncode: int
    output: str

    def failure(self) -> str:
        return f"{self.config.relative_to(ROOT)} exited {self.returncode}:\n{self.output[-4000:]}"


class ShippedRuns:
    """Each config runs once per session: a run that another config starts from is reused, not repeated."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[Path, ShippedRun] = {}

    def get(self, config: Path) -> ShippedRun:
        if config not in self.runs:
            start = start_of(config)
            start_dir = None
            if start is not None:
                before = self.get(start)
                assert before.returncode == 0, f"the run this config starts from failed: {before.failure()}"
                start_dir = before.output_dir
            self.runs[config] = self._run(config, start_dir, self._with_reward_models(config))
        return self.runs[config]

    def _with_reward_models(self, config: Path) -> Path:
        """`config` itself, or a copy whose reward model dirs are the 2-step runs of the configs that write them."""
        readers = reward_models_of(config)
        if not readers:
            return config
        text = config.read_text(encoding="utf-8")
        for name, writer in readers.items():
            before = self.get(writer)
            assert before.returncode == 0, f"the reward model this config reads failed: {before.failure()}"
            text = text.replace(f"model: {name}", f"model: {before.output_dir}")
        copy = self.root / f"{config.stem}-with-reward-models.yaml"
        copy.write_text(text, encoding="utf-8")
        return copy

    def _run(self, config: Path, start: Path | None, config_file: Path) -> ShippedRun:
        relative = str(config.relative_to(ROOT))
        output_dir = self.root / relative.removesuffix(".yaml").replace("/", "-")
        recipe = f"recipes/{stage_named_in(config)}.py"
        command = [sys.executable, recipe, "--config", str(config_file), "--output_dir", str(output_dir), *SHORT]
        command += OVERRIDES.get(relative, [])
        if start is not None:
            command += ["--model_name_or_path", str(start)]
        result = subprocess.run(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_SECONDS
        )
        return ShippedRun(config, output_dir, start, result.returncode, result.stdout)
