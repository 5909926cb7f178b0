"""Regional compilation: one compiled decoder layer reused for every layer.

Compiling the whole model traces and optimizes all N decoder layers as one graph, so
compile time grows with N (about two minutes for a 32-layer 8B training step). Every
``CohereDecoderLayer`` runs the same code with different weights, and Dynamo passes
module parameters as graph inputs (``inline_inbuilt_nn_modules``), so compiling each
layer separately with ONE shared backend compiles the layer once and reuses it.

Regions (all with the same backend, hence the same passes):
  * every ``CohereDecoderLayer`` (``layer.compile``: HF's gradient checkpointing wraps
    the compiled call, so it keeps working);
  * the final ``norm``;
  * the head: ``CohereForCausalLM.forward`` is compiled with the backbone call
    (``CohereModel.forward``) opaque to Dynamo, so what follows it - LM head,
    ``logit_scale`` and the loss - is one graph (where a loss pass can match).
The backbone's own glue (embedding lookup, mask and rotary tables) runs eagerly.
"""

from __future__ import annotations

import torch

REGIONAL_ATTR = "_cohere_regional"


def _cohere_classes():
    from transformers.models.cohere import modeling_cohere as mc

    return mc.CohereDecoderLayer, mc.CohereModel, mc.CohereForCausalLM


def find_regions(model: torch.nn.Module):
    """(heads, backbones, layers) of every Cohere model inside ``model`` (peft wrappers included)."""
    layer_cls, body_cls, head_cls = _cohere_classes()
    mods = list(model.modules())
    return (
        [m for m in mods if isinstance(m, head_cls)],
        [m for m in mods if isinstance(m, body_cls)],
        [m for m in mods if isinstance(m, layer_cls)],
    )


def compile_regions(model: torch.nn.Module, backend, dynamic: bool | None, fullgraph: bool) -> None:
    """Compile ``model``'s regions in place; see the module docstring."""
    heads, bodies, layers = find_regions(model)
    if not layers or not bodies:
        raise ValueError(
            f"cohere_compile.optimize(regional=True): found no CohereDecoderLayer / CohereModel inside "
            f"{type(model).__name__}; regional compilation needs a Hugging Face Cohere model. "
            f"Use regional=False to compile the whole model."
        )
    if any(getattr(m, REGIONAL_ATTR, False) for m in bodies):
        raise ValueError("cohere_compile.optimize(regional=True): this model is already optimized; optimize it once.")
    for layer in layers:
        layer.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    for body in bodies:
        body.norm.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        # Opaque to the head's compile below (its callees, the layers, run their own compiled code).
        body.forward = torch._dynamo.disable(body.forward)
        setattr(body, REGIONAL_ATTR, True)
    for head in heads:
        # An instance attribute, so peft's LoraModel (which calls the base model) and
        # direct ``.forward`` calls both reach the compiled head. It must graph-break
        # at the backbone call, so never fullgraph.
        head.forward = torch.compile(head.forward, backend=backend, dynamic=dynamic)
