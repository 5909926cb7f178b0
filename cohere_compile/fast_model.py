"""``FastCohereModel``: the loader / trainer API of the fast-fine-tuning world for Cohere models.

    model, tok = cc.FastCohereModel.from_pretrained(path, max_seq_length=8192, load_in_4bit=True)
    model = cc.FastCohereModel.get_peft_model(model, r=16)     # QLoRA: LoRA on NF4 base weights
    cc.FastCohereModel.for_training(model); ...; cc.FastCohereModel.for_inference(model)

4-bit here means torchao NF4 (``cohere_compile.quant``); ``*-bnb-4bit`` checkpoints are imported
into it without bitsandbytes (``quant/bnb.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .api import SUPPORTED_MODEL_TYPES, UnsupportedModelError, base_model
from .seq_limit import enforce_max_seq_length

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROPE_TYPES = ("linear", "dynamic")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEVICE_MAPS = ("sequential", "auto", "cpu", "cuda")


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, fp16 on older GPUs, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device_map) -> torch.device:
    """One device for the whole model: "sequential" / "auto" mean the first GPU if there is one, else CPU.
    (Sharding one model over several GPUs is not implemented.)"""
    if isinstance(device_map, torch.device):
        return device_map
    if not isinstance(device_map, str) or not (device_map in DEVICE_MAPS or device_map.startswith("cuda:")):
        raise ValueError(f"device_map={device_map!r} is not supported; use one of {DEVICE_MAPS}, 'cuda:N' or a "
                         f"torch.device (the whole model goes to one device)")
    if device_map in ("sequential", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device_map.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} but CUDA is not available; use device_map='cpu'")
    return torch.device(device_map)


def rope_parameters(config, max_seq_length: int, rope_scaling: dict | None) -> dict | None:
    """The ``rope_parameters`` HF's own rope-init functions should use, or None to keep the checkpoint's.

    Explicit ``rope_scaling`` wins; otherwise a ``max_seq_length`` past ``max_position_embeddings``
    gets linear scaling by their ratio. ``max_position_embeddings`` stays the original length
    (dynamic NTK measures its growth from it)."""
    theta = config.rope_parameters["rope_theta"]
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict like {{'type': 'linear', 'factor': 2.0}}, got {rope_scaling!r}")
        kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
        factor = rope_scaling.get("factor")
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {ROPE_TYPES}")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
        return {"rope_type": kind, "factor": float(factor), "rope_theta": theta}
    if max_seq_length > config.max_position_embeddings:
        return {"rope_type": "linear", "factor": max_seq_length / config.max_position_embeddings, "rope_theta": theta}
    return None


def prepare_tokenizer(tokenizer, config) -> None:
    """Training needs a pad token distinct from nothing and right padding: take the config's pad id,
    else the unk / eos token, and keep ``config.pad_token_id`` in step."""
    if tokenizer.pad_token is None:
        pad_id = config.pad_token_id
        if pad_id is not None and pad_id < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError("fix_tokenizer=True: the tokenizer has no pad, unk or eos token to pad with; add one")
    config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FastCohereModel:
    """Namespace of static methods (like the fast-fine-tuning libraries' ``FastLanguageModel``)."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int = 4096,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool = True,
        token: str | None = None,
        device_map: Any = "sequential",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        progress: bool | None = None,
    ):
        """Load a Cohere causal LM (hub id or local path) and its tokenizer: ``(model, tokenizer)``.

        ``dtype=None`` picks bf16 on bf16-capable GPUs, fp16 on older GPUs, fp32 on CPU.
        ``load_in_4bit`` stores the decoder linears as torchao NF4 (quantized layer by layer on the
        target device); a ``*-bnb-4bit`` checkpoint is imported into NF4 directly.
        ``max_seq_length`` is enforced: longer inputs raise ``SequenceTooLongError`` (seq_limit.py).
        """
        from transformers import AutoConfig, AutoTokenizer, CohereForCausalLM

        from .quant import quantize_model
        from .quant.bnb import is_bnb_4bit, load_bnb_4bit

        _check_positive_int("max_seq_length", max_seq_length)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use None (auto), torch.bfloat16, float16 or float32")
        if not isinstance(load_in_4bit, bool):
            raise ValueError(f"load_in_4bit must be True or False, got {load_in_4bit!r}")
        device = resolve_device(device_map)
        dtype = dtype or auto_dtype(device)

        config = AutoConfig.from_pretrained(model_name, token=token)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"FastCohereModel: {model_name} is a '{config.model_type}' model "
                f"({', '.join(getattr(config, 'architectures', None) or [])}); supported: "
                f"{'; '.join(f'{k!r}: {v}' for k, v in SUPPORTED_MODEL_TYPES.items())}"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token)  # before the (slow) weights
        tokenizer.model_max_length = max_seq_length
        rope = rope_parameters(config, max_seq_length, rope_scaling)
        if rope is not None:
            config.rope_parameters = rope
            config.validate_rope()

        if is_bnb_4bit(config):
            if not load_in_4bit:
                raise ValueError(f"{model_name} is a bitsandbytes 4-bit checkpoint; it loads only with "
                                 f"load_in_4bit=True (we import its NF4 blocks, we do not dequantize them)")
            model = load_bnb_4bit(model_name, config, dtype, device, token=token, progress=progress)
        else:
            # load on CPU, then quantize layer by layer on the target device: the full-precision model
            # never has to fit on the GPU
            model = CohereForCausalLM.from_pretrained(model_name, config=config, dtype=dtype, token=token)
            if load_in_4bit:
                quantize_model(model, "nf4", progress=progress, device=device)
            model.to(device)
        model.eval()
        enforce_max_seq_length(model, max_seq_length)  # longer inputs raise SequenceTooLongError

        if fix_tokenizer:
            prepare_tokenizer(tokenizer, model.config)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: torch.nn.Module,
        r: int = 16,
        target_modules: Sequence[str] = LORA_TARGETS,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool = True,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: Sequence[str] | None = None,
        **lora_kwargs: Any,
    ):
        """Add LoRA adapters with peft (frozen base, NF4 or not); returns peft's ``PeftModel``."""
        from peft import LoraConfig, get_peft_model

        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"get_peft_model: {type(model).__name__} is not a Cohere model")
        if any("lora_" in n for n, _ in model.named_modules()):
            raise ValueError("get_peft_model: the model already has LoRA adapters")
        _check_positive_int("r", r)
        if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={bias!r}: use 'none', 'all' or 'lora_only'")
        if not isinstance(use_gradient_checkpointing, bool):
            raise ValueError(f"use_gradient_checkpointing must be True or False, got {use_gradient_checkpointing!r}")
        if isinstance(target_modules, str) or not target_modules:
            raise ValueError(f"target_modules must be a non-empty list of names from {LORA_TARGETS}, "
                             f"got {target_modules!r}")
        unknown = sorted(set(target_modules) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"target_modules: unknown {unknown}; pick from {LORA_TARGETS}")

        torch.manual_seed(random_state)
        lora = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                          target_modules=list(target_modules), use_rslora=use_rslora, task_type="CAUSAL_LM",
                          modules_to_save=list(modules_to_save) if modules_to_save else None, **lora_kwargs)
        model._cohere_gradient_checkpointing = use_gradient_checkpointing
        peft_model = get_peft_model(model, lora)
        return FastCohereModel.for_training(peft_model)

    @staticmethod
    def for_training(model: torch.nn.Module) -> torch.nn.Module:
        """Training mode: dropout on, KV cache off, gradient checkpointing as ``get_peft_model`` asked."""
        hf = base_model(model)
        model.train()
        hf.config.use_cache = False
        if getattr(hf, "_cohere_gradient_checkpointing", False):
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    @staticmethod
    def for_inference(model: torch.nn.Module) -> torch.nn.Module:
        """Inference mode: eval, KV cache on, gradient checkpointing off."""
        hf = base_model(model)
        model.eval()
        hf.config.use_cache = True
        if hf.is_gradient_checkpointing:
            hf.gradient_checkpointing_disable()
        return model
