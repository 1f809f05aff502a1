"""Generate text from a model dir, an adapter dir (loaded onto its base), a .gguf file or a Hub id.

  hfpipe generate outputs/quickstart/pretrain --prompt "ROMEO:"
  hfpipe generate outputs/quickstart/sft --prompt "Who is King Lear?" --compare
  hfpipe generate outputs/quickstart/sft --base outputs/quickstart/pretrain --prompts-file data/instructions/test.jsonl
  hfpipe generate outputs/quickstart/pretrain --prompt "To be, or not to be" --next-token 10

Decoding is greedy unless --do-sample or a sampling flag (--temperature, --top-k, --top-p) is given; values not
given come from the model's generation_config.json, then from transformers' defaults (top-k 50 when sampling).
--max-new-tokens defaults to half the model's context, at most 128.

Prompt format (--format): 'chat' renders the prompt as one user turn with the tokenizer's chat template;
'instruction' uses the '### Instruction:' layout that hfpipe's SFT trains on when there is no template; 'raw'
passes the text as given. The default is chat when the tokenizer has a template, instruction for an hfpipe SFT or
DPO run dir without one, and raw otherwise; with --base the base model gets the fine-tuned model's format when it
can read it. A single prompt is streamed; several are printed one after another. Generated text goes to stdout,
one line on the model, format and decoding to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfpipe.errors import ConfigError
from hfpipe.tools.decoding import (
    build_generation_config,
    check_sampling_values,
    default_max_new_tokens,
    describe_decoding,
    generate_ids,
)
from hfpipe.tools.model_flags import add_decoding_flags, add_model_argument, add_model_flags
from hfpipe.tools.prompts import FORMATS, check_prompt_fits, context_length, encode_prompt, pick_format, render_prompt

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

    from hfpipe.models.trained import LoadedModel

# --compare: label -> generation settings. Sampling columns set every sampling knob, so that a model's own
# generation_config cannot change what the column means.
COMPARE_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "sampling t=0.7": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "num_beams": 1},
    "top-p 0.9": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.9, "num_beams": 1},
    "beam search 4": {"do_sample": False, "num_beams": 4},
}


def next_token_probabilities(model: PreTrainedModel, prompt_ids: Sequence[int], k: int) -> list[tuple[int, float]]:
    """The `k` most likely next tokens after a prompt, as (token id, probability), most likely first: the softmax
    of the last position's logits."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt_ids)], device=model.device)).logits[0, -1]
    probabilities = torch.softmax(logits.float(), dim=-1)
    top = probabilities.topk(min(k, probabilities.shape[0]))
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def side_by_side(columns: Sequence[tuple[str, str]], width: int) -> str:
    """Texts in titled columns that fit `width` characters, wrapped; stacked under their titles when too narrow."""
    gap = " | "
    column = (width - len(gap) * (len(columns) - 1)) // len(columns)
    if column < 16:
        return "\n".join(f"--- {title}\n{text}" for title, text in columns)
    wrapped = [_wrap(text, column) for _, text in columns]
    lines = [gap.join(title[:column].ljust(column) for title, _ in columns).rstrip()]
    lines.append("-+-".join("-" * column for _ in columns))
    for row in zip_longest(*wrapped, fillvalue=""):
        lines.append(gap.join(cell.ljust(column) for cell in row).rstrip())
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for line in text.split("\n"):
        lines.extend(textwrap.wrap(line, width, drop_whitespace=True, expand_tabs=True) or [""])
    return lines


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line, or JSONL (a .jsonl file, or every line a JSON object) with a 'prompt'
    or 'instruction' field (an 'input' field is appended after a blank line, as SFT does with a chat template)."""
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path}: no such file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--prompts-file {path}: the file holds no prompt.")
    if path.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--prompts-file {path}: line {number} is not valid JSON ({error.msg}).") from None
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"--prompts-file {path}: line {number} has no 'prompt' (or 'instruction') string. "
                "Give one prompt per line, or JSON lines with a 'prompt' field."
            )
        extra = row.get("input") or ""
        prompts.append(text + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else ""))
    return prompts


@dataclass
class Prepared:
    """A loaded model with its prompts rendered and encoded in its format."""

    loaded: LoadedModel
    prompt_format: str
    why: str
    prompt_ids: list[list[int]]
    generation_config: GenerationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe generate`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_argument(parser, optional=False)
    source = parser.add_argument_group("prompts")
    source.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", type=Path, help="one prompt per line, or JSONL with a 'prompt' field")
    source.add_argument("--format", choices=FORMATS, help="how prompts are rendered (default: see above)")
    source.add_argument("--system", help="a system message (chat and instruction formats)")
    decoding = add_decoding_flags(
        parser, zero_temperature_greedy=False, seed_help="seed before each prompt, for reproducible sampling"
    )
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--num-beams", type=int, help="beam search with N beams (greedy decoding only)")
    modes = parser.add_argument_group("modes")
    modes.add_argument(
        "--compare", action="store_true", help=f"the prompts under {', '.join(COMPARE_STRATEGIES)}, side by side"
    )
    modes.add_argument("--base", metavar="OTHER_MODEL", help="also generate with OTHER_MODEL, side by side")
    modes.add_argument("--next-token", type=int, metavar="K", help="show the K most likely next tokens instead")
    add_model_flags(parser)


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate every flag before any model is loaded; return the prompts."""
    check_sampling_values(
        args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.max_new_tokens, args.num_beams
    )
    if args.next_token is not None and args.next_token <= 0:
        raise ConfigError(f"--next-token {args.next_token}: must be greater than 0.")
    sampling = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.num_beams not in (None, 1) and sampling:
        raise ConfigError("--num-beams: beam search here is greedy; drop --num-beams or the sampling flags.")
    chosen = (("--compare", args.compare), ("--base", args.base), ("--next-token", args.next_token is not None))
    modes = [flag for flag, on in chosen if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined; pick one.")
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def prepare(
    name: str, prompts: list[str], args: argparse.Namespace, same_format_as: Prepared | None = None
) -> Prepared:
    """Load a model, render and encode the prompts in its format, check they fit, build its generation config.

    With `same_format_as` (the fine-tuned model, when this one is its --base) and no --format, the prompts are
    rendered as for that model when this one can read that format, so that both see the same text.
    """
    from hfpipe.models.trained import load_for_inference

    loaded = load_for_inference(name, args.dtype, args.device, args.trust_remote_code)
    prompt_format, why = pick_format(args.format, loaded.tokenizer, name)
    follow = same_format_as is not None and args.format is None
    if follow and (same_format_as.prompt_format != "chat" or loaded.tokenizer.chat_template):
        prompt_format, why = same_format_as.prompt_format, f"as for {same_format_as.loaded.path}"
    if args.system and prompt_format == "raw":
        raise ConfigError(f"--system: {name} takes raw prompts here; use --format chat or instruction with it.")
    texts = [render_prompt(loaded.tokenizer, prompt, prompt_format, args.system) for prompt in prompts]
    prompt_ids = [encode_prompt(loaded.tokenizer, text, prompt_format) for text in texts]
    context = context_length(loaded.model)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(context)
    if args.next_token is not None:
        max_new_tokens = 1  # only the prompt must fit
    for number, ids in enumerate(prompt_ids, start=1):
        what = "the prompt" if len(prompt_ids) == 1 else f"prompt {number}"
        check_prompt_fits(len(ids), max_new_tokens, context, f"{what} (as rendered for {name}, {prompt_format})")
    config = build_generation_config(
        loaded.model,
        loaded.tokenizer,
        max_new_tokens=max_new_tokens,
        do_sample=True if args.do_sample else None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
    )
    return Prepared(loaded, prompt_format, why, prompt_ids, config)


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Generated ids as text, special tokens (EOS, template markers) left out."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def print_header(prepared: Prepared, decoding: str | None = None) -> None:
    """One line on stderr: the model, the prompt format and the decoding (stdout keeps only generated text)."""
    loaded = prepared.loaded
    source = f"{loaded.path} (adapter on {loaded.base})" if loaded.base else loaded.path
    decoding = decoding or describe_decoding(prepared.generation_config)
    print(f"# {source} | format: {prepared.prompt_format} ({prepared.why}) | {decoding}", file=sys.stderr)


def stream_one(prepared: Prepared, seed: int | None) -> None:
    """Generate for one prompt, printing text as it comes (a raw prompt is printed before its continuation)."""
    from transformers import TextStreamer

    streamer = TextStreamer(
        prepared.loaded.tokenizer, skip_prompt=prepared.prompt_format != "raw", skip_special_tokens=True
    )
    generate_ids(prepared.loaded.model, prepared.prompt_ids[0], prepared.generation_config, streamer, seed)


def print_all(prepared: Prepared, prompts: list[str], seed: int | None) -> None:
    """Generate for each prompt; print the prompt after '>>> ' and the generated text under it."""
    for index, prompt in enumerate(prompts):
        print(f">>> {prompt}\n{complete(prepared, index, seed)}\n", flush=True)


def print_compare(prepared: Prepared, prompts: list[str], seed: int | None, width: int) -> None:
    """Each prompt under every strategy of COMPARE_STRATEGIES, in columns."""
    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
    configs = {label: copy.deepcopy(prepared.generation_config) for label in COMPARE_STRATEGIES}
    for label, settings in COMPARE_STRATEGIES.items():
        configs[label].update(**settings)
    for prompt, ids in zip(prompts, prepared.prompt_ids, strict=True):
        columns = [
            (label, decode(tokenizer, generate_ids(model, ids, config, seed=seed))) for label, config in configs.items()
        ]
        print(f">>> {prompt}\n{side_by_side(columns, width)}\n", flush=True)


def complete(prepared: Prepared, index: int, seed: int | None = None) -> str:
    """The text a prepared model generates after its prompt number `index` (0-based)."""
    loaded = prepared.loaded
    ids = generate_ids(loaded.model, prepared.prompt_ids[index], prepared.generation_config, seed=seed)
    return decode(loaded.tokenizer, ids)


def print_base_comparison(tuned: Prepared, base: Prepared, prompts: list[str], seed: int | None, width: int) -> None:
    """Each prompt answered by the base model and the fine-tuned model, in two columns."""
    for index, prompt in enumerate(prompts):
        columns = [
            (f"{title}: {prepared.loaded.path} ({prepared.prompt_format})", complete(prepared, index, seed))
            for title, prepared in (("base", base), ("fine-tuned", tuned))
        ]
        print(f">>> {prompt}\n{side_by_side(columns, width)}\n", flush=True)


def print_next_tokens(prepared: Prepared, prompts: list[str], k: int) -> None:
    """The K most likely next tokens of each prompt with their probabilities."""
    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
    for prompt, ids in zip(prompts, prepared.prompt_ids, strict=True):
        print(f">>> {prompt}")
        print(f"{'rank':>4}  {'probability':>11}  {'id':>7}  token")
        for rank, (token_id, probability) in enumerate(next_token_probabilities(model, ids, k), start=1):
            print(f"{rank:>4}  {probability:>11.6f}  {token_id:>7}  {tokenizer.decode([token_id])!r}")
        print(flush=True)


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe generate`."""
    from transformers.utils import logging

    prompts = check_args(args)
    logging.disable_progress_bar()  # a weight-loading bar on every run is noise for a command-line tool
    prepared = prepare(args.model, prompts, args)
    print_header(prepared, f"top {args.next_token} next tokens" if args.next_token is not None else None)
    width = shutil.get_terminal_size((160, 24)).columns
    if args.next_token is not None:
        print_next_tokens(prepared, prompts, args.next_token)
    elif args.compare:
        print_compare(prepared, prompts, args.seed, width)
    elif args.base:
        base = prepare(args.base, prompts, args, same_format_as=prepared)
        print_header(base)
        print_base_comparison(prepared, base, prompts, args.seed, width)
    elif len(prompts) == 1:
        stream_one(prepared, args.seed)
    else:
        print_all(prepared, prompts, args.seed)
