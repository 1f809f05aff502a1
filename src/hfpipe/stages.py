"""The stage registry: every training stage hfpipe knows, and all that the rest of the code asks of one.

A stage is a recipe (`recipes/<name>.py`), a config module (its typed sections, defaults, `parse` and
`resolved_settings`) and a few facts the tools need: whether its runs answer in the instruction/chat layout, how it
ranks when a tool picks "the latest finished run", its model-card title and tags, and whether a pipeline can run
it. `hfpipe check`, the pipeline, chat/serve/eval's auto-pick, generation's prompt format and the model card read
this table and nothing else. Adding a stage is one `register(Stage(...))` call here plus its recipe and config
module. Importing this module imports no stage: config modules load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from hfpipe import PROJECT_ROOT
from hfpipe.config import ParsedConfig
from hfpipe.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Stage:
    """One training stage and what the tools need to know about it."""

    name: str  # the recipe is recipes/<name>.py; runs record it in metrics.json
    config_module: str  # defines parse(argv) -> ParsedConfig and resolved_settings(parsed) -> dict
    card_title: str  # the model card's "<title> of <base model>"
    card_tags: tuple[str, ...] = ()  # Hub tags besides hfpipe, the stage name and lora
    instruction_layout: bool = False  # without a chat template, its runs answer in the '### Instruction:' layout
    pick_rank: int | None = None  # with no model named, tools pick the newest run of the highest rank; None: never
    in_pipeline: bool = True  # `hfpipe pipeline` may run it
    starts_from_previous: bool = True  # in a pipeline, it starts from the previous training stage's output
    generates: bool = True  # its runs are causal LMs (False: a scorer, such as a reward model: no generate/chat/serve)
    pipeline_tag: str = "text-generation"  # the Hub's task of its runs

    @property
    def recipe(self) -> Path:
        """The recipe script that trains this stage."""
        return PROJECT_ROOT / "recipes" / f"{self.name}.py"

    def module(self) -> ModuleType:
        """The stage's config module, imported on first use."""
        return importlib.import_module(self.config_module)

    def parse(self, argv: Sequence[str] | None = None) -> ParsedConfig:
        """Parse and check a config of this stage; loads nothing."""
        return self.module().parse(argv)

    def resolved_settings(self, parsed: ParsedConfig) -> dict[str, Any]:
        """What the user wrote plus what hfpipe derived: a config that reruns the run."""
        return self.module().resolved_settings(parsed)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to the registry (a later entry of the same name replaces the earlier one)."""
    STAGES[stage.name] = stage
    return stage


register(
    Stage(
        "pretrain",
        "hfpipe.train.pretrain",
        card_title="Pretrained",
        pick_rank=0,
        starts_from_previous=False,  # from scratch unless the pipeline stage says `from`
    )
)
register(
    Stage(
        "sft",
        "hfpipe.train.sft",
        card_title="Supervised fine-tuning (SFT)",
        card_tags=("trl",),
        instruction_layout=True,
        pick_rank=1,
    )
)
register(
    Stage(
        "dpo",
        "hfpipe.train.dpo",
        card_title="Preference alignment (DPO)",
        card_tags=("trl",),
        instruction_layout=True,
        pick_rank=2,
    )
)
register(
    Stage(
        "kto",
        "hfpipe.train.kto",
        card_title="Preference alignment (KTO)",
        card_tags=("trl", "kto"),
        instruction_layout=True,
        pick_rank=2,
    )
)
register(
    Stage(
        "grpo",
        "hfpipe.train.grpo",
        card_title="Reinforcement learning with verifiable rewards (GRPO)",
        card_tags=("trl", "grpo"),
        instruction_layout=True,
        pick_rank=3,
    )
)
register(
    Stage(
        "reward",
        "hfpipe.train.reward",
        card_title="Reward model",
        card_tags=("trl", "reward-model"),
        generates=False,
        pipeline_tag="text-classification",
    )
)


def get_stage(name: str, where: str = "stage") -> Stage:
    """The registered stage called `name`; a one-line ConfigError naming the known ones otherwise."""
    if name not in STAGES:
        raise ConfigError(f"{where}: unknown stage '{name}'; known: {', '.join(STAGES)}.{did_you_mean(name, STAGES)}")
    return STAGES[name]


def stage_named_in(config: Path) -> str | None:
    """The stage a config file is for: the recipe its leading command comment names (`recipes/<name>.py`)."""
    for line in config.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        if "recipes/" in line:
            return line.split("recipes/", 1)[1].split(".py", 1)[0]
    return None
