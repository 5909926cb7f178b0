"""``torch.library`` custom ops in the ``cohere::`` namespace.

Importing this package registers them. Each op checks its inputs, runs the Triton
kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``) and the plain-torch
reference on CPU otherwise; each has a fake implementation for tracing.
"""

from . import attention, cross_entropy, int4, norm, paged, rope, swiglu  # noqa: F401  (registration side effects)
from ._dispatch import UnsupportedInputError

OPS = {
    "layer_norm": norm.layer_norm,
    "add3_layer_norm": norm.add3_layer_norm,
    "qk_norm_rope": rope.qk_norm_rope,
    "swiglu": swiglu.swiglu,
    "flash_attention": attention.flash_attention,
    "paged_kv_write": paged.paged_kv_write,
    "paged_gather": paged.paged_gather,
    "paged_attention": paged.paged_attention,
    "linear_cross_entropy": cross_entropy.linear_cross_entropy_op,
    "int4_linear": int4.int4_linear,
    "int4_linear_partials": int4.int4_linear_partials,
}

__all__ = ["OPS", "UnsupportedInputError"]
