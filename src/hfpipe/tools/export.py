"""Export a finished run to a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

  hfpipe export outputs/quickstart/sft --format gguf                 # f16, in outputs/quickstart/sft/gguf/f16/
  hfpipe export outputs/sft-smollm2-135m-instruct-lora-r16 --type q8_0 --output smollm2-sft.gguf
  ollama create my-model -f outputs/quickstart/sft/gguf/f16/Modelfile

A full model dir is written as it is; an adapter dir is merged onto its base first. Before the file is kept,
transformers loads it back: its logits must match the run's model within the type's tolerance, greedy decoding
must pick the same tokens, and its tokenizer must render and encode prompts as the run's does. A mismatch stops
with one line and keeps no file; the check's numbers go to the run's export.json either way.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from hfpipe.errors import ConfigError
from hfpipe.rundir import EXPORT_RECORD, GGUF_DIR, MODELFILE

FORMATS = ("gguf",)
DEFAULT_TYPE = "f16"  # lossless in practice (logits within 1e-3), half of f32's size, read by every llama.cpp backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the export flags."""
    from hfpipe.export.gguf_writer import GGUF_TYPES

    parser.add_argument(
        "run", nargs="?", help="a finished run's output dir, full model or adapter (default: the newest finished run)"
    )
    parser.add_argument("--format", default="gguf", help=f"{', '.join(FORMATS)} (default: gguf)")
    parser.add_argument("--type", default=DEFAULT_TYPE, help=f"{', '.join(GGUF_TYPES)} (default: {DEFAULT_TYPE})")
    parser.add_argument(
        "--output", type=Path, help="the .gguf file to write (default: RUN/gguf/TYPE/RUN_NAME-TYPE.gguf)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file and Modelfile")


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe export`."""
    from hfpipe.export.gguf_writer import check_type
    from hfpipe.rundir import model_or_latest_run

    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format}: not an export format; supported: {', '.join(FORMATS)}.")
    type_name = check_type(args.type)
    name, picked = model_or_latest_run(args.run)
    run_dir = check_finished_run(name)
    output = (args.output or run_dir / GGUF_DIR / type_name / f"{run_dir.name}-{type_name}.gguf").expanduser()
    check_outputs(output, args.overwrite)
    if picked:
        print(f"Exporting {run_dir} ({picked})")
    entry = export_gguf(run_dir, output, type_name)
    print(f"Wrote {output} ({entry['bytes'] / 1e6:.1f} MB, {type_name}) and {output.parent / MODELFILE}")
    print(f"Round trip: {entry['summary']}")
    print(f"Ollama: ollama create {run_dir.name.lower()} -f {output.parent / MODELFILE}")


def check_finished_run(name: str) -> Path:
    """The run dir `name` names; one line when it is missing or its run has not finished."""
    from hfpipe.rundir import METRICS_FILE, is_finished

    run_dir = Path(name).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{name}: no such run directory. Give a finished run's output dir.")
    if not is_finished(run_dir):
        raise ConfigError(
            f"{name}: not a finished run (no {METRICS_FILE}): it is still training, was stopped, or was not written "
            "by hfpipe. Export a run that trained to the end."
        )
    return run_dir


def check_outputs(output: Path, overwrite: bool) -> None:
    """Refuse to replace an existing .gguf file or Modelfile unless `overwrite`."""
    if output.suffix != ".gguf":
        raise ConfigError(f"--output {output}: a GGUF file's name ends in .gguf.")
    for path in (output, output.parent / MODELFILE):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists already; pass --overwrite to replace it.")


def export_gguf(run_dir: Path, output: Path, type_name: str) -> dict[str, Any]:
    """Write `run_dir`'s model to `output` in `type_name` with a Modelfile beside it, check it by loading it back
    and record the check in the run's export.json; RoundTripError (one line, no file kept) on a mismatch."""
    from transformers import AutoConfig

    from hfpipe.export.gguf_tokenizer import check_tokenizer, gguf_vocab
    from hfpipe.export.gguf_writer import check_architecture, write_gguf
    from hfpipe.export.ollama import model_template, modelfile
    from hfpipe.export.roundtrip import RoundTripError, check_round_trip
    from hfpipe.models.pretrained import load_tokenizer_from
    from hfpipe.models.trained import check_model_source, load_for_inference
    from hfpipe.rundir import adapter_base
    from hfpipe.tools.prompts import context_length, pick_format

    where = str(run_dir)
    # Everything that can refuse the run is checked before its weights load.
    check_model_source(where)
    config = AutoConfig.from_pretrained(adapter_base(run_dir) or where)
    check_architecture(config, where)
    tokenizer = load_tokenizer_from(where, "model")
    check_tokenizer(tokenizer, where)
    prompt_format, _ = pick_format(None, tokenizer, where)
    template = model_template(tokenizer, prompt_format, where)

    loaded = load_for_inference(where, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    stops = stop_ids(model, tokenizer)
    vocab = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0], stops)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial.gguf")
    try:
        tensor_types = write_gguf(model, vocab, partial, type_name, run_dir.name)
        check = check_round_trip(model, tokenizer, prompt_format, partial, type_name, stops)
        size = partial.stat().st_size
        stop_tokens = [tokenizer.decode([index]) for index in stops]
        if check.passed:
            os.replace(partial, output)
            text = modelfile(output.name, template, stop_tokens, context_length(model))
            (output.parent / MODELFILE).write_text(text, encoding="utf-8")
    finally:
        partial.unlink(missing_ok=True)
    entry = {
        "file": str(output),
        "modelfile": str(output.parent / MODELFILE) if check.passed else None,
        "format": "gguf",
        "type": type_name,
        "architecture": config.model_type,
        "adapter_base": loaded.base,
        "bytes": size,
        "tensor_types": tensor_types,
        "prompt_format": prompt_format,
        "stop_tokens": stop_tokens,
        "round_trip": check.record(),
        "summary": check.summary(),
        "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {name: importlib.metadata.version(name) for name in ("gguf", "transformers", "torch")},
    }
    record_export(run_dir, entry)
    if not check.passed:
        raise RoundTripError(
            f"{output}: the exported file does not reproduce the model: {'; '.join(check.problems)}. No file was "
            f"kept; the check is in {run_dir / EXPORT_RECORD}."
        )
    return entry


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids generation stops at, as in training: the tokenizer's EOS, then the generation config's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(index for index in ids if index is not None))


def record_export(run_dir: Path, entry: dict[str, Any]) -> None:
    """Add `entry` to the run's export.json, replacing an earlier entry for the same file."""
    path = run_dir / EXPORT_RECORD
    exports = json.loads(path.read_text(encoding="utf-8"))["exports"] if path.is_file() else []
    exports = [old for old in exports if old.get("file") != entry["file"]] + [entry]
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps({"exports": exports}, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)
