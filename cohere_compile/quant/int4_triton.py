"""Opt-in int4 backend: ``Int4TritonLinear``, an ``nn.Linear`` replacement whose forward is the
one opaque op ``cohere::int4_linear`` (our Triton GEMV at decode sizes, see ``ops/int4.py``).

Quantization is torchao's tinygemm math (asymmetric, groups of ``group_size`` along in_features,
float zero point), written out in plain torch because torchao exposes it only through private
helpers; ``tests/test_int4_triton.py`` checks it bit for bit against those helpers.
"""

from __future__ import annotations

import torch

from ..ops.int4 import MID, pack_int4


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> ``(packed uint8 [N, K // 2], scales, zeros [N, K // group_size])``.

    As torchao's ``_choose_qparams_affine_tinygemm`` + ``_quantize_affine_tinygemm`` (0..15,
    computed in the weight's dtype, scale clamped at its smallest normal): ``scale = (max - min) / 15``,
    ``zero = min + 8 * scale``, ``q = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"quantize_int4: in_features={k} is not a multiple of group_size={group_size}")
    w = weight.detach().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(w.dtype).smallest_normal)
    zero = lo + scale * MID
    q = ((w - (zero - scale * MID)[..., None]) / scale[..., None]).round().clamp(0, 15)
    return pack_int4(q.reshape(n, k).to(torch.uint8)), scale.contiguous(), zero.contiguous()


class Int4TritonLinear(torch.nn.Module):
    """A bias-free linear layer with int4 weights in our GEMV layout (buffers, not parameters:
    nothing here trains). ``forward`` calls ``torch.ops.cohere.int4_linear``."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int) -> "Int4TritonLinear":
        if linear.bias is not None:
            raise ValueError("Int4TritonLinear: the linear has a bias; only bias-free linears (all of Cohere's) "
                             "are supported")
        w = linear.weight
        if not w.is_floating_point() or type(w) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(f"Int4TritonLinear: expected a plain floating weight, got {type(w).__name__} {w.dtype}; "
                             f"quantize from the unquantized model")
        module = cls(linear.in_features, linear.out_features, group_size, dtype=w.dtype, device=w.device)
        packed, scales, zeros = quantize_int4(w, group_size)
        module.packed.copy_(packed)
        module.scales.copy_(scales)
        module.zeros.copy_(zeros)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.cohere.int4_linear(x, self.packed, self.scales, self.zeros, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight this layer computes with (for references and tests)."""
        from ..ops.int4 import dequantize_int4

        return dequantize_int4(self.packed, self.scales, self.zeros, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
