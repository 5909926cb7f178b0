"""End to end: ``cohere_compile.optimize`` / ``explain`` on tiny Cohere models against
eager Hugging Face (the same model object, run before it is optimized)."""

import importlib.metadata

import pytest
import torch
import transformers

import cohere_compile as cc
from cohere_compile.passes import PASS_NAMES, CoherePassManager, recording
from conftest import make_model, padded_inputs, rel_err, tiny_config

LAYERS = 2
FULL = {"qk_norm_rope": LAYERS, "attention": LAYERS, "swiglu": LAYERS, "layer_norm": LAYERS + 1,
        "causal_attention": 0,  # padded inputs: attention takes them all
        "linear_cross_entropy": 0,  # inference without labels: no loss to fuse
        "paged_attention": 0}  # no paged KV cache here
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_matches_eager(out, ref, attention_mask, dtype):
    """Compare logits on non-padded positions only."""
    keep = attention_mask.bool()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out[keep]).all()
    err = rel_err(out[keep], ref[keep])
    assert err < TOL[dtype], f"rel_err {err:.3g} >= {TOL[dtype]}"


def assert_full_rewrites(explanation):
    assert explanation.matches == FULL, str(explanation)
    assert explanation.expected == FULL
    assert explanation.missing == {}
    assert explanation.graph_breaks == 0, explanation.break_reasons


# A covering set of (use_qk_norm, kv heads, attn_implementation, dtype): every pair of
# values of any two factors appears in at least one row.
CONFIGS = [
    pytest.param(True, 2, "sdpa", torch.float32, id="qknorm-gqa-sdpa-fp32"),
    pytest.param(True, 4, "eager", torch.bfloat16, id="qknorm-mha-eager-bf16"),
    pytest.param(False, 2, "eager", torch.bfloat16, id="noqknorm-gqa-eager-bf16"),
    pytest.param(False, 4, "sdpa", torch.float32, id="noqknorm-mha-sdpa-fp32"),
    pytest.param(False, 2, "sdpa", torch.bfloat16, id="noqknorm-gqa-sdpa-bf16"),
    pytest.param(True, 4, "eager", torch.float32, id="qknorm-mha-eager-fp32"),
]


@pytest.mark.parametrize("use_qk_norm,kv_heads,attn,dtype", CONFIGS)
def test_optimize_rewrites_everything_and_matches_eager(use_qk_norm, kv_heads, attn, dtype):
    model = make_model(tiny_config(use_qk_norm, kv_heads, attn), dtype)
    ids, am = padded_inputs()
    ref = logits(model, input_ids=ids, attention_mask=am)

    assert cc.optimize(model, passes=PASS_NAMES) is model
    out = logits(model, input_ids=ids, attention_mask=am)
    assert_matches_eager(out, ref, am, dtype)

    explanation = cc.explain(model, ids, attention_mask=am)
    assert_full_rewrites(explanation)
    assert explanation.enabled == PASS_NAMES


def test_default_passes():
    """``optimize(model)`` enables exactly ``DEFAULT_PASSES``, each rewriting every layer, except
    ``causal_attention``: these inputs are padded, so it has nothing to take (and explain expects 0)."""
    model = make_model(tiny_config(True, 2), torch.float32)
    ids, am = padded_inputs()
    ref = logits(model, input_ids=ids, attention_mask=am)
    cc.optimize(model)
    assert_matches_eager(logits(model, input_ids=ids, attention_mask=am), ref, am, torch.float32)
    explanation = cc.explain(model, ids, attention_mask=am)
    assert explanation.enabled == cc.DEFAULT_PASSES
    assert explanation.matches == {n: (FULL[n] if n in cc.DEFAULT_PASSES else 0) for n in PASS_NAMES}
    assert explanation.missing == {}
    assert explanation.graph_breaks == 0


def test_fullgraph_forward_works():
    model = make_model(tiny_config(True, 2), torch.float32)
    ids, am = padded_inputs()
    ref = logits(model, input_ids=ids, attention_mask=am)
    cc.optimize(model, passes=PASS_NAMES, fullgraph=True)
    out = logits(model, input_ids=ids, attention_mask=am)
    assert_matches_eager(out, ref, am, torch.float32)


def test_dynamic_shapes_two_lengths():
    model = make_model(tiny_config(True, 2), torch.float32)
    inputs = [padded_inputs(seq=9, seed=3), padded_inputs(seq=13, seed=4)]
    refs = [logits(model, input_ids=ids, attention_mask=am) for ids, am in inputs]
    cc.optimize(model, passes=PASS_NAMES, dynamic=True)
    for (ids, am), ref in zip(inputs, refs):
        assert_matches_eager(logits(model, input_ids=ids, attention_mask=am), ref, am, torch.float32)
    ids, am = inputs[1]
    assert_full_rewrites(cc.explain(model, ids, attention_mask=am))


def test_position_offsets():
    model = make_model(tiny_config(False, 2), torch.float32)
    ids, am = padded_inputs(seq=9)
    positions = torch.arange(5, 5 + ids.shape[1]).expand(ids.shape[0], -1)
    ref = logits(model, input_ids=ids, attention_mask=am, position_ids=positions)
    # RoPE is invariant to a uniform shift, so also use uneven positions, which do change the logits
    uneven = torch.arange(0, 2 * ids.shape[1], 2).expand(ids.shape[0], -1)
    ref_uneven = logits(model, input_ids=ids, attention_mask=am, position_ids=uneven)
    assert rel_err(ref_uneven[am.bool()], ref[am.bool()]) > 1e-3
    cc.optimize(model, passes=PASS_NAMES)
    out = logits(model, input_ids=ids, attention_mask=am, position_ids=positions)
    assert_matches_eager(out, ref, am, torch.float32)
    out_uneven = logits(model, input_ids=ids, attention_mask=am, position_ids=uneven)
    assert_matches_eager(out_uneven, ref_uneven, am, torch.float32)


def _compile_with_backend_and_count(backend):
    model = make_model(tiny_config(True, 2), torch.float32)
    ids, am = padded_inputs()
    ref = logits(model, input_ids=ids, attention_mask=am)
    compiled = torch.compile(model, backend=backend, options={"passes": ["layer_norm"]})
    with recording() as graphs, torch._inductor.config.patch(force_disable_caches=True):
        out = logits(compiled, input_ids=ids, attention_mask=am)
    assert_matches_eager(out, ref, am, torch.float32)
    assert graphs, "the cohere pass manager never ran"
    assert sum(g.get("layer_norm", 0) for g in graphs) == LAYERS + 1
    assert all(set(g) == {"layer_norm"} for g in graphs), graphs


def test_torch_compile_backend_callable_with_options():
    _compile_with_backend_and_count(cc.cohere_backend)


def test_torch_compile_backend_by_name_with_options():
    from torch._dynamo import list_backends

    if "cohere" not in list_backends(exclude_tags=()):
        pytest.fail(
            "torch.compile(backend='cohere') is not available after `import cohere_compile`: the name is only "
            "registered through the 'torch_dynamo_backends' entry point. Run `pip install -e .`."
        )
    _compile_with_backend_and_count("cohere")


def test_backend_entry_point_is_discoverable():
    from torch._dynamo import list_backends

    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    if "cohere" not in names:
        pytest.fail(
            "no 'cohere' entry point in group 'torch_dynamo_backends': the cohere-compile distribution is not "
            "installed. Run `pip install -e .` in the repository root."
        )
    assert "cohere" in list_backends(exclude_tags=())
    ep = next(ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "cohere")
    assert ep.load() is cc.cohere_backend


def test_backend_rejects_unknown_option():
    with pytest.raises(ValueError, match="not_an_inductor_option"):
        cc.backend.make_backend({"not_an_inductor_option": 1})


def test_pass_selection_only_runs_chosen_pass():
    model = make_model(tiny_config(True, 2), torch.float32)
    ids, am = padded_inputs()
    ref = logits(model, input_ids=ids, attention_mask=am)
    cc.optimize(model, passes=["swiglu"])
    assert_matches_eager(logits(model, input_ids=ids, attention_mask=am), ref, am, torch.float32)
    explanation = cc.explain(model, ids, attention_mask=am)
    assert explanation.enabled == ("swiglu",)
    assert explanation.matches == {name: (LAYERS if name == "swiglu" else 0) for name in PASS_NAMES}
    assert explanation.missing == {}
    assert explanation.graph_breaks == 0
    table = str(explanation)
    for name in PASS_NAMES:
        assert name in table
    assert "graph breaks: 0" in table


def test_unknown_pass_name_lists_valid_names():
    model = make_model(tiny_config(True, 2), torch.float32)
    with pytest.raises(ValueError) as info:
        cc.optimize(model, passes=["swiglu", "not_a_pass"])
    message = str(info.value)
    assert "not_a_pass" in message
    for name in PASS_NAMES:
        assert name in message


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_non_cohere_model_is_rejected():
    model = _tiny_llama()
    with pytest.raises(cc.UnsupportedModelError, match="(?i)cohere"):
        cc.optimize(model)
    with pytest.raises(cc.UnsupportedModelError, match="(?i)cohere"):
        cc.explain(model, torch.randint(3, 128, (1, 5)))


def test_float64_model_is_rejected():
    model = make_model(tiny_config(True, 2), torch.float64)
    with pytest.raises(cc.UnsupportedInputError, match="float64|dtype"):
        cc.optimize(model)


@pytest.mark.usefixtures("ops_torch_path")
def test_greedy_generate_matches_eager():
    model = make_model(tiny_config(True, 2), torch.float32, seed=7)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert ref.shape[1] > ids.shape[1]
    cc.optimize(model, passes=PASS_NAMES)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


def test_explain_twice_gives_identical_counts():
    model = make_model(tiny_config(False, 2), torch.float32)
    ids, am = padded_inputs()
    cc.optimize(model, passes=PASS_NAMES)
    first = cc.explain(model, ids, attention_mask=am)
    second = cc.explain(model, ids, attention_mask=am)
    assert_full_rewrites(first)
    assert second.matches == first.matches
    assert second.graph_breaks == first.graph_breaks == 0


def test_pass_manager_uuid():
    a, b = CoherePassManager(["layer_norm"]), CoherePassManager(["layer_norm"])
    assert a.uuid() == b.uuid()
    assert a.uuid() != CoherePassManager(["swiglu"]).uuid()
    # the pass list is canonicalised, so order does not split the cache
    assert CoherePassManager(["swiglu", "layer_norm"]).uuid() == CoherePassManager(["layer_norm", "swiglu"]).uuid()
    assert CoherePassManager(PASS_NAMES).uuid() != a.uuid()
    # each internal switch splits the cache too (a graph rewritten with it on is not served with it off)
    assert CoherePassManager(["layer_norm"], merge_projections=True).uuid() != a.uuid()
    assert CoherePassManager(["layer_norm"], int4_split_k=False).uuid() != a.uuid()


def test_pass_manager_uuid_hashes_every_source_file(tmp_path, monkeypatch):
    """Code outside passes/ops/kernels shapes compiled graphs too (the backend's setup, the
    weight layout merged projections read through as_strided, whose storage offsets the FX
    cache key leaves out): a change to any package file must give a new uuid."""
    import shutil

    from cohere_compile.passes import manager

    copy = tmp_path / "cohere_compile"
    shutil.copytree(manager._PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(manager, "_PACKAGE_ROOT", copy)
    hashes = {}
    for name in ("colocate.py", "generate.py", "backend.py", "cache/paged_cache.py", "kernels/paged.py"):
        manager._source_hash.cache_clear()
        before = CoherePassManager(["swiglu"]).uuid()
        with open(copy / name, "a") as f:
            f.write("\n# edited\n")
        manager._source_hash.cache_clear()
        hashes[name] = (before, CoherePassManager(["swiglu"]).uuid())
    manager._source_hash.cache_clear()
    unchanged = [name for name, (old, new) in hashes.items() if old == new]
    assert not unchanged, f"uuid ignores edits to {unchanged}"


def rewritten_graphs(monkeypatch) -> list:
    """The graphs our pass manager leaves, one per compiled graph, for tests that read the nodes."""
    from cohere_compile.passes import manager

    graphs = []
    run_passes = manager.CoherePassManager.__call__

    def spy(self, graph):
        run_passes(self, graph)
        graphs.append(graph)

    monkeypatch.setattr(manager.CoherePassManager, "__call__", spy)
    return graphs


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_qk_norm_rope_pairs_each_layers_q_with_its_own_k(monkeypatch, kv_heads):
    """On dynamic graphs (a tensor eps: one graph input per norm) a pattern with one eps for
    both norms fitted only q's own branch as its second output: the op got one weight twice,
    one output went unused, k's norm stayed unfused, yet one rewrite counted per layer. Each op
    must take a layer's q and k weights and feed both outputs, and no QK norm may stay behind
    (rsqrt: the layers' input norms and the final norm only)."""
    from cohere_compile.passes import manager

    manager._stages("qk_norm_rope")  # build the patterns first, as in any later compile
    graphs = rewritten_graphs(monkeypatch)
    cfg = tiny_config(True, kv_heads)
    model = make_model(cfg, torch.float32)
    ids, am = padded_inputs(seq=9, seed=3)
    ref = logits(model, input_ids=ids, attention_mask=am)
    with torch._inductor.config.patch(force_disable_caches=True):
        cc.optimize(model, passes=["qk_norm_rope"], dynamic=True)
        out = logits(model, input_ids=ids, attention_mask=am)
    assert_matches_eager(out, ref, am, torch.float32)
    ops = (torch.ops.cohere.qk_norm_rope.default, torch.ops.cohere.qk_norm_rope_tensor_eps.default)
    assert graphs
    for graph in graphs:
        fused = [n for n in graph.nodes if n.target in ops]
        assert len(fused) == cfg.num_hidden_layers
        weights = {(n.args[2].name, n.args[3].name) for n in fused}
        assert all(q_w != k_w for q_w, k_w in weights), weights
        assert len({w for pair in weights for w in pair}) == 2 * cfg.num_hidden_layers, weights
        assert all(sorted(u.args[1] for u in n.users) == [0, 1] for n in fused), [list(n.users) for n in fused]
        rsqrt = [n for n in graph.nodes if n.target == torch.ops.aten.rsqrt.default]
        assert len(rsqrt) == cfg.num_hidden_layers + 1, len(rsqrt)


def test_qk_norm_rope_never_pairs_a_branch_with_itself(monkeypatch):
    """Only q gets Cohere's RoPE here (k is scaled by cos + sin, not rotated). Inductor's
    multi-output match takes q's branch for k's output too (k := q: the op got q twice, this
    test failed so without the guard); DistinctBranchesPattern rejects that, so nothing is
    rewritten and the result is eager's."""
    from cohere_compile.passes.qk_norm_rope import _rotate_half

    def half_rotated(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (k * sin)

    graphs = rewritten_graphs(monkeypatch)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g),
            torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)]
    with torch._inductor.config.patch(force_disable_caches=True):
        out = torch.compile(half_rotated, backend="cohere", options={"passes": ["qk_norm_rope"]})(*args)
    for got, want in zip(out, half_rotated(*args)):
        torch.testing.assert_close(got, want)
    assert graphs
    ops = [n for graph in graphs for n in graph.nodes if n.target == torch.ops.cohere.qk_norm_rope.default]
    assert not ops, [n.args for n in ops]
