"""``linear_cross_entropy``: Cohere's LM head + ``logits * logit_scale`` + Hugging Face's
causal-LM loss -> ``cohere::linear_cross_entropy`` (chunked; the ``[tokens, vocab]`` logits
and their gradient never exist).

Matched on the joint forward+backward graph (``joint_fwd_bwd`` traces: loss *and* the
gradients of hidden states and LM-head weight are one pattern, replaced by the op and its
``register_autograd`` backward), and on inference graphs (``fwd_only``: eval loss under
``no_grad``). Variants: reduction ``mean`` (no ``num_items_in_batch``) and ``sum`` (HF then
divides by ``num_items_in_batch``; the division stays in the graph), LM-head weight trainable
or frozen (LoRA), fp32 and low-precision graphs. The tied embedding is no special case: the
pattern's weight gradient is one addend of the weight's total gradient.

The label shift (``pad`` + ``[..., 1:]``) stays outside the pattern: the op gets the shifted,
flattened labels. The pattern cannot match while the logits are also a graph output (its
intermediate has an outside user), so a caller who asks for logits gets Inductor's code and
correct logits; ``training_outputs`` drops them from training outputs by default.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch._inductor import config as inductor_config
from torch._inductor.fx_passes.joint_graph import joint_graph_passes
from torch._inductor.pattern_matcher import (
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    gen_pattern_and_search_gm,
    joint_fwd_bwd,
    register_replacement,
)
from torch._inductor.virtualized import V
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ._patterns import _ANY_SIZE, _SHAPE_OPS, SCALE_PLACEHOLDER, TRACE_DTYPES

NAME = "linear_cross_entropy"
IGNORE_INDEX = -100  # HF's default; the literal is part of the pattern
_SCALARS = {"scale": SCALE_PLACEHOLDER}
# Ops whose first argument is a length burned in by the trace (the vocabulary, in the one-hot).
_LENGTH_OPS = (torch.ops.prims.iota.default,)


def cohere_loss(hidden, weight, labels, scale, reduction):
    """CohereForCausalLM.forward's ``lm_head`` + ``* logit_scale`` and ForCausalLMLoss after
    the shift: ``.float()``, ``view(-1, vocab)``, ``cross_entropy(ignore_index=-100)``."""
    logits = F.linear(hidden, weight)
    logits = logits * scale
    logits = logits.float()
    logits = logits.view(-1, logits.shape[-1])
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def _search_mean(hidden, weight, labels, scale):
    return cohere_loss(hidden, weight, labels, scale, "mean")


def _search_sum(hidden, weight, labels, scale):
    return cohere_loss(hidden, weight, labels, scale, "sum")


# dynamic=True: Dynamo lifts the float ``logit_scale`` to a 0-d float64 tensor input and casts it
# to the logits' dtype before the multiply (once in the forward, once in the backward; the
# ``_share_scalar_casts`` stage merges those two casts, as this trace has one).
def _search_mean_tensor_scale(hidden, weight, labels, scale):
    return cohere_loss(hidden, weight, labels, scale.to(hidden.dtype), "mean")


def _search_sum_tensor_scale(hidden, weight, labels, scale):
    return cohere_loss(hidden, weight, labels, scale.to(hidden.dtype), "sum")


def _share_scalar_casts(graph: torch.fx.Graph) -> int:
    """Merge identical casts of one 0-d graph input (CSE for what the patterns read as
    ``scale``). Rewrites nothing else; counts as no rewrite."""
    first: dict = {}
    for node in list(graph.nodes):
        if node.target is not torch.ops.prims.convert_element_type.default:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "placeholder":
            continue
        val = src.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 0:
            continue
        key = (src, node.args[1])
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node
    return 0


def _replacement(reduction: str, grad_hidden: bool, grad_weight: bool):
    def replace(hidden, weight, labels, scale):
        flat = hidden.reshape(-1, hidden.shape[-1])
        op = torch.ops.cohere.linear_cross_entropy
        if isinstance(scale, torch.Tensor):  # dynamic=True: logit_scale is a 0-d tensor input
            op = torch.ops.cohere.linear_cross_entropy_tensor_scale
        loss, _, _ = op(flat, weight, labels, scale, IGNORE_INDEX, reduction, grad_hidden, grad_weight)
        return loss

    replace.__name__ = f"replace_{reduction}_{int(grad_hidden)}{int(grad_weight)}"
    return replace


def _normalize_like_inductor(gm: torch.fx.GraphModule) -> None:
    """Run Inductor's own joint-graph passes on the traced pattern, as they ran on the graph we
    match before ``joint_custom_post_pass``: they rewrite the loss backward's one-hot
    (``scatter`` into zeros -> ``iota == label``) and constant scalars (``full``)."""
    # One fake mode for every value (a fwd_only trace gives each its own): the running
    # compile's when there is one (Inductor's replacements trace in it), else a fresh one.
    fake_mode = detect_fake_mode() or FakeTensorMode()
    with fake_mode:
        args = [
            torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
            if isinstance(v, torch.Tensor) else v
            for v in (n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder")
        ]
    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*args)
    with inductor_config.patch(joint_custom_pre_pass=None, joint_custom_post_pass=None), \
            V.set_fake_mode(fake_mode), fake_mode:
        joint_graph_passes(gm)
    gm.graph.eliminate_dead_code()


def _strict_pattern(search_fn, example_inputs, trace_fn, scalars):
    """Like ``_patterns.strict_pattern`` (shapes are wildcards, every other int exact) for
    either trace, after Inductor's joint-graph normalisation; the one-hot's ``iota(vocab)``
    length is a wildcard too."""
    _, gm = gen_pattern_and_search_gm(search_fn, example_inputs, trace_fn, scalars)
    _normalize_like_inductor(gm)
    for node in gm.graph.nodes:
        if node.target in _SHAPE_OPS:
            node.args = (node.args[0], [_ANY_SIZE] * len(node.args[1]), *node.args[2:])
        elif node.target in _LENGTH_OPS:
            node.args = (_ANY_SIZE, *node.args[1:])
    return fx_to_pattern(
        gm,
        ignore_types=(float, torch.device, torch.dtype),
        argnames=list(inspect.signature(search_fn).parameters),
        scalar_workaround=scalars,
    )


def _inputs(dtype, hidden_grad: bool, weight_grad: bool, tensor_scale: bool):
    hidden = torch.randn(2, 3, 8, dtype=dtype, requires_grad=hidden_grad)
    weight = torch.randn(16, 8, dtype=dtype, requires_grad=weight_grad)
    labels = torch.tensor([1, -100, 3, 4, 15, 0])
    # Dynamo lifts an unspecialised Python float (dynamic=True) to a 0-d float64 tensor
    scale = torch.tensor(SCALE_PLACEHOLDER, dtype=torch.float64) if tensor_scale else SCALE_PLACEHOLDER
    return [hidden, weight, labels, scale]


def _register(patterns, search_fn, replace_fn, trace_fn, hidden_grad, weight_grad, tensor_scale):
    seen = patterns.__dict__.setdefault("_cohere_seen", set())
    scalars = {} if tensor_scale else _SCALARS
    for dtype in TRACE_DTYPES:
        inputs = _inputs(dtype, hidden_grad, weight_grad, tensor_scale)
        pattern = _strict_pattern(search_fn, inputs, trace_fn, scalars)
        key = (weight_grad, str(pattern))
        if key in seen:  # variants that trace alike are registered once
            continue
        seen.add(key)
        register_replacement(
            search_fn, replace_fn, inputs, trace_fn, [patterns],
            scalar_workaround=scalars, search_fn_pattern=pattern,
        )


def build() -> list[PatternMatcherPass]:
    """Training patterns first (weight trainable, then frozen), inference last: a frozen-weight
    pattern cannot take a trainable graph (its grad-logits would have an outside user), and
    an inference pattern cannot take a training graph (its log-probs feed the backward)."""
    train = PatternMatcherPass(pass_name=f"{NAME}_train")
    infer = PatternMatcherPass(pass_name=f"{NAME}_infer")
    searches = (("mean", _search_mean, False), ("sum", _search_sum, False),
                ("mean", _search_mean_tensor_scale, True), ("sum", _search_sum_tensor_scale, True))
    for reduction, search, tensor_scale in searches:
        for trace_fn, hidden_grad, weight_grad, target in (
            (joint_fwd_bwd, True, True, train), (joint_fwd_bwd, True, False, train), (fwd_only, False, False, infer)
        ):
            replace = _replacement(reduction, hidden_grad, weight_grad)
            _register(target, search, replace, trace_fn, hidden_grad, weight_grad, tensor_scale)
    return [_share_scalar_casts, train, infer]
