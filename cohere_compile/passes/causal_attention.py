"""``causal_attention``: attention whose mask is plain causality -> ``cohere::causal_attention``
(SDPA with ``is_causal`` and native GQA: FlashAttention on CUDA). Everything else is left alone.

Under ``torch.compile`` Hugging Face materialises the causal mask even for a prompt with no
``attention_mask`` and no cache, so Inductor runs masked attention (efficient / cuDNN kernels
reading the mask, K/V repeated for GQA) and computes the blocks above the diagonal.
``causal_mask.py`` proves from the graph that such a mask is the causal triangle built from sizes
alone; then the same attention runs as ``is_causal``. On the H200 (Aya-8B shapes, 32 layers,
B1/B4 x 2048 prefill, bench/results/prefill_aya-8b_L32_causal.json) that made the whole forward
8-10% faster than plain ``torch.compile``.

SDPA that already runs ``is_causal`` without a mask (as HF calls it outside ``torch.compile``, e.g.
in a regionally compiled layer) is left as it is: there is nothing to gain.

This is the ``attention`` pass's causal route on its own, without its Triton kernel for other
masks (padding, a cache prefix), which measured slower than Inductor's SDPA. When both passes are
on, this one runs first and ``attention`` takes the remaining (masked) attention.
Inference graphs only: training graphs keep SDPA's forward/backward pair (``attention`` with
``training_rewrites=True`` handles those).
"""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass

from . import attention
from .causal_mask import is_plain_causal

NAME = "causal_attention"


def _rewrite_sdpa(graph: torch.fx.Graph) -> int:
    return attention.rewrite_sdpa(graph, causal_only=True)


def _replace(q, k, v, mask, scaling):
    return torch.ops.cohere.causal_attention(q, k, v, scaling)


def _eager_mask_is_plain_causal(match) -> bool:
    mask = match.kwargs.get("mask")
    return attention._scale_is_float(match) and isinstance(mask, torch.fx.Node) and is_plain_causal(mask)


def build() -> list:
    eager = PatternMatcherPass(pass_name="eager_causal_attention")
    attention.register_eager_patterns(eager, extra_check=_eager_mask_is_plain_causal, replacement=_replace)
    return [_rewrite_sdpa, eager]
