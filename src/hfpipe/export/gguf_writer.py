"""HF causal-LM weights and tokenizer -> one GGUF file, with the tensor names, layouts, hyperparameter keys and
per-tensor types llama.cpp's convert_hf_to_gguf.py uses, for GPT-2 and the Llama family (SmolLM2 among them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)
from gguf.quants import quantize
from transformers import PretrainedConfig, PreTrainedModel

from hfpipe.errors import ConfigError
from hfpipe.export.gguf_tokenizer import GGUFVocab, add_vocab

# --type name -> (the type of the 2-D weights, the file type the header declares). 1-D tensors (norms, biases) and
# position embeddings stay float32 whatever the type, as llama.cpp keeps them.
GGUF_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
Q8_0_BLOCK = 32  # values per q8_0 block: a row of another length is written f16 instead, as llama.cpp does
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Architecture:
    """How one HF model type is written: its llama.cpp architecture, what it cannot carry, its hyperparameters,
    and the layout change of a weight (HF name, tensor) -> GGUF layout."""

    arch: MODEL_ARCH
    problem: Callable[[PretrainedConfig], str | None]
    hparams: Callable[[GGUFWriter, PretrainedConfig, int], None]
    layout: Callable[[str, torch.Tensor, PretrainedConfig], torch.Tensor]


def _gpt2_problem(config: PretrainedConfig) -> str | None:
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):  # one function, two implementations
        return f"activation_function {config.activation_function} (llama.cpp's GPT-2 computes the tanh GELU)"
    if config.n_inner not in (None, 4 * config.n_embd):
        return f"n_inner {config.n_inner} (transformers reads GPT-2 GGUFs back with 4 * n_embd)"
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights or config.add_cross_attention:
        return "a non-standard attention (scale_attn_by_inverse_layer_idx, scale_attn_weights or cross-attention)"
    return None


def _gpt2_hparams(writer: GGUFWriter, config: PretrainedConfig, vocab_size: int) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _gpt2_layout(name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    # GPT-2's Conv1D keeps its weights (in, out); GGUF wants them (out, in) like a Linear's.
    if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return tensor.T
    return tensor


def _rope_parameters(config: PretrainedConfig) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama_problem(config: PretrainedConfig) -> str | None:
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        return f"rope scaling '{rope_type}' (only the default rope is written)"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act} (llama.cpp's llama computes silu)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases"
    return None


def _llama_hparams(writer: GGUFWriter, config: PretrainedConfig, vocab_size: int) -> None:
    head_dim = _head_dim(config)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 1e4))))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's rope rotates adjacent pairs, HF's rotates the two halves of a head: reorder each head's rows.
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _llama_layout(name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    if name.endswith("self_attn.q_proj.weight"):
        return _rope_permute(tensor, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return _rope_permute(tensor, config.num_key_value_heads)
    return tensor


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(MODEL_ARCH.GPT2, _gpt2_problem, _gpt2_hparams, _gpt2_layout),
    "llama": Architecture(MODEL_ARCH.LLAMA, _llama_problem, _llama_hparams, _llama_layout),
}
SUPPORTED_ARCHITECTURES = "gpt2 and llama (the Llama family: SmolLM2, TinyLlama, ...)"


def check_architecture(config: PretrainedConfig, where: str) -> Architecture:
    """The Architecture that writes a model of `config`; one line naming what is supported otherwise."""
    architecture = ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise ConfigError(
            f"{where}: model_type {config.model_type} cannot be exported to GGUF; supported: {SUPPORTED_ARCHITECTURES}."
        )
    problem = architecture.problem(config)
    if problem is not None:
        raise ConfigError(f"{where}: this {config.model_type} model has {problem}, which GGUF export does not write.")
    return architecture


def check_type(name: str) -> str:
    """`name` when it is a type of GGUF_TYPES; one line naming them otherwise."""
    if name not in GGUF_TYPES:
        raise ConfigError(f"--type {name}: not a GGUF export type; supported: {', '.join(GGUF_TYPES)}.")
    return name


def tensor_type(gguf_name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type one tensor is stored in (llama.cpp's choice): float32 for 1-D tensors and position embeddings,
    float16 for a q8_0 tensor whose rows do not split into blocks, else `wanted`."""
    if len(shape) == 1 or gguf_name.startswith("position_embd."):
        return GGMLQuantizationType.F32
    if wanted == GGMLQuantizationType.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return GGMLQuantizationType.F16
    return wanted


def encode(gguf_name: str, tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """A float tensor in GGUF type `qtype` (raw bytes for bf16 and q8_0)."""
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == GGMLQuantizationType.F16 and np.abs(values).max(initial=0.0) > FLOAT16_MAX:
        raise ConfigError(
            f"{gguf_name} holds values beyond float16's range ({FLOAT16_MAX:g}); export with --type bf16 or f32."
        )
    return quantize(values, qtype)


def write_gguf(model: PreTrainedModel, vocab: GGUFVocab, path: Path, type_name: str, name: str) -> dict[str, int]:
    """Write `model` (GPT-2 or Llama) and its tokenizer `vocab` to `path` with 2-D weights in `type_name`;
    return how many tensors each GGML type holds."""
    config = model.config
    architecture = check_architecture(config, name)
    wanted, file_type = GGUF_TYPES[type_name]
    vocab_size = model.get_input_embeddings().weight.shape[0]
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[architecture.arch])
    writer.add_name(name)
    architecture.hparams(writer, config, vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    add_vocab(writer, vocab)

    names = get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    counts: Counter[str] = Counter()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the token embeddings: llama.cpp reuses them, and transformers ties them again
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"{name}: the weight {hf_name} has no GGUF name for {config.model_type}.")
        data = architecture.layout(hf_name, tensor, config)
        qtype = tensor_type(gguf_name, tuple(data.shape), wanted)
        writer.add_tensor(gguf_name, encode(gguf_name, data, qtype), raw_dtype=qtype)
        counts[qtype.name] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(counts.most_common())
