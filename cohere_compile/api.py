"""``optimize``: compile a Hugging Face Cohere model in place with our backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .backend import check_activation_memory_budget, make_backend
from .cache import hf_default
from .ops import UnsupportedInputError
from .ops._dispatch import SUPPORTED_DEVICES, SUPPORTED_DTYPES
from .passes import DEFAULT_PASSES
from .passes.manager import validate_pass_names
from .quant.int4 import check_int4_kernel
from .regional import compile_regions
from .training_outputs import drop_training_logits

SUPPORTED_MODEL_TYPES = {"cohere": "CohereForCausalLM / CohereModel (Command R, Command R+, Aya 23 / Expanse)"}


class UnsupportedModelError(TypeError):
    """optimize() was given a model whose architecture our passes do not know."""


@dataclass(frozen=True)
class CompileOptions:
    passes: tuple[str, ...] = DEFAULT_PASSES
    dynamic: bool | None = None
    fullgraph: bool = False
    regional: bool = False
    training_rewrites: bool = False
    activation_memory_budget: float | None = None
    paged_cache: bool = False  # True: HF generate's default cache is a cc.PagedKVCache (cache/hf_default.py)
    inductor: dict[str, Any] = field(default_factory=dict)

    def backend_options(self) -> dict[str, Any]:
        return {"passes": list(self.passes), "training_rewrites": self.training_rewrites,
                "activation_memory_budget": self.activation_memory_budget, **self.inductor}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under wrappers such as peft's ``PeftModel``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_model(model: torch.nn.Module) -> None:
    """Raise a clear error for models, dtypes and devices we have no path for."""
    config = getattr(base_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"'{k}': {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise UnsupportedModelError(
            f"cohere_compile.optimize: {type(model).__name__} (model_type={model_type!r}) is not supported. "
            f"Supported architectures: {supported}. For other models use torch.compile(model) directly."
        )
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        if tensor.device.type not in SUPPORTED_DEVICES:
            raise UnsupportedInputError(
                f"cohere_compile.optimize: parameter '{name}' is on device '{tensor.device.type}'; supported "
                f"devices are {list(SUPPORTED_DEVICES)}. Move the model with model.to('cuda')."
            )
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedInputError(
                f"cohere_compile.optimize: parameter '{name}' has dtype {tensor.dtype}; supported dtypes are "
                f"float32, bfloat16 and float16. Cast the model first, e.g. model.to(torch.bfloat16)."
            )


def optimize(
    model: torch.nn.Module,
    passes: Sequence[str] | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    quantize: str | None = None,
    group_size: int = 128,
    int4_kernel: str = "torchao",
    regional: bool = False,
    keep_training_logits: bool = False,
    training_rewrites: bool = False,
    activation_memory_budget: float | None = None,
    paged_cache: bool = False,
    **inductor_options: Any,
) -> torch.nn.Module:
    """Compile ``model`` in place with the cohere backend and return the same object.

    The model stays a Hugging Face model (``forward``, ``generate``, ``save_pretrained``
    work as before); calls go through ``torch.compile`` with our passes enabled.
    ``passes`` picks rewrites by name (default: ``cohere_compile.DEFAULT_PASSES``; all: ``PASS_NAMES``);
    extra keyword arguments are Inductor config options (e.g. ``max_autotune=True``).
    ``quantize``: ``"int4"`` (torchao int4 weight-only, groups of ``group_size``; the LM head gets
    its own quantized copy, the embedding stays a lookup) or ``"nf4"`` (torchao NF4 base weights
    for QLoRA); applied in place before compiling, see ``cohere_compile.quant``.
    ``int4_kernel`` (with ``quantize="int4"``): ``"torchao"`` (default), ``"triton"``, which swaps
    the same linears for ``Int4TritonLinear`` (our int4 GEMV for decode; opt-in, see quant/int4_triton.py),
    or ``"gemlite"`` (torchao's gemlite-backed int4 tensors; CUDA, fp16, needs gemlite 0.5;
    opt-in: 0.41x bf16 decode on the H200, see quant/int4.py).
    ``regional=True`` compiles one decoder layer and reuses it for all layers (plus the
    final norm and the LM head / loss region) instead of the whole model: compile time
    no longer grows with the number of layers. Recommended for training; see regional.py.
    With the ``linear_cross_entropy`` pass on, training calls with ``labels`` return
    ``logits=None`` so the logits are never materialised (``training_outputs``);
    ``keep_training_logits=True`` keeps them (and the loss is then not fused).
    ``training_rewrites=True`` lets the passes rewrite training (forward+backward) graphs too,
    with our backward kernels and the fused loss; off by default (see passes/manager.py for
    what the H200 measured).
    ``activation_memory_budget`` (training; default None = PyTorch's 1.0): how much of what
    AOTAutograd's partitioner would save for the backward to keep, in [0, 1]; lower recomputes
    more in the backward (cheapest first: casts and pointwise ops, then matmuls). On a CPU LoRA
    model (peft's fp32 adapters on bf16 weights) 0.6 halved the saved activations, recomputing
    only fp32 casts (tests/test_training.py); on the H200 (32-layer LoRA) 0.6 with the training
    rewrites and the fused loss peaked at 27.6 GB, against 46.1 GB by default, at 12.1k tok/s.
    ``paged_cache=True`` (opt-in): a plain ``model.generate(...)``
    (greedy or sampling, no ``past_key_values`` / ``cache_implementation``, ``use_cache`` not
    False) decodes into a ``cc.PagedKVCache`` sized for that call (rows = batch x
    ``num_return_sequences``, per row HF's resolved max length rounded up to 64-token blocks,
    the model's dtype and device) instead of HF's ``DynamicCache``, each step's blocks planned
    before the compiled forward (no graph break). Beam search, assisted
    decoding, contrastive search and DoLa keep HF's cache (they reorder or crop it, which the
    paged cache cannot). Off by default because it measured slower: on the H200 (Aya-8B
    shapes, 16 layers, B1, bench/results/hf_generate_aya-8b_L16.json) ``model.generate`` made
    58.7 tok/s with it against 121.5 with HF's DynamicCache; for fast decoding use
    ``cc.generate``. With ``regional=True`` (a training mode) ``paged_cache=True`` raises: paged
    decoding is built for the whole-model graph (``cc.generate`` refuses regional models too).
    A peft-wrapped model gets it on the HF model inside, whose ``generate`` peft calls. See
    ``cache/hf_default.py``.
    """
    check_model(model)
    if paged_cache and regional:
        raise ValueError(
            "cohere_compile.optimize: paged_cache=True does not combine with regional=True (a training mode; paged "
            "decoding is built for the whole-model graph). Optimize without regional=True for inference, or drop "
            "paged_cache=True (regional models keep Hugging Face's cache)."
        )
    if paged_cache:
        hf_default.hooked_signature(base_model(model))  # an unsupported transformers release fails before compiling
    if group_size != 128 and quantize != "int4":
        raise ValueError(f"group_size={group_size} applies to quantize='int4' only (quantize={quantize!r})")
    check_int4_kernel(int4_kernel, quantize)
    if quantize is not None:
        from .quant import quantize_model

        quantize_model(base_model(model), quantize, group_size=group_size, int4_kernel=int4_kernel)
    options = CompileOptions(
        passes=validate_pass_names(DEFAULT_PASSES if passes is None else passes),
        dynamic=dynamic,
        fullgraph=fullgraph,
        regional=regional,
        training_rewrites=training_rewrites,
        activation_memory_budget=check_activation_memory_budget(activation_memory_budget),
        paged_cache=paged_cache,
        inductor=dict(inductor_options),
    )
    # Before compiling: the regional head region must trace the wrapper (logits never made).
    drop_training_logits(base_model(model), enabled="linear_cross_entropy" in options.passes and not keep_training_logits)
    backend = make_backend(options.backend_options())
    if regional:
        compile_regions(model, backend, dynamic=dynamic, fullgraph=fullgraph)
    else:
        model.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    (hf_default.install if paged_cache else hf_default.uninstall)(base_model(model))
    model._cohere_compile_options = options
    return model


def options_of(model: torch.nn.Module) -> CompileOptions:
    return getattr(model, "_cohere_compile_options", None) or CompileOptions()
