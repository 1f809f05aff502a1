"""Several LoRA adapters of one base served at once (`hfpipe serve BASE --lora NAME=DIR ...`): the base is in
memory once, the adapters are loaded into one PeftModel, and each request's `model` names the adapter (or the base)
its rows decode with. Rows of different adapters share batches through PEFT's mixed-adapter forward
(`adapter_names`). Each id renders prompts with its own tokenizer (chat template) and stops at its own EOS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hfpipe.errors import ConfigError
from hfpipe.rundir import ADAPTER_CONFIG, GENERATION_CONFIG, adapter_base

if TYPE_CHECKING:
    from hfpipe.models.trained import LoadedModel

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class Served:
    """One id of /v1/models: the model with this id's tokenizer, the adapter its rows use (None without PEFT) and
    the EOS its generation_config.json names (None: the base's)."""

    loaded: LoadedModel
    adapter: str | None = None
    eos_token_id: int | list[int] | None = None


def parse_lora_flags(values: list[str] | None, model_id: str | None) -> dict[str, str]:
    """--lora NAME=DIR values as {name: dir}, checked before anything loads: the form, distinct names (and not the
    base's id), dirs that hold a PEFT adapter."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, separator, directory = value.partition("=")
        name, directory = name.strip(), directory.strip()
        if not separator or not name or not directory:
            raise ConfigError(f"--lora {value}: expected NAME=DIR (the model id clients send, the adapter's dir).")
        if name in adapters or name == model_id:
            raise ConfigError(f"--lora {value}: the id '{name}' is served twice; give each adapter its own name.")
        if not (Path(directory).expanduser() / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"--lora {value}: {directory} holds no LoRA adapter ({ADAPTER_CONFIG}).")
        adapters[name] = directory
    return adapters


def check_adapter_bases(model: str, adapters: dict[str, str]) -> None:
    """Every adapter must have been trained on the served model, which must be that base (not an adapter)."""
    if not adapters:
        return
    own_base = adapter_base(Path(model).expanduser()) if Path(model).expanduser().is_dir() else None
    if own_base is not None:
        raise ConfigError(
            f"{model}: with --lora, MODEL is the adapters' base model, not an adapter (this one's base is {own_base})."
        )
    for name, directory in adapters.items():
        base = adapter_base(Path(directory).expanduser())
        if base is None or not _same_model(base, model):
            raise ConfigError(
                f"--lora {name}={directory}: the adapter was trained on '{base}' (base_model_name_or_path in "
                f"{ADAPTER_CONFIG}), not on the served model '{model}'."
            )


def _same_model(first: str, second: str) -> bool:
    from hfpipe.data.files import cache_root
    from hfpipe.models.gguf import resolve_model_path

    # A .gguf file or packaged model name is served from its converted dir, which adapters trained on it name.
    paths = [Path(resolve_model_path(name, cache_root())).expanduser() for name in (first, second)]
    if all(path.exists() for path in paths):
        return paths[0].resolve() == paths[1].resolve()
    return first == second


def load_adapters(loaded: LoadedModel, model_id: str, adapters: dict[str, str]) -> dict[str, Served]:
    """The served ids: the base as `model_id`, then each adapter, all over one PeftModel wrapping `loaded.model`.
    Without adapters, just the model as it is."""
    if not adapters:
        return {model_id: Served(loaded)}
    from peft import PeftModel

    from hfpipe.models.pretrained import load_tokenizer_from
    from hfpipe.models.trained import LoadedModel

    model = None
    served: dict[str, Served] = {}
    for name, directory in adapters.items():
        tokenizer = load_tokenizer_from(directory, f"--lora {name}")
        if tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise ConfigError(
                f"--lora {name}={directory}: its tokenizer differs from the base model's ({len(tokenizer)} vs "
                f"{len(loaded.tokenizer)} tokens); an adapter trained with added tokens cannot share the base. "
                "Serve it on its own."
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model is None:
            model = PeftModel.from_pretrained(loaded.model, directory, adapter_name=name)
        else:
            model.load_adapter(directory, adapter_name=name)
        served[name] = Served(LoadedModel(model, tokenizer, directory, loaded.path), name, _eos_of(directory))
    assert model is not None
    model.eval()
    base = Served(LoadedModel(model, loaded.tokenizer, loaded.path, None), BASE_ADAPTER)
    return {model_id: base, **served}


def _eos_of(directory: str) -> int | list[int] | None:
    path = Path(directory).expanduser() / GENERATION_CONFIG
    return json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
