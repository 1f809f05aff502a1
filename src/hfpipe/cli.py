"""The `hfpipe` command: check configs, prepare the shipped data, and the after-training tools."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from hfpipe.config import ParsedConfig, load_yaml_mapping, public_settings
from hfpipe.errors import ConfigError, exit_on_user_error
from hfpipe.stages import get_stage, stage_named_in

# After-training tools: name -> (module with add_arguments(parser) and run(args), help). A tool's module is
# imported only when that tool runs, to keep `hfpipe --help` and `hfpipe check` fast.
TOOLS: dict[str, tuple[str, str]] = {
    "generate": ("hfpipe.tools.generate", "generate text from a model dir, an adapter dir or a Hub id"),
    "chat": ("hfpipe.tools.chat", "chat with a model in the terminal"),
    "serve": ("hfpipe.tools.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "eval": ("hfpipe.evaluation.evaluate", "perplexity, multiple-choice and preference accuracy of a model"),
    "pipeline": ("hfpipe.tools.pipeline", "run stages (pretrain -> sft -> dpo -> eval) in order, each its own process"),
    "push": ("hfpipe.hub.push", "push a finished run to the Hugging Face Hub with a model card"),
    "export": ("hfpipe.tools.export", "export a finished run to a GGUF file (llama.cpp, Ollama) with a Modelfile"),
    "ui": ("hfpipe.tools.ui", "a local web page to watch, compare and chat with runs"),
}


def run_tool(name: str, argv: Sequence[str]) -> None:
    """Parse a tool's own flags and run it."""
    module = importlib.import_module(TOOLS[name][0])
    parser = argparse.ArgumentParser(prog=f"hfpipe {name}", description=module.__doc__)
    module.add_arguments(parser)
    module.run(parser.parse_args(argv))


def check(config: Path, recipe: str | None, overrides: Sequence[str], show_samples: int = 0) -> None:
    """Validate a config as its recipe would and print the resolved settings; train nothing."""
    from hfpipe.devices import cpu_bf16_decision, has_accelerator
    from hfpipe.rundir import is_finished, last_complete_checkpoint, lock_holder

    if not config.is_file():
        raise ConfigError(f"{config}: config file not found. Check the path.")
    recipe = recipe or stage_named_in(config)
    if recipe is None:
        raise ConfigError(
            f"{config}: no recipe named in the first comment line (# accelerate launch recipes/NAME.py ...); "
            "pass --recipe NAME."
        )
    stage = get_stage(recipe, str(config))
    # Parsed as if overwriting, so that a finished run is reported below rather than refused.
    parsed = stage.parse(["--config", str(config), *overrides, "--overwrite_output_dir", "true"])
    settings = stage.resolved_settings(parsed)
    settings.pop("overwrite_output_dir", None)
    print(f"# {config}: valid for recipes/{recipe}.py")
    print(yaml.safe_dump(public_settings(settings), sort_keys=False), end="")
    if recipe == "sft" and not has_accelerator() and "bf16" not in parsed.user_keys:
        print(f"# bf16: {cpu_bf16_decision().reason}")
    output_dir = Path(settings["output_dir"])
    holder = lock_holder(output_dir)
    if holder is not None:
        state = f"in use by a run still training ({holder}): another run there is refused"
    elif is_finished(output_dir):
        flags = dict(zip(overrides, overrides[1:], strict=False))
        wanted = flags.get("--overwrite_output_dir", load_yaml_mapping(config).get("overwrite_output_dir", False))
        replace = str(wanted).lower() in ("true", "1", "yes")
        state = "finished run: replaced" if replace else "finished run (overwrite_output_dir: true replaces it)"
    else:
        checkpoint = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
        state = f"will resume from {checkpoint}" if checkpoint else "new run"
    print(f"# output_dir: {state}")
    if show_samples:
        if recipe != "sft":
            raise ConfigError(f"--show-samples applies to recipes/sft.py configs, not recipes/{recipe}.py.")
        print(sft_preview(parsed, show_samples))


def sft_preview(parsed: ParsedConfig, count: int) -> str:
    """Load the tokenizer and rows of an SFT config (no model) and render `count` training samples."""
    from trl import SFTConfig

    from hfpipe.data import load_splits, prepare_sft_rows
    from hfpipe.tools.preview import show_samples
    from hfpipe.train.sft import assistant_loss_mode, length_report
    from hfpipe.train.tuning import load_tokenizer

    tokenizer, choice, _ = load_tokenizer(parsed)
    splits, table = load_splits(parsed, tokenizer, smoke=False, prepare=prepare_sft_rows)
    max_length = parsed.get(SFTConfig).max_length
    train, lengths = length_report(splits["train"], tokenizer, max_length, True, "training rows")
    mode = assistant_loss_mode(tokenizer, splits)
    summary = (
        f"chat template: {choice} | loss on: {mode} tokens | truncated: {lengths['rows_truncated_fraction']:.1%} "
        f"of rows, {lengths['tokens_truncated_fraction']:.1%} of tokens"
    )
    return "\n".join([table, summary, show_samples(train, tokenizer, mode, count, max_length)])


def prepare_data(name: str, destination: Path) -> None:
    """Prepare a shipped dataset under data/."""
    from hfpipe.data.corpus import prepare_shakespeare

    counts = prepare_shakespeare(destination)
    print(f"{destination}: {counts['train']} works for training, {counts['validation']} for validation")


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `hfpipe` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        run_tool(argv[0], argv[1:])
        return
    parser = argparse.ArgumentParser(prog="hfpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in TOOLS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    check_parser = commands.add_parser("check", help="validate a config and print its resolved settings")
    check_parser.add_argument("config", type=Path)
    check_parser.add_argument("--recipe", help="recipe name when the config's first line does not say")
    check_parser.add_argument(
        "--show-samples", type=int, default=0, metavar="N", help="SFT: render N training rows, trained spans marked"
    )
    data_parser = commands.add_parser("data", help="prepare a shipped dataset under data/")
    data_parser.add_argument("name", choices=["shakespeare"])
    data_parser.add_argument("--dest", type=Path, default=Path("data/shakespeare"))
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        check(args.config, args.recipe, rest, args.show_samples)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        prepare_data(args.name, args.dest)


if __name__ == "__main__":
    main()
