"""Session fixtures: a tiny corpus, a tiny tokenizer and a 2-layer GPT-2 in temp dirs; no network anywhere."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from shipped_runs import ShippedRuns

# No test may reach the Hub; caches go to a temp dir so that runs never share state with the user's.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "crown",
    "sword",
    "night",
    "day",
    "love",
    "death",
    "heaven",
    "earth",
    "fair",
    "foul",
    "good",
    "sweet",
    "speak",
    "hear",
    "see",
    "come",
    "go",
    "stay",
    "know",
    "think",
    "thou",
    "thee",
    "thy",
    "my",
    "mine",
    "our",
    "your",
    "his",
    "her",
    "what",
    "why",
    "how",
    "when",
    "where",
    "now",
    "never",
    "ever",
    "hath",
    "doth",
    "shall",
    "will",
    "would",
    "must",
    "may",
    "might",
    "and",
    "but",
    "or",
    "not",
    "no",
    "yes",
]


def write_prose(path: Path, words: int, seed: int) -> Path:
    """Write `words` pseudo-English words in lines of verse to `path`."""
    rng = random.Random(seed)
    lines = []
    while words > 0:
        count = rng.randint(5, 10)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(count)).capitalize() + rng.choice(".,;!?"))
        words -= count
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["HFPIPE_CACHE"] = str(tmp_path_factory.mktemp("hfpipe-cache"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("datasets-cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus dir with train/*.txt (3 documents) and validation/*.txt (1 document)."""
    root = tmp_path_factory.mktemp("corpus")
    for index in range(3):
        write_prose(root / "train" / f"doc{index}.txt", 1500, seed=index)
    write_prose(root / "validation" / "doc.txt", 600, seed=99)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with 320 entries trained on the corpus."""
    from hfpipe.data.tokenizers import train_bpe

    texts = [path.read_text() for path in sorted((corpus / "train").glob("*.txt"))]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe(texts, vocab_size=320).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 (32 dims) saved with its tokenizer, as a pretrained model dir."""
    import torch
    from transformers import AutoTokenizer

    from hfpipe.models.gpt2 import build_gpt2

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = build_gpt2({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}, 0.0, tokenizer)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def long_context_gpt2_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer GPT-2 with 1024 positions and the tiny tokenizer: stands in for an earlier stage's output in the
    shipped configs, whose lengths the 64 positions of the tiny GPT-2 would refuse."""
    from transformers import AutoTokenizer

    from hfpipe.models.gpt2 import build_gpt2

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = build_gpt2({"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 1024}, 0.0, tokenizer)
    directory = tmp_path_factory.mktemp("gpt2-1024")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def pretrain_main() -> Callable[..., dict]:
    """The pretrain recipe's main(), imported from recipes/pretrain.py."""
    return load_recipe("pretrain").main


@pytest.fixture(scope="session")
def sft_main() -> Callable[..., dict]:
    """The SFT recipe's main(), imported from recipes/sft.py."""
    return load_recipe("sft").main


def load_recipe(name: str) -> ModuleType:
    """Import recipes/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_config(path: Path, text: str) -> Path:
    """Write a recipe config (with the leading command comment) and return its path."""
    path.write_text(f"# accelerate launch recipes/pretrain.py --config {path}\n{text}", encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, corpus: Path) -> Callable[..., Path]:
    """Factory: a from-scratch config that trains a 2-layer GPT-2 for 2 steps on the corpus."""

    def make(name: str = "config.yaml") -> Path:
        return write_config(
            tmp_path / name,
            f"""train_files: ["{corpus}/train/*.txt"]
validation_files: ["{corpus}/validation/*.txt"]
vocab_size: 300
n_layer: 2
n_head: 2
n_embd: 32
block_size: 32
per_device_train_batch_size: 4
per_device_eval_batch_size: 8
max_steps: 2
eval_steps: 2
logging_steps: 1
max_eval_samples: 16
sample_max_new_tokens: 8
output_dir: {tmp_path}/run
""",
        )

    return make


@pytest.fixture(scope="session")
def shipped_runs(tmp_path_factory: pytest.TempPathFactory) -> ShippedRuns:
    """The shipped recipe configs' 2-step runs, each run once per session when first asked for."""
    from shipped_runs import ShippedRuns

    return ShippedRuns(tmp_path_factory.mktemp("shipped"))
