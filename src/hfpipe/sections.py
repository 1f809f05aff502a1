"""hfpipe's own typed config sections, beside the HF / TRL ones (TrainingArguments, TRL's configs, ModelConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ModelSize = Literal["micro", "tiny", "small", "medium", "large", "xl"]
HubUpload = Literal["auto", "adapter", "merged", "both"]


@dataclass
class DataArguments:
    """Where the training text comes from and how it is split and packed."""

    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.jsonl/.json/.csv/.parquet files or globs to train on."}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Local files or globs for validation. Default: a split of the training data."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset name (needs the network)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the Hub dataset to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split of the Hub dataset to validate on. Default: a split of the train split."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text in jsonl/json/csv/parquet."})
    validation_split_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of training blocks held out (the last ones) when there is no validation data."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many validation blocks (faster evaluations)."}
    )
    block_size: int = field(default=256, metadata={"help": "Context length: text is packed into blocks of this size."})
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where tokenized data and trained tokenizers are cached. Default: ~/.cache/hfpipe."},
    )


@dataclass
class TokenizerArguments:
    """The tokenizer: an existing one, or one trained on the training text for a from-scratch model."""

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing tokenizer dir or Hub name. Default: the model's, or train one."}
    )
    tokenizer_type: Literal["bpe", "char"] = field(
        default="bpe", metadata={"help": "Tokenizer to train from scratch: byte-level BPE or character-level."}
    )
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of a trained BPE tokenizer."})


@dataclass
class GPT2ShapeArguments:
    """Shape of a from-scratch GPT-2: a size preset, any field overridable."""

    model_size: ModelSize = field(
        default="micro", metadata={"help": "Size preset: micro, tiny, small (124M), medium, large, xl (1.5B)."}
    )
    n_layer: int | None = field(default=None, metadata={"help": "Number of transformer blocks (overrides preset)."})
    n_head: int | None = field(default=None, metadata={"help": "Attention heads per block (overrides preset)."})
    n_embd: int | None = field(default=None, metadata={"help": "Hidden size (overrides preset)."})
    n_positions: int | None = field(default=None, metadata={"help": "Maximum positions. Default: block_size."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on embeddings, attention and residuals."})


@dataclass
class RunArguments:
    """Run-level switches shared by recipes."""

    smoke: bool = field(
        default=False, metadata={"help": "Quick check: a few steps on a slice of the data, into outputs/smoke/."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a finished run in output_dir instead of stopping."}
    )
    sample_prompts: list[str] | None = field(
        default=None, metadata={"help": "Prompts for sample generations. Default: starts of validation blocks."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per sample."})
    hub_upload: HubUpload = field(
        default="auto",
        metadata={
            "help": "What push_to_hub uploads from a LoRA run: the adapter, the merged model, or both (merged at the "
            "repo root, adapter under adapter/). 'auto': the adapter when its base is a Hub model, else merged."
        },
    )


@dataclass
class RemoteCodeArguments:
    """For recipes whose trainer config has no such key (TRL's configs do)."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model's repo."})


@dataclass
class TuningArguments:
    """hfpipe's keys shared by the SFT and DPO recipes: where the rows come from (besides TRL's `datasets` mixture
    and `test_split_size`), how they are checked and rendered, and merging a trained adapter."""

    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local .jsonl/.json/.csv/.parquet files or globs to fine-tune on."}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files. Default: test_split_size of the training rows."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset name (needs the network)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the Hub dataset to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split of the Hub dataset to validate on."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many held-out rows, the first ones (faster)."}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip rows that cannot be trained on (counted) instead of stopping."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "'chatml' (built in) or a .jinja file. Default: the tokenizer's own template; without one, "
            "the '### Instruction:' layout."
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message added to instruction rows."})
    merge_adapter: bool = field(
        default=False, metadata={"help": "After LoRA training, also save base + adapter merged into output_dir/merged."}
    )


@dataclass
class SFTArguments(TuningArguments):
    """hfpipe's SFT keys beside SFTConfig's: the rows and adapter keys, and the loss implementation."""

    use_model_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Compute the loss with the model's own linear head + cross-entropy, without work on padding or on "
            "the logits of unlabelled positions, instead of TRL's fused LM head. Default: on CPU (where TRL's fused "
            "head falls back to a path 2.5-2.9x slower), off on GPUs."
        },
    )


@dataclass
class DPOArguments(TuningArguments):
    """hfpipe's DPO keys beside DPOConfig's: the rows and adapter keys, the reference model, and what to do with an
    SFT adapter given as model_name_or_path."""

    reference: Literal["auto", "adapter", "precompute", "copy"] = field(
        default="auto",
        metadata={
            "help": "Reference model: 'adapter' (LoRA: the base with the adapter disabled, no second copy), "
            "'precompute' (reference log-probs computed once before training, no second copy), 'copy' (a frozen "
            "second model). 'auto': adapter with LoRA, else precompute when training sees every row at least once, "
            "else copy."
        },
    )
    sft_adapter: Literal["continue", "merge"] = field(
        default="continue",
        metadata={
            "help": "When model_name_or_path is an adapter dir: 'continue' trains the same adapter (its SFT state, "
            "copied, is the reference); 'merge' merges it into its base first, then use_peft adds a new adapter "
            "or, without use_peft, the merged model is fully fine-tuned."
        },
    )
