"""torchao int4 weight-only configs: the tinygemm layout on CUDA, a plain one on CPU, and
gemlite's Triton kernels on CUDA (opt-in, ``int4_kernel="gemlite"``).

CUDA: ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`` packs for
``aten._weight_int4pack_mm`` (tinygemm, asymmetric groups, bf16 only), which ships with torch
itself (the ``plain`` format needs the separate mslk/fbgemm kernels). CPU:
``IntxWeightOnlyConfig(torch.int4, PerGroup)`` keeps int4 values unpacked in int8 and
dequantizes in the graph; it is the CPU-capable path our tests run, not a fast one.
gemlite (``int4_kernel="gemlite"``): torchao's ``UIntxWeightOnlyConfig`` (prototype), HQQ-fitted
asymmetric groups packed for gemlite's Triton GEMV / GEMM (``gemlite::forward_functional``, a
custom op, so it compiles and CUDA-graphs); fp16 models only, gemlite 0.5. Added because tinygemm
reads int4 at only ~1.5 TB/s at batch 1 on the H200, but there gemlite decoded at 0.36 TB/s
(84.6 tok/s, 0.41x bf16; bench/results/quant_aya-8b_L32_decode_gemlite.json).
"""

from __future__ import annotations

import torch

from ..ops import UnsupportedInputError

INT4_GROUP_SIZES = (32, 64, 128, 256)
# how int4 linears run: torchao tinygemm (default), our Triton GEMV (quant/int4_triton.py), gemlite
INT4_KERNELS = ("torchao", "triton", "gemlite")


def check_int4_kernel(int4_kernel: str, quantize: str | None) -> None:
    if int4_kernel not in INT4_KERNELS:
        raise ValueError(f"int4_kernel={int4_kernel!r} is not supported; use one of {INT4_KERNELS}")
    if int4_kernel != "torchao" and quantize != "int4":
        raise ValueError(f"int4_kernel={int4_kernel!r} applies to quantize='int4' only (quantize={quantize!r})")


def check_group_size(group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantize='int4': group_size={group_size} is not supported; use one of {INT4_GROUP_SIZES}")


def gemlite_config(device: torch.device, dtype: torch.dtype, group_size: int):
    """torchao's gemlite-backed int4 weight-only config, with clear errors where it cannot run."""
    check_group_size(group_size)
    if device.type != "cuda":
        raise UnsupportedInputError(
            f"quantize='int4', int4_kernel='gemlite' runs gemlite's Triton kernels on CUDA only, but the model is on "
            f"'{device.type}'; move it to a GPU first, or use int4_kernel='torchao' (the default) on CPU"
        )
    if dtype != torch.float16:
        # torchao's gemlite path builds fp16 scales, so gemlite's kernels compute in fp16 and a bf16
        # activation fails inside Triton ("Both operands must be same dtype", seen on the H200)
        raise UnsupportedInputError(
            f"quantize='int4', int4_kernel='gemlite' needs float16 weights (torchao's gemlite tensors compute "
            f"in fp16), but the model is {dtype}; cast it first: model.half(), or use int4_kernel='torchao' "
            f"for a bf16 model"
        )
    try:
        import gemlite  # noqa: F401
    except ImportError as e:
        raise ImportError("quantize='int4', int4_kernel='gemlite' needs the gemlite package: "
                          "pip install 'cohere_compile[gemlite]' (or pip install gemlite)") from e
    _check_gemlite_version()
    from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise change global Inductor settings behind our back
    return UIntxWeightOnlyConfig(group_size=group_size, bit_width=4, set_inductor_config=False)


def _check_gemlite_version() -> None:
    """torchao <= 0.18 unpacks three tensors from gemlite's layers; gemlite 0.6 returns four
    (a meta scale), and quantizing then dies deep inside torchao. Say so up front."""
    from importlib.metadata import version

    import torchao

    gemlite_version, torchao_version = version("gemlite"), torchao.__version__
    if _major_minor(gemlite_version) >= (0, 6) and _major_minor(torchao_version) <= (0, 18):
        raise ImportError(
            f"quantize='int4', int4_kernel='gemlite': torchao {torchao_version} works with gemlite 0.5, but gemlite "
            f"{gemlite_version} is installed (its layers changed in 0.6); pip install 'gemlite>=0.5,<0.6'"
        )


def _major_minor(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def int4_config(device: torch.device, dtype: torch.dtype, group_size: int):
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    check_group_size(group_size)
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
