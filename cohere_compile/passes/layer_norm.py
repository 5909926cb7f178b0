"""``layer_norm``: CohereLayerNorm -> ``cohere::layer_norm``; where the decoder
layer's parallel residual sum ``residual + attn + mlp`` feeds the next norm, the
two adds and the norm become one ``cohere::add3_layer_norm``.

Only hidden-size norms (1-D weight) are taken: the per-head QK norms (2-D weight)
belong to the ``qk_norm_rope`` pass.
"""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass

from ._patterns import EPS_PLACEHOLDER, meta_val, register

NAME = "layer_norm"


def cohere_layer_norm(x, weight, eps):
    """HF's CohereLayerNorm.forward, verbatim in math and dtypes."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    x = (x - mean) * torch.rsqrt(variance + eps)
    x = weight.to(torch.float32) * x
    return x.to(input_dtype)


def _search_add3(residual, attn, mlp, weight, eps):
    h = residual + attn + mlp
    return h, cohere_layer_norm(h, weight, eps)


def _replace_add3(residual, attn, mlp, weight, eps):
    if isinstance(eps, torch.Tensor):
        return torch.ops.cohere.add3_layer_norm_tensor_eps(residual, attn, mlp, weight, eps)
    return torch.ops.cohere.add3_layer_norm(residual, attn, mlp, weight, eps)


def _search(x, weight, eps):
    return cohere_layer_norm(x, weight, eps)


def _replace(x, weight, eps):
    if isinstance(eps, torch.Tensor):
        return torch.ops.cohere.layer_norm_tensor_eps(x, weight, eps)
    return torch.ops.cohere.layer_norm(x, weight, eps)


def _hidden_norm(match) -> bool:
    return meta_val(match, "weight").dim() == 1


def build() -> list[PatternMatcherPass]:
    """Two stages, in order: fused residual adds first, plain norms after."""
    fused, plain = PatternMatcherPass(pass_name="layer_norm_add3"), PatternMatcherPass(pass_name=NAME)
    hid = 16
    register(
        fused, _search_add3, _replace_add3,
        lambda dt: [torch.randn(2, 3, hid, dtype=dt) for _ in range(3)] + [torch.randn(hid, dtype=dt), EPS_PLACEHOLDER],
        scalars={"eps": EPS_PLACEHOLDER}, extra_check=_hidden_norm,
    )
    register(
        plain, _search, _replace,
        lambda dt: [torch.randn(2, 3, hid, dtype=dt), torch.randn(hid, dtype=dt), EPS_PLACEHOLDER],
        scalars={"eps": EPS_PLACEHOLDER}, extra_check=_hidden_norm,
    )
    return [fused, plain]
