"""Import bitsandbytes 4-bit (``*-bnb-4bit``) checkpoints into torchao NF4, without bitsandbytes.

A bnb 4-bit linear weight ``W`` is stored as (safetensors, what ``QuantState.as_dict(packed=True)``
writes, prefixed ``W.``):
  ``W``                                   uint8 (numel/2, 1): two 4-bit codes per byte, first code in the high nibble
  ``W.absmax``                            uint8 codes of the per-block absmax (fp32 when not double-quantized)
  ``W.quant_map``                         fp32 (16,): the NF4 code book
  ``W.nested_absmax``, ``W.nested_quant_map``   fp32 scale per 256 absmax values, and the 8-bit dynamic code book
  ``W.quant_state.bitsandbytes__nf4``     uint8 JSON: quant_type, blocksize, shape, dtype, nested_blocksize, nested_offset
The absmax of block ``b`` is ``nested_quant_map[absmax[b]] * nested_absmax[b // nested_blocksize] + nested_offset``.

torchao's ``NF4Tensor`` uses the same packing (flattened weight, blocks of ``block_size``, high
nibble first) and keeps a code book tensor, so the 4-bit codes and bnb's exact code book move over
bit for bit: no weight is dequantized or requantized. Only the per-block absmax (1/64 of the
weights, metadata) is decoded to float and re-encoded with torchao's own double quantization
(``NF4Tensor.double_quantize_scalers``), since bnb's 8-bit dynamic code book has no counterpart
in torchao's linear int8 scalers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .nf4 import scaler_block_size
from .quantize import is_quantized

QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class BnbCheckpointError(ValueError):
    """A bitsandbytes checkpoint we cannot map onto torchao NF4 (named in the message)."""


def is_bnb_4bit(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def _quant_state(name: str, tensors: dict[str, torch.Tensor]) -> dict:
    packed = tensors.get(f"{name}.quant_state.bitsandbytes__nf4")
    if packed is None:
        fp4 = f"{name}.quant_state.bitsandbytes__fp4" in tensors
        raise BnbCheckpointError(
            f"'{name}': {'FP4' if fp4 else 'no'} bitsandbytes quant state found; only NF4 "
            f"(bnb_4bit_quant_type='nf4') checkpoints map onto torchao NF4"
        )
    return json.loads(bytes(packed.cpu().numpy().tolist()).decode("utf-8"))


def decode_absmax(name: str, tensors: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    """Per-block absmax in fp32, undoing bnb's double quantization if there is one."""
    absmax = tensors[f"{name}.absmax"]
    if f"{name}.nested_absmax" not in tensors:
        return absmax.float()
    code = tensors[f"{name}.nested_quant_map"].float()
    nested = tensors[f"{name}.nested_absmax"].float()
    block = int(state["nested_blocksize"])
    values = code[absmax.long()]
    scale = nested.repeat_interleave(block)[: values.numel()]  # last nested block may be partial
    return values * scale + float(state["nested_offset"])


def bnb_to_nf4(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device) -> torch.nn.Parameter:
    """One bnb NF4 weight (and its quant state) as a frozen torchao ``NF4Tensor`` parameter."""
    from torchao.quantization import NF4Tensor
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

    state = _quant_state(name, tensors)
    if state.get("quant_type") != "nf4":
        raise BnbCheckpointError(f"'{name}': quant_type={state.get('quant_type')!r}; only 'nf4' is supported")
    shape = torch.Size(state["shape"])
    block = int(state["blocksize"])
    numel = shape.numel()
    if numel % block or numel % 2:
        raise BnbCheckpointError(f"'{name}': {numel} weights are not a whole number of {block}-blocks")
    # bnb_4bit_quant_storage other than uint8 (e.g. bf16, for FSDP) is the same bytes viewed as another dtype
    packed = tensors[name].reshape(-1).view(torch.uint8).to(device)
    if packed.numel() != numel // 2:
        raise BnbCheckpointError(f"'{name}': expected {numel // 2} packed bytes for shape {tuple(shape)}, "
                                 f"got {packed.numel()}")
    n_blocks = numel // block
    absmax = decode_absmax(name, tensors, state).to(device)
    if absmax.numel() != n_blocks:
        raise BnbCheckpointError(f"'{name}': {absmax.numel()} absmax values for {n_blocks} blocks")
    sblock = scaler_block_size(n_blocks)
    # block_size=1 makes torchao's block absmax the identity: this is torchao's own encoding of these values
    scalers, factor, mean = NF4Tensor.double_quantize_scalers(absmax.to(dtype), 1, sblock)
    meta = SubclassTensorArgs(shape, torch.empty(shape, device="meta").stride(), 0, dtype, torch.device(device), False)
    nf4 = NF4Tensor(meta, block, n_blocks, sblock, scalers, factor, mean, packed.contiguous(),
                    tensors[f"{name}.quant_map"].to(device, dtype))
    return torch.nn.Parameter(nf4, requires_grad=False)


def checkpoint_files(model_name: str, token=None) -> list[Path]:
    path = Path(model_name)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_name, token=token, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BnbCheckpointError(f"{model_name}: no *.safetensors files (bitsandbytes checkpoints are safetensors)")
    return files


def load_bnb_4bit(model_name: str, config, dtype: torch.dtype, device, token=None, progress: bool | None = None):
    """Build a ``CohereForCausalLM`` from a bnb 4-bit checkpoint: linears as NF4, the rest in ``dtype``."""
    from safetensors import safe_open
    from transformers import CohereForCausalLM

    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CohereForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(model_name, token):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    expected = dict(model.named_parameters(remove_duplicate=False))
    disable = None if progress is None else not progress
    state, unexpected = {}, []
    for key in tqdm(sorted(tensors), desc="load bnb-4bit", unit="tensor", disable=disable):
        if any(key.endswith("." + s) for s in QUANT_SUFFIXES):
            continue
        if key not in expected:
            unexpected.append(key)
        elif f"{key}.absmax" in tensors:
            state[key] = bnb_to_nf4(key, tensors, dtype, device)
        else:
            state[key] = torch.nn.Parameter(tensors[key].to(device, dtype), requires_grad=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    if unexpected or missing:
        raise BnbCheckpointError(f"{model_name}: checkpoint does not match CohereForCausalLM "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        setattr(model.get_submodule(module_name), attr, value)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (RoPE frequencies) were built on meta: build them for real
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise BnbCheckpointError(f"{model_name}: '{name}' was not loaded")
    for p in model.parameters():  # like from_pretrained: plain weights trainable, 4-bit ones frozen
        p.requires_grad_(not is_quantized(p))
    model._cohere_quantize = "nf4"
    return model.eval()
