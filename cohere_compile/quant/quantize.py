"""``quantize_model``: swap a Cohere model's linear weights for torchao 4-bit tensors, in place.

The LM head is tied to the 256k-token embedding. int4 unties it first and quantizes a copy,
so the embedding stays a plain lookup (quantizing the shared tensor would also quantize the
lookup, and a wrongly quantized head makes a model emit only padding). ``int4_kernel="triton"``
swaps those linears for our ``Int4TritonLinear`` modules instead of torchao tensors. NF4 (QLoRA) quantizes
the decoder layers' linears only; the head stays tied and in the model's dtype.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .int4 import check_group_size, check_int4_kernel, gemlite_config, int4_config
from .int4_triton import Int4TritonLinear
from .nf4 import nf4_weight

QUANT_METHODS = ("int4", "nf4")


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give the LM head its own copy of the embedding matrix and stop HF from re-tying them."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) is not torch.Tensor and type(weight) is not torch.nn.Parameter


def _is_quantized_module(module: torch.nn.Module) -> bool:
    return isinstance(module, Int4TritonLinear) or is_quantized(module.weight)


def _replace(model: torch.nn.Module, module: torch.nn.Module, new: torch.nn.Module) -> None:
    """Put ``new`` wherever ``module`` sits in ``model`` (by identity, so any path works)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is module:
                setattr(parent, child_name, new)


def _decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    layers = model.get_decoder().layers
    return [(f"layers.{i}.{n}", m) for i, layer in enumerate(layers)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def _floating_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.is_floating_point())


def quantize_model(model: torch.nn.Module, method: str, group_size: int = 128, progress: bool | None = None,
                   device: torch.device | str | None = None, int4_kernel: str = "torchao"):
    """Quantize ``model`` (a ``CohereForCausalLM``) in place with ``method`` ("int4" or "nf4").

    ``progress``: show a per-layer progress bar (None: only on a terminal). ``device``: move each
    linear there just before quantizing it (so a checkpoint bigger than the GPU in full precision
    can be quantized onto it); the rest of the model stays where it is.
    ``int4_kernel`` (int4 only): ``"torchao"`` (tinygemm on CUDA), ``"triton"``
    (``Int4TritonLinear``: our GEMV for decode, any float dtype, CPU and CUDA) or ``"gemlite"``
    (torchao's gemlite-backed tensors: CUDA, fp16, needs gemlite 0.5).
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quantize={method!r} is not supported; use one of {QUANT_METHODS} or None")
    check_int4_kernel(int4_kernel, method)
    if model.get_output_embeddings() is None:
        raise TypeError(f"quantize={method!r} needs a causal-LM model with an LM head (CohereForCausalLM), "
                        f"got {type(model).__name__}")
    if any("lora_" in name for name, _ in model.named_modules()):
        raise ValueError(f"quantize={method!r}: the model already has LoRA adapters; quantize the base model first "
                         f"(optimize(model, quantize=...) or FastCohereModel.from_pretrained(load_in_4bit=True)), "
                         f"then add adapters with get_peft_model")
    linears = _decoder_linears(model)
    head = model.get_output_embeddings()
    already = [name for name, m in linears + [("lm_head", head)] if _is_quantized_module(m)]
    if already:
        raise ValueError(f"quantize={method!r}: the model is already quantized ({already[0]}); "
                         f"load the unquantized weights instead of quantizing twice")
    disable = None if progress is None else not progress
    if method == "int4":
        from torchao.quantization import quantize_

        weight = _floating_weight(model)
        target = torch.device(device) if device is not None else weight.device
        if int4_kernel == "torchao":
            config = int4_config(target, weight.dtype, group_size)
        elif int4_kernel == "gemlite":
            config = gemlite_config(target, weight.dtype, group_size)
        else:
            check_group_size(group_size)
        targets = linears + [("lm_head", head)]
        for name, module in targets:  # check everything before changing anything
            if module.in_features % group_size:
                raise ValueError(f"quantize='int4': {name} has in_features={module.in_features}, not a multiple of "
                                 f"group_size={group_size}; pick a group_size that divides it")
            if int4_kernel == "triton" and module.bias is not None:
                raise ValueError(f"quantize='int4', int4_kernel='triton': {name} has a bias; only bias-free "
                                 f"linears are supported")
        untie_lm_head(model)
        for name, module in tqdm(targets, desc="int4 quantize", unit="linear", disable=disable):
            module = module.to(device) if device is not None else module
            if int4_kernel == "triton":
                _replace(model, module, Int4TritonLinear.from_linear(module, group_size))
            else:
                quantize_(module, config, filter_fn=None)
    else:
        for name, module in tqdm(linears, desc="nf4 quantize", unit="linear", disable=disable):
            module.weight = nf4_weight(module.weight if device is None else module.weight.to(device), name)
    model._cohere_quantize = method if int4_kernel == "torchao" else f"{method}_{int4_kernel}"
    return model
