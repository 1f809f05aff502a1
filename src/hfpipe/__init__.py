"""hfpipe: pretrain, fine-tune, align, evaluate and publish causal language models from one YAML file."""

from pathlib import Path

__version__ = "0.1.0"
# The checkout hfpipe runs from (an editable install): recipes/ and the git commit are found from here.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
