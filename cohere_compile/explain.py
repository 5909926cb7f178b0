"""``explain``: which subgraphs our passes rewrote, and where Dynamo broke the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .api import base_model, check_model, options_of
from .backend import make_backend
from .passes import PASS_NAMES, recording
from .training_outputs import ForwardWithoutTrainingLogits


def _is_paged_decode(args, kwargs) -> bool:
    from .cache import PagedKVCache

    ids = kwargs.get("input_ids", args[0] if args else None)
    length = ids.shape[-1] if ids is not None else kwargs["inputs_embeds"].shape[1]
    return isinstance(kwargs.get("past_key_values"), PagedKVCache) and length == 1


def _is_plain_prompt(kwargs) -> bool:
    """No ``attention_mask`` and nothing cached: HF builds the causal mask from sizes alone."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("attention_mask") is None and (cache is None or cache.get_seq_length() == 0)


def expected_rewrites(config, args=(), kwargs=None, enabled=(), training=False) -> dict[str, int]:
    """What a complete rewrite of one forward graph of a Cohere model gives for these inputs
    (``paged_attention`` only has work on a decode step over a ``PagedKVCache``;
    ``causal_attention`` on a prompt without mask or cache, and then, when it is enabled,
    ``attention`` has none; training graphs leave it to ``attention``)."""
    kwargs = kwargs or {}
    layers = config.num_hidden_layers
    paged_decode = _is_paged_decode(args, kwargs)
    causal = layers if not training and not paged_decode and _is_plain_prompt(kwargs) else 0
    return {"qk_norm_rope": layers, "causal_attention": causal,
            "attention": layers - causal if "causal_attention" in enabled else layers,
            "paged_attention": layers if paged_decode else 0,
            "swiglu": layers, "layer_norm": layers + 1, "linear_cross_entropy": 0}


@dataclass
class Explanation:
    matches: dict[str, int]
    expected: dict[str, int]
    enabled: tuple[str, ...]
    graphs: int
    graph_breaks: int
    recompiles: int
    break_reasons: list[str] = field(default_factory=list)

    @property
    def missing(self) -> dict[str, int]:
        """Enabled passes that rewrote fewer subgraphs than the model has (a bug to report)."""
        return {
            name: self.expected.get(name, 0) - self.matches.get(name, 0)
            for name in self.enabled
            if self.matches.get(name, 0) < self.expected.get(name, 0)
        }

    def __str__(self) -> str:
        lines = [f"{'pass':<22}{'enabled':>8}{'rewrites':>10}{'expected':>10}  status"]
        for name in PASS_NAMES:
            on = name in self.enabled
            got, want = self.matches.get(name, 0), self.expected.get(name, 0)
            status = "-" if not on else "ok" if got == want else "MISSING" if got < want else "extra"
            lines.append(f"{name:<22}{'yes' if on else 'no':>8}{got:>10}{want:>10}  {status}")
        lines.append(f"graphs: {self.graphs}  graph breaks: {self.graph_breaks}  recompiles: {self.recompiles}")
        lines += [f"  break: {reason}" for reason in self.break_reasons]
        return "\n".join(lines)


def explain(model: torch.nn.Module, *args, **kwargs) -> Explanation:
    """Compile ``model`` for these inputs (caches off, so counts are real) and report
    the rewrites per pass summed over the compiled graphs, plus Dynamo's graph breaks.
    Runs under ``torch.no_grad()`` unless the model is in training mode."""
    check_model(model)
    options = options_of(model)
    if options.regional:
        raise ValueError(
            "cc.explain compiles the whole model and cannot report on a model optimized with regional=True "
            "(its layers are already compiled separately). Call cc.explain on the model before optimizing it, "
            "or on a copy optimized with regional=False."
        )
    backend = make_backend(options.backend_options())
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return backend(gm, example_inputs)

    grad = torch.enable_grad() if model.training else torch.no_grad()
    with grad, recording() as graphs, torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(model.forward, backend=counting_backend, dynamic=options.dynamic)
        compiled(*args, **kwargs)
        dynamo_report = torch._dynamo.explain(model.forward)(*args, **kwargs)
    matches = {name: sum(g.get(name, 0) for g in graphs) for name in PASS_NAMES}
    n_graphs = len(calls)
    breaks = int(dynamo_report.graph_break_count)
    expected = expected_rewrites(base_model(model).config, args, kwargs, options.passes, model.training)
    if model.training and not options.training_rewrites and any(p.requires_grad for p in model.parameters()):
        expected = {name: 0 for name in expected}  # training graphs are left to Inductor (opt-in)
    # The loss is fused where the graph computes it without returning logits: a training
    # call with labels through optimize's forward wrapper (training_outputs).
    expected["linear_cross_entropy"] = int(
        model.training and kwargs.get("labels") is not None
        and isinstance(base_model(model).__dict__.get("forward"), ForwardWithoutTrainingLogits)
    )
    return Explanation(
        matches=matches,
        expected=expected,
        enabled=options.passes,
        graphs=n_graphs,
        graph_breaks=breaks,
        recompiles=max(0, n_graphs - (breaks + 1)),
        break_reasons=[str(getattr(r, "reason", r)) for r in dynamo_report.break_reasons],
    )
