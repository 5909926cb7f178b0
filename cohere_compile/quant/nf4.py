"""NF4 base weights (torchao ``NF4Tensor``) for QLoRA: frozen, dequantized inside ``F.linear``."""

from __future__ import annotations

import math

import torch

NF4_BLOCK = 64  # QLoRA's block: one absmax per 64 weights
NF4_SCALER_BLOCK = 256  # absmax values double-quantized in groups of up to 256


def scaler_block_size(n_blocks: int) -> int:
    """torchao needs the number of absmax blocks divisible by the scaler block: take the largest
    power-of-two divisor up to 256 (256 for every real Cohere shape, smaller only for tiny test models)."""
    return math.gcd(n_blocks, NF4_SCALER_BLOCK)


def nf4_weight(weight: torch.Tensor, name: str = "weight") -> torch.nn.Parameter:
    from torchao.quantization import to_nf4

    if weight.numel() % NF4_BLOCK:
        raise ValueError(
            f"quantize='nf4': '{name}' has {weight.numel()} elements, not a multiple of the NF4 block ({NF4_BLOCK})"
        )
    n_blocks = weight.numel() // NF4_BLOCK
    nf4 = to_nf4(weight.detach().contiguous(), NF4_BLOCK, scaler_block_size(n_blocks))
    return torch.nn.Parameter(nf4, requires_grad=False)
