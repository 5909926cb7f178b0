"""4-bit weights through torchao: int4 weight-only for inference, NF4 base weights for QLoRA,
and the import of bitsandbytes 4-bit checkpoints into torchao NF4 (``bnb.py``)."""

from .int4 import INT4_GROUP_SIZES, INT4_KERNELS, gemlite_config, int4_config
from .int4_triton import Int4TritonLinear, quantize_int4
from .nf4 import nf4_weight
from .quantize import QUANT_METHODS, is_quantized, quantize_model, untie_lm_head

__all__ = [
    "QUANT_METHODS",
    "INT4_GROUP_SIZES",
    "INT4_KERNELS",
    "Int4TritonLinear",
    "quantize_int4",
    "quantize_model",
    "untie_lm_head",
    "is_quantized",
    "int4_config",
    "gemlite_config",
    "nf4_weight",
]
