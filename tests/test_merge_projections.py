"""``cc.generate(merge_projections=True)``: each layer's q/k/v/gate/up weights share one buffer
(``colocate.py``) and the ``merge_projections`` pass computes them as one matmul. The pass on
both graph forms it knows (checked by value), its refusals, and end to end against eager HF."""

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import cohere_compile as cc
from cohere_compile.colocate import all_colocated, ensure_colocated
from cohere_compile.passes import recording
from cohere_compile.passes.merge_projections import merge_projections
from conftest import make_model, tiny_config

aten = torch.ops.aten
ROWS = (128, 32, 32)  # q, k, v of a GQA layer


def gemv_decomposed(x, w):
    """Inductor's GEMV decomposition (what a one-row CUDA decode graph holds), written out."""
    x2 = x.view(-1, x.shape[-1]).to(torch.float32)
    return (x2.unsqueeze(2) * w.permute(1, 0).to(torch.float32).unsqueeze(0)).sum([1]).to(x.dtype).view(1, 1, -1)


def mm_form(x, w):
    return torch.mm(x.view(-1, x.shape[-1]), w.permute(1, 0))


def three(form):
    return lambda x, *ws: tuple(form(x, w) for w in ws)


def weights(colocated: bool, gap: int = 0):
    block = torch.randn(sum(ROWS) + gap, 64, dtype=torch.bfloat16)
    starts = [0, ROWS[0] + gap, ROWS[0] + gap + ROWS[1]]
    ws = [block[s:s + r] for s, r in zip(starts, ROWS)]
    return ws if colocated else [w.clone() for w in ws]


def matmuls(gm):
    return sum(n.target in (aten.mm.default, aten.sum.dim_IntList) for n in gm.graph.nodes)


@pytest.mark.parametrize("form", [gemv_decomposed, mm_form], ids=["gemv_decomposed", "mm"])
def test_pass_merges_colocated_weights_into_one_matmul(form):
    x, ws = torch.randn(1, 1, 64, dtype=torch.bfloat16), weights(True)
    fn = three(form)
    gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(x, *ws)
    assert matmuls(gm) == 3
    assert merge_projections(gm.graph) == 1
    gm.recompile()
    assert matmuls(gm) == 1 and any(n.target == aten.as_strided.default for n in gm.graph.nodes)
    for got, want in zip(gm(x, *ws), fn(x, *ws)):
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("colocated,gap,merged,left", [(False, 0, 0, 3), (True, 8, 1, 2)],
                         ids=["separate_storages", "gap_after_q"])
def test_pass_merges_only_weights_that_are_back_to_back(colocated, gap, merged, left):
    """Separate storages: nothing. A gap after q: only k and v (still adjacent) merge."""
    x, ws = torch.randn(1, 1, 64, dtype=torch.bfloat16), weights(colocated, gap)
    fn = three(mm_form)
    gm = make_fx(fn, tracing_mode="fake")(x, *ws)
    assert merge_projections(gm.graph) == merged
    gm.recompile()
    assert matmuls(gm) == left
    assert all(torch.allclose(g.float(), w.float(), atol=1e-2, rtol=1e-2) for g, w in zip(gm(x, *ws), fn(x, *ws)))


def test_pass_orders_the_graph_it_is_given():
    """Earlier passes leave replacements where their pattern began, so a node can precede its
    input when this pass runs (seen in the CPU suite with dynamic shapes): it must not trip."""
    x, ws = torch.randn(1, 1, 64, dtype=torch.bfloat16), weights(True)
    fn = three(mm_form)
    gm = make_fx(fn, tracing_mode="fake")(x, *ws)
    mm = next(n for n in gm.graph.nodes if n.target == aten.mm.default)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes)).next):  # right after the first placeholder
        early = gm.graph.call_function(aten.neg.default, (mm,))  # uses mm before mm is defined
    early.meta["val"] = mm.meta["val"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], early),)
    assert merge_projections(gm.graph) == 1
    gm.recompile()
    *got, negated = gm(x, *ws)
    want = fn(x, *ws)
    assert torch.allclose(negated.float(), -want[0].float(), atol=1e-2, rtol=1e-2)
    assert all(torch.allclose(g.float(), w.float(), atol=1e-2, rtol=1e-2) for g, w in zip(got, want))


def test_pass_recognises_inductors_cuda_gemv_decomposition():
    """The exact graph Inductor's decomposition makes for F.linear on a one-row CUDA input under
    coordinate-descent tuning (traced with fake CUDA tensors: no GPU needed; fake CUDA views
    cannot be made here, so the weights are separate and only the recognition is checked; the
    merge of this form is checked by value in test_pass_merges_colocated_weights_into_one_matmul)."""
    from cohere_compile.passes.merge_projections import _find

    with FakeTensorMode():
        x = torch.empty(1, 1, 64, dtype=torch.bfloat16, device="cuda")
        ws = [torch.empty(r, 64, dtype=torch.bfloat16, device="cuda") for r in ROWS]
    with inductor_config.patch(coordinate_descent_tuning=True):
        gm = make_fx(lambda x, *ws: tuple(torch.nn.functional.linear(x, w) for w in ws),
                     decomposition_table=select_decomp_table(), tracing_mode="fake")(x, *ws)
    assert not any(n.target == aten.mm.default for n in gm.graph.nodes)  # really the decomposed form
    weights = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    found = [_find(w) for w in weights]
    assert all(p is not None and p.consumer.target == aten.mul.Tensor for p in found)
    assert len({p.signature() for p in found}) == 1  # same X, same steps: mergeable once co-located
    assert merge_projections(gm.graph) == 0  # separate storages


def _config():
    cfg = tiny_config(True, 2, layers=2)
    cfg.logit_scale, cfg.initializer_range = 1.0, 0.2  # sharp logits: greedy picks are not near ties
    return cfg


def test_colocating_keeps_the_model_and_its_checkpoint(tmp_path):
    """Same Parameter objects and values, one buffer per layer, and save_pretrained /
    from_pretrained round-trip the weights (views of one buffer are saved as separate tensors)."""
    import transformers

    model = make_model(_config())
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    assert not all_colocated(model)
    assert ensure_colocated(model) == 2 and all_colocated(model)
    assert dict(model.named_parameters()) == params
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    layer = model.model.layers[0]
    block = layer.self_attn.q_proj.weight.untyped_storage()
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == block.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = transformers.CohereForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in loaded.named_parameters())


@pytest.mark.usefixtures("ops_torch_path")
def test_generate_with_merged_projections_matches_eager_and_survives_moved_weights():
    ref, model = make_model(_config()), cc.optimize(make_model(_config()))
    params_before = dict(model.named_parameters())
    values_before = {n: p.detach().clone() for n, p in params_before.items()}
    prompts = [[5, 9, 33, 7, 100], [11, 3, 60, 2, 8, 9, 10]]
    want = cc.generate(ref, prompts, 10, stop_tokens=(), compiled=False)
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        assert cc.generate(model, prompts, 10, stop_tokens=(), merge_projections=True) == want
    # prefill and decode graphs: one merged block (q, k, v, gate, up) per layer
    assert [r["merge_projections"] for r in rewrites] == [2, 2], rewrites
    assert all_colocated(model)
    assert dict(model.named_parameters()) == params_before  # the same Parameter objects ...
    assert all(torch.equal(p, values_before[n]) for n, p in model.named_parameters())  # ... and values
    k = model.model.layers[1].self_attn.k_proj.weight
    k.data = k.data.clone()  # something moves a weight: the compiled graphs' view would be stale
    assert not all_colocated(model)
    assert cc.generate(model, prompts, 10, stop_tokens=(), merge_projections=True) == want
    assert all_colocated(model)


@pytest.mark.usefixtures("ops_torch_path")
def test_merged_projections_feed_every_other_pass():
    """With every pass on, the ops downstream of the merge (QK norm + RoPE, attention, SwiGLU)
    read slices of the merged output: still the eager tokens, every rewrite still there."""
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), passes=cc.PASS_NAMES)
    prompts = [[5, 9, 33, 7, 100], [11, 3, 60, 2, 8, 9, 10]]
    want = cc.generate(ref, prompts, 8, stop_tokens=(), compiled=False)
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        assert cc.generate(model, prompts, 8, stop_tokens=(), merge_projections=True) == want
    prefill, decode = rewrites
    assert prefill["merge_projections"] == decode["merge_projections"] == 2
    assert prefill["qk_norm_rope"] == prefill["swiglu"] == prefill["attention"] == 2
    assert decode["paged_attention"] == decode["swiglu"] == decode["qk_norm_rope"] == 2


def test_merge_projections_refuses_a_model_without_plain_weights():
    model = make_model(tiny_config(False, 2))
    cc.optimize(model, quantize="int4", group_size=32)
    assert ensure_colocated(model) == 0
    with pytest.raises(ValueError, match="merge_projections=True needs plain, bias-free"):
        cc.generate(model, [[5, 6, 7]], 2, merge_projections=True)


def test_generate_merges_by_default_only_on_cuda_models_that_can_be_merged():
    """The default (None) was measured faster on the H200 only: CPU models keep their layout; a
    CUDA model is co-located (checked here through the decision alone, on a CPU model); an
    int4 model quietly keeps separate matmuls, where an explicit True raises (test above)."""
    from cohere_compile.generate import _merge_projections

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    model = make_model(tiny_config(False, 2))
    assert not _merge_projections(model, None, True, cpu) and not all_colocated(model)
    assert not _merge_projections(model, None, False, cuda) and not all_colocated(model)  # eager path
    assert not _merge_projections(model, False, True, cuda) and not all_colocated(model)
    assert _merge_projections(model, None, True, cuda) and all_colocated(model)
    quantized = make_model(tiny_config(False, 2))
    cc.optimize(quantized, quantize="int4", group_size=32)
    assert not _merge_projections(quantized, None, True, cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merged_projections_on_cuda_bf16_decode():
    """On the GPU: bf16, CUDA-graph decode, where a one-row matmul is Inductor's GEMV
    decomposition. Prefill and decode graphs each merge one block per layer, and the tokens
    match cc.generate without merging for the first steps (sharp logits)."""
    def build():
        return cc.optimize(make_model(_config(), torch.bfloat16).cuda())

    prompts = [[5, 9, 33, 7, 100], [11, 3, 60, 2, 8, 9, 10]]
    want = cc.generate(build(), prompts, 12, stop_tokens=(), merge_projections=False)
    model = build()
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        got = cc.generate(model, prompts, 12, stop_tokens=())  # merged by default on CUDA
    assert [r["merge_projections"] for r in rewrites] == [2, 2], rewrites
    assert [t[:6] for t in got] == [t[:6] for t in want], (got, want)
    assert cc.generate(model, prompts, 12, stop_tokens=(), merge_projections=True) == got  # replayed graph
