"""Training: the run every recipe shares (start, train, finish), the stages' configs (pretrain, sft, dpo, kto, reward,
and what fine-tuning stages share in tuning), the SFT trainer, callbacks, plots and reports."""

from hfpipe.train.callbacks import RankReportCallback
from hfpipe.train.run import Run, start_run
from hfpipe.train.sft_trainer import FastSFTTrainer
from hfpipe.train.tuning import load_model, load_tokenizer, lora_config, sample_prompts

__all__ = [
    "FastSFTTrainer",
    "RankReportCallback",
    "Run",
    "load_model",
    "load_tokenizer",
    "lora_config",
    "sample_prompts",
    "start_run",
]
