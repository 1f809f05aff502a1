"""Pretrained causal LMs and tokenizers: local dir or Hub id, safetensors only, load failures as one line."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hfpipe.errors import ConfigError
from hfpipe.models.gpt2 import with_causal_lm_loss


def looks_local(name: str) -> bool:
    """True when `name` is meant as a local path rather than a Hub id."""
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith((".gguf", ".safetensors"))
    )


# Output dirs that earlier stages of a pipeline will write, while `hfpipe pipeline` checks the later stages' configs.
_planned_dirs: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("planned_dirs", default=frozenset())


@contextlib.contextmanager
def planned_model_dirs(paths: set[str]) -> Iterator[None]:
    """Within this block, `check_model_path` accepts `paths` as model dirs that do not exist yet."""
    token = _planned_dirs.set(frozenset(paths))
    try:
        yield
    finally:
        _planned_dirs.reset(token)


def check_model_path(name: str, key: str, where: str) -> None:
    """A local model or tokenizer path must exist and be a directory (or be a planned pipeline output)."""
    if name in _planned_dirs.get():
        return
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{where}: {key}: '{name}' is not a directory. Give a model output dir or a Hub id.")


def model_positions(name: str, cache_dir: Path) -> int | None:
    """The positions a model's config.json declares, read without loading the model: a local model dir, an adapter
    dir (its base's), a converted .gguf or package-shipped model; None for a Hub id or anything not on disk yet."""
    from hfpipe.models.gguf import converted_dir
    from hfpipe.rundir import MODEL_CONFIG, adapter_base

    path = converted_dir(name, cache_dir) or (Path(name).expanduser() if looks_local(name) else None)
    if path is not None and path.is_dir() and not (path / MODEL_CONFIG).is_file():
        base = adapter_base(path)
        path = Path(base).expanduser() if base and looks_local(base) else None
    if path is None or not (path / MODEL_CONFIG).is_file():
        return None
    config = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return positions if isinstance(positions, int) else None


def load_tokenizer_from(
    name: str, key: str, revision: str = "main", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a pretrained tokenizer; a load failure is a one-line ConfigError naming the config key."""
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ConfigError(f"{key}: no tokenizer could be loaded from '{name}': {str(error).splitlines()[0]}") from None


def load_causal_lm(
    name: str,
    revision: str,
    dtype: str | None,
    attn: str | None,
    trust_remote_code: bool,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """Load a pretrained causal LM from safetensors weights, quantized by bitsandbytes when `quantization_config` is
    given (on this process's GPU, else on the CPU); a load failure is a one-line ConfigError."""
    model = _from_pretrained(AutoModelForCausalLM, name, revision, dtype, attn, trust_remote_code, quantization_config)
    return with_causal_lm_loss(model)


def load_reward_model(
    name: str,
    revision: str,
    dtype: str | None,
    attn: str | None,
    trust_remote_code: bool,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """Load a model that scores a sequence with one number: a reward model's dir, or a causal LM's body with a new
    one-output head (AutoModelForSequenceClassification, num_labels 1). Arguments as `load_causal_lm`'s."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal LM has no score head yet: its load report says so, at length
    try:
        model = _from_pretrained(
            AutoModelForSequenceClassification, name, revision, dtype, attn, trust_remote_code, quantization_config,
            num_labels=1,
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def _from_pretrained(
    auto_class: type,
    name: str,
    revision: str,
    dtype: str | None,
    attn: str | None,
    trust_remote_code: bool,
    quantization_config: BitsAndBytesConfig | None,
    **kwargs: object,
) -> PreTrainedModel:
    device_map = None
    if quantization_config is not None:  # bitsandbytes places quantized weights at load: this process's device
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else "cpu"
    try:
        return auto_class.from_pretrained(
            name,
            revision=revision,
            dtype=dtype or "auto",
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            quantization_config=quantization_config,
            device_map=device_map,
            **kwargs,
        )
    except OSError as error:
        raise ConfigError(f"model_name_or_path: '{name}' could not be loaded: {str(error).splitlines()[0]}") from None
