"""torchao int4 weight-only configs: the tinygemm layout on CUDA, a plain one on CPU.

CUDA: ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`` packs for
``aten._weight_int4pack_mm`` (tinygemm, asymmetric groups, bf16 only), which ships with torch
itself (the ``plain`` format needs the separate mslk/fbgemm kernels). CPU:
``IntxWeightOnlyConfig(torch.int4, PerGroup)`` keeps int4 values unpacked in int8 and
dequantizes in the graph; it is the CPU-capable path our tests run, not a fast one.
"""

from __future__ import annotations

import torch

from ..ops import UnsupportedInputError

INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_config(device: torch.device, dtype: torch.dtype, group_size: int):
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantize='int4': group_size={group_size} is not supported; use one of {INT4_GROUP_SIZES}")
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise UnsupportedInputError(
                f"quantize='int4' on CUDA uses torchao's tinygemm kernel, which needs bfloat16 weights, "
                f"but the model is {dtype}. Cast it first: model.to(torch.bfloat16)."
            )
        # set_inductor_config=False: torchao would otherwise change global Inductor settings behind our back
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    if device.type == "cpu":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    raise UnsupportedInputError(f"quantize='int4': device '{device.type}' is not supported; use 'cuda' or 'cpu'")
