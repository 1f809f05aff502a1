"""hfpipe: pretrain, fine-tune, align, evaluate and publish causal language models from one YAML file."""

__version__ = "0.1.0"
