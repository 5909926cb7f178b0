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
  * the head: ``CohereForCausalLM.forward`` - LM head, ``logit_scale`` and the loss - is
    one graph that starts at the backbone's output (where a loss pass can match).
The backbone's own glue (embedding lookup, mask and rotary tables) runs eagerly.

The head without a graph break: a call to the head first runs the backbone eagerly (its
layers compiled) with the arguments HF's forward hands it, then the compiled head, in
which ``self.model(...)`` returns that output (``BackboneSlot``). A graph break at the
backbone call instead would make the logits an output of the continuation graph, before the
``logits=None`` wrapper (training_outputs.py) could drop them, and the fused loss could
never fire.
"""

from __future__ import annotations

import inspect

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
        body.forward = BackboneSlot(body.forward)
        setattr(body, REGIONAL_ATTR, True)
    for head in heads:
        # An instance attribute, so peft's LoraModel (which calls the base model) and
        # direct ``.forward`` calls both reach the compiled head.
        compiled = torch.compile(head.forward, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        head.forward = RegionalHead(head, compiled)


class BackboneSlot:
    """``CohereModel.forward`` in regional mode. Called on its own: the eager backbone (its
    layers run their compiled code), opaque to Dynamo. Inside a ``RegionalHead`` call: the
    output computed just before, so the compiled head traces no backbone and no graph break."""

    def __init__(self, eager_forward):
        self.eager_forward = torch._dynamo.disable(eager_forward)
        self.output = None

    def __call__(self, *args, **kwargs):
        if self.output is not None:
            return self.output
        return self.eager_forward(*args, **kwargs)


class RegionalHead:
    """``CohereForCausalLM.forward`` in regional mode: the backbone, then the compiled head."""

    def __init__(self, head: torch.nn.Module, compiled_forward):
        self.head, self.compiled_forward = head, compiled_forward
        self.signature = inspect.signature(type(head).forward)
        self.__signature__ = inspect.signature(compiled_forward)  # HF Trainer reads forward's signature
        # read once: the backbone's named parameters and the name of the head's **kwargs
        self.backbone_params = set(inspect.signature(type(head.model).forward).parameters) - {"self", "kwargs"}
        self.var_kwargs = next((n for n, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def backbone_arguments(self, args, kwargs) -> dict:
        """What HF's ``CohereForCausalLM.forward`` passes to ``self.model``: the backbone's own
        named parameters, plus the extra ``**kwargs`` (``labels`` / ``logits_to_keep`` stay)."""
        bound = self.signature.bind(self.head, *args, **kwargs).arguments
        extra = dict(bound.get(self.var_kwargs, {}))
        # HF's @can_return_tuple takes return_dict off before the forward runs: its backbone
        # call never sees it (and must return a ModelOutput, not a tuple)
        extra.pop("return_dict", None)
        return {**{n: v for n, v in bound.items() if n in self.backbone_params}, **extra}

    def __call__(self, *args, **kwargs):
        slot = self.head.model.forward
        slot.output = slot.eager_forward(**self.backbone_arguments(args, kwargs))
        try:
            return self.compiled_forward(*args, **kwargs)
        finally:
            slot.output = None
