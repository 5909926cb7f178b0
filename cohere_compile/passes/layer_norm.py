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


def _search_add3_last(residual, attn, mlp, weight, eps):
    """The final norm: in training its residual sum has no other use, so the joint
    graph has no incoming gradient for it (a different backward from ``_search_add3``)."""
    return cohere_layer_norm(residual + attn + mlp, weight, eps)


def _replace_add3_last(residual, attn, mlp, weight, eps):
    return _replace_add3(residual, attn, mlp, weight, eps)[1]


def _search_first(x, attn, mlp, weight, next_weight, eps):
    """Layer 0's input norm in training when the embeddings need grad. ``x`` also feeds
    the residual sum (already fused into ``add3_layer_norm`` by the stage before), and
    autograd interleaves that gradient with the norm's own partial sums, so the norm's
    backward only matches together with it."""
    out = cohere_layer_norm(x, weight, eps)
    h, next_out = torch.ops.cohere.add3_layer_norm(x, attn, mlp, next_weight, eps)
    return out, h, next_out


def _replace_first(x, attn, mlp, weight, next_weight, eps):
    h, next_out = _replace_add3(x, attn, mlp, next_weight, eps)
    return _replace(x, weight, eps), h, next_out


def _search_first_last(x, attn, mlp, weight, next_weight, eps):
    """``_search_first`` for a one-layer model: the sum feeds only the final norm."""
    out = cohere_layer_norm(x, weight, eps)
    return out, torch.ops.cohere.add3_layer_norm(x, attn, mlp, next_weight, eps)[1]


def _replace_first_last(x, attn, mlp, weight, next_weight, eps):
    return _replace(x, weight, eps), _replace_add3(x, attn, mlp, next_weight, eps)[1]


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
        grad_variants=[("residual", "attn", "mlp", "weight"), ("residual", "attn", "mlp")],
    )
    register(
        fused, _search_add3_last, _replace_add3_last,
        lambda dt: [torch.randn(2, 3, hid, dtype=dt) for _ in range(3)] + [torch.randn(hid, dtype=dt), EPS_PLACEHOLDER],
        scalars={"eps": EPS_PLACEHOLDER}, extra_check=_hidden_norm, inference=False,
        grad_variants=[("residual", "attn", "mlp", "weight"), ("residual", "attn", "mlp")],
    )
    first_inputs = lambda dt: (  # noqa: E731
        [torch.randn(2, 3, hid, dtype=dt) for _ in range(3)] + [torch.randn(hid, dtype=dt) for _ in range(2)]
        + [EPS_PLACEHOLDER]
    )
    for search, replace in ((_search_first, _replace_first), (_search_first_last, _replace_first_last)):
        register(
            plain, search, replace, first_inputs, scalars={"eps": EPS_PLACEHOLDER}, extra_check=_hidden_norm,
            inference=False,
            grad_variants=[("x", "attn", "mlp", "weight", "next_weight"), ("x", "attn", "mlp")],
        )
    register(
        plain, _search, _replace,
        lambda dt: [torch.randn(2, 3, hid, dtype=dt), torch.randn(hid, dtype=dt), EPS_PLACEHOLDER],
        scalars={"eps": EPS_PLACEHOLDER}, extra_check=_hidden_norm,
        grad_variants=[("x", "weight"), ("x",)],
    )
    return [fused, plain]
