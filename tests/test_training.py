"""Training through ``cc.optimize``: peft LoRA in both orders, LoRA dropout, gradient
checkpointing, regional (per-decoder-layer) compilation, and the training CLI.

References are eager Hugging Face (+ peft) models built from the same seeds. Every
compiled graph is counted at the backend (``compile_fx`` calls), which also proves our
backend - and so our pass manager - compiled the code that ran. Rewrite counts come from
the pass manager with Inductor's caches off (a cache hit skips the passes).
Training graphs get no forward rewrites today (the forward patterns cannot match a
joint graph whose intermediates the backward reuses); those are counted where they do
happen: inference graphs, including the no-grad forward of reentrant checkpointing.
"""


import pytest
import torch

import cohere_compile as cc
import cohere_compile.backend as cc_backend
from cohere_compile.passes import PASS_NAMES, recording
from cohere_compile.train import LORA_TARGETS, add_lora, compile_model, main, token_batches
from conftest import make_model, rel_err, tiny_config

GRAD_TOL = 1e-4  # fp32
ONE_LAYER = {"qk_norm_rope": 1, "causal_attention": 0, "attention": 1, "paged_attention": 0, "swiglu": 1,
             "layer_norm": 1, "linear_cross_entropy": 0}  # one decoder layer
NORM_ONLY = {n: int(n == "layer_norm") for n in PASS_NAMES}
NOTHING = {n: 0 for n in PASS_NAMES}
LORA_REGIONAL_GRAPHS = 4  # layer 0, layers 1.., final norm, head (see test_peft_lora_training_matches_eager)


@pytest.fixture
def compiled_graphs(monkeypatch):
    """Node counts of every graph Dynamo hands to our backend (cache hits included)."""
    graphs = []
    real = cc_backend.compile_fx

    def counting(gm, example_inputs, **kwargs):
        graphs.append(len(gm.graph.nodes))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(cc_backend, "compile_fx", counting)
    return graphs


def no_caches():
    return torch._inductor.config.patch(force_disable_caches=True)


def base(layers=2, seed=0):
    return make_model(tiny_config(True, 2, layers=layers), torch.float32, seed=seed)


def lora(model, dropout=0.0):
    """LoRA r4 on all seven linears, with B random (peft starts B at zero, which would
    make every lora_A gradient zero and the comparison vacuous)."""
    torch.manual_seed(1)
    model = add_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def step(model, ids, seed=3):
    model.train()
    torch.manual_seed(seed)  # same dropout masks where the RNG streams agree
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_lora_grads_match(model, ref, ids):
    ref_loss, ref_grads = step(ref, ids)
    loss, grads = step(model, ids)
    assert rel_err(loss, ref_loss) < 1e-5
    lora_names = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    assert len(lora_names) == 2 * len(LORA_TARGETS) * ref.config.num_hidden_layers
    assert set(ref_grads) == lora_names and set(grads) == lora_names  # only the adapters get gradients
    for name in lora_names:
        assert grads[name].abs().sum() > 0, name
        err = rel_err(grads[name], ref_grads[name])
        assert err < GRAD_TOL, f"{name}: rel_err {err:.3g}"


IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))


# --- regional compilation -------------------------------------------------------------

@pytest.mark.parametrize("layers", [2, 4])
def test_regional_compiles_one_layer_graph_for_any_depth(layers, compiled_graphs):
    """Graphs: one decoder layer (reused by every layer), the final norm, the LM head.
    The same three for 2 and 4 layers; each layer graph carries one rewrite per pass."""
    model = base(layers)
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    assert cc.optimize(model, passes=PASS_NAMES, regional=True, training_rewrites=True) is model
    with torch.no_grad(), recording() as rewrites, no_caches():
        out = model(IDS, use_cache=False).logits
        again = model(IDS, use_cache=False).logits  # no recompilation on the second call
    assert rel_err(out, ref) < 1e-4 and torch.equal(out, again)
    assert len(compiled_graphs) == 3, compiled_graphs
    key = lambda d: sorted(d.items())  # noqa: E731
    assert sorted(rewrites, key=key) == sorted([ONE_LAYER, NORM_ONLY, NOTHING], key=key)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_regional_lora_fuses_the_loss_in_the_head_graph(checkpointing, compiled_graphs, monkeypatch):
    """Regional + LoRA (+ gradient checkpointing, which turns on enable_input_require_grads):
    the head graph starts at the backbone's output with no graph break, so the logits stay
    inside it, the fused loss fires there once, and loss and LoRA gradients match eager."""
    from cohere_compile.kernels import cross_entropy as ce_kernel

    calls = []
    real = ce_kernel.fused_linear_cross_entropy
    monkeypatch.setattr(ce_kernel, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))

    def build():
        m = lora(base())
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    ref, model = build(), cc.optimize(build(), passes=["linear_cross_entropy"], regional=True,
                                      training_rewrites=True)
    with recording() as rewrites, no_caches():
        assert_lora_grads_match(model, ref, IDS)
    assert sum(r["linear_cross_entropy"] for r in rewrites) == 1, rewrites
    assert len(calls) == 1  # the compiled step ran cohere::linear_cross_entropy
    model.train()
    assert model(input_ids=IDS, labels=IDS, use_cache=False).logits is None
    if checkpointing:  # checkpointing only changes training; eval and generation are checked once (CI time)
        return
    with torch.no_grad():  # eval and generation: the backbone-then-head call keeps the logits and the cache
        model.eval(), ref.eval()
        assert rel_err(model(input_ids=IDS).logits, ref(input_ids=IDS).logits) < 1e-4
        assert torch.equal(model.generate(IDS, max_new_tokens=3, do_sample=False),
                           ref.generate(IDS, max_new_tokens=3, do_sample=False))


def test_regional_head_keeps_hf_output_options():
    """The regional head runs the backbone itself, with the arguments HF's forward would pass:
    ``return_dict=False`` (taken off by HF's decorator, never seen by the backbone) and
    ``output_hidden_states`` (passed through) give what eager HF gives."""
    ref, model = base(), cc.optimize(base(), regional=True)
    with torch.no_grad():
        tup, ref_tup = model(IDS, return_dict=False, use_cache=False), ref(IDS, return_dict=False, use_cache=False)
        assert isinstance(tup, tuple) and rel_err(tup[0], ref_tup[0]) < 1e-4
        out, ref_out = model(IDS, output_hidden_states=True, use_cache=False), ref(IDS, output_hidden_states=True,
                                                                                   use_cache=False)
        assert len(out.hidden_states) == len(ref_out.hidden_states) == 3
        assert all(rel_err(a, b) < 1e-4 for a, b in zip(out.hidden_states, ref_out.hidden_states))


def saved_activation_bytes(model, ids) -> tuple[int, torch.Tensor, dict]:
    """Bytes of the non-parameter tensors autograd keeps for the backward of one training step
    (each storage once), and the step's loss and gradients."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return sum(saved.values()), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("ops_torch_path")
def test_activation_memory_budget_recomputes_casts_instead_of_saving_them():
    """bf16 LoRA (peft keeps the adapters in fp32, so each adapter input is an fp32 copy):
    PyTorch's partitioner saves those fp32 copies; with a budget of 0.6 it recomputes them in
    the backward instead, for the same gradients. (At hidden 256, 4 layers, the saved tensors went
    from 11.9 to 6.1 KB per token and layer, and only fp32 casts were dropped from them.)"""
    def build(budget):
        m = lora(make_model(tiny_config(False, 2, layers=2), torch.bfloat16))
        m.enable_input_require_grads()  # as training does: one layer graph
        return cc.optimize(m, regional=True, activation_memory_budget=budget)

    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(6))
    default_bytes, default_loss, default_grads = saved_activation_bytes(build(None), ids)
    budget_bytes, loss, grads = saved_activation_bytes(build(0.6), ids)
    assert budget_bytes < 0.7 * default_bytes, (budget_bytes, default_bytes)
    assert rel_err(loss.float(), default_loss.float()) < 1e-3
    assert grads.keys() == default_grads.keys() and len(grads) == 2 * len(LORA_TARGETS) * 2
    for name in grads:  # the same math, recomputed: bf16 rounding at most
        assert rel_err(grads[name].float(), default_grads[name].float()) < 2e-2, name
    with pytest.raises(ValueError, match=r"activation_memory_budget must be a number in \[0, 1\]"):
        cc.optimize(make_model(tiny_config(False, 2)), activation_memory_budget=1.5)


def test_regional_twice_is_an_error_and_explain_says_why_it_cannot_report():
    model = base()
    cc.optimize(model, regional=True)
    with pytest.raises(ValueError, match="already optimized"):
        cc.optimize(model, regional=True)
    with pytest.raises(ValueError, match="regional=True"):
        cc.explain(model, IDS)


# --- peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("order,regional", [
    ("peft_then_optimize", True), ("optimize_then_peft", True), ("optimize_then_peft", False),
])
@pytest.mark.usefixtures("ops_torch_path")
def test_peft_lora_training_matches_eager(order, regional, compiled_graphs):
    ref = lora(base())
    if order == "peft_then_optimize":
        model = cc.optimize(lora(base()), regional=regional)
    else:
        model = lora(cc.optimize(base(), regional=regional))
    assert_lora_grads_match(model, ref, IDS)
    # whole model: one graph, so peft's wrappers did not bypass the compiled model.
    # regional: two layer graphs (layer 0's input, from the frozen embedding, needs no
    # gradient; every later layer's does), the final norm and the head - for any depth.
    assert len(compiled_graphs) == (LORA_REGIONAL_GRAPHS if regional else 1), compiled_graphs


def test_peft_lora_forward_rewrites_every_layer_with_dropout(compiled_graphs):
    """Passes still match with LoRA-wrapped linears whose LoRA branch has a live dropout
    (training mode under no_grad; whole-model compile, optimize then get_peft_model; the
    dropout-0 and peft-first cases are counted in test_gradient_checkpointing).
    ``fallback_random`` makes Inductor draw the same dropout masks as eager."""
    ref = lora(base(), dropout=0.25)
    model = lora(cc.optimize(base(), passes=PASS_NAMES, fallback_random=True), dropout=0.25)
    model.train(), ref.train()
    with torch.no_grad():
        torch.manual_seed(7)
        expected = ref(input_ids=IDS, use_cache=False).logits
        with recording() as rewrites, no_caches():
            torch.manual_seed(7)
            out = model(input_ids=IDS, use_cache=False).logits
        assert rel_err(out, expected) < 1e-4
        ref.eval()  # the dropout was live: without it the logits differ
        assert rel_err(ref(input_ids=IDS, use_cache=False).logits, expected) > 1e-3
    assert len(compiled_graphs) == 1 and len(rewrites) == 1
    # no mask, no cache: causal_attention takes the attention (no_grad: an inference graph)
    assert rewrites[0] == {"qk_norm_rope": 2, "causal_attention": 2, "attention": 0, "paged_attention": 0,
                           "swiglu": 2, "layer_norm": 3, "linear_cross_entropy": 0}


@pytest.mark.usefixtures("ops_torch_path")
def test_lora_dropout_training_matches_eager_with_same_rng(compiled_graphs):
    """LoRA dropout > 0 in a real training step (regional): with ``fallback_random``
    Inductor draws dropout masks from the eager RNG, so loss and gradients compare exactly."""
    ref = lora(base(), dropout=0.25)
    model = cc.optimize(lora(base(), dropout=0.25), regional=True, fallback_random=True)
    assert_lora_grads_match(model, ref, IDS)
    # and the dropout is live: another seed gives another loss
    ref.zero_grad()
    assert rel_err(step(ref, IDS, seed=4)[0], step(ref, IDS, seed=3)[0]) > 1e-6
    assert len(compiled_graphs) == LORA_REGIONAL_GRAPHS


# --- gradient checkpointing -------------------------------------------------------------

@pytest.mark.parametrize("reentrant,when", [(False, "before"), (True, "after")])
def test_gradient_checkpointing(reentrant, when, compiled_graphs):
    ref = lora(base())
    model = lora(base())
    gc_kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if when == "before":
        model.gradient_checkpointing_enable(**gc_kwargs)
    cc.optimize(model, passes=PASS_NAMES, regional=True)
    if when == "after":
        model.gradient_checkpointing_enable(**gc_kwargs)
    assert all(layer.gradient_checkpointing for layer in model.base_model.model.model.layers)
    # HF's gradient_checkpointing_enable makes the embedding output require grad, so
    # every layer's input does: one training layer graph (+ final norm + head).
    if not reentrant:
        assert_lora_grads_match(model, ref, IDS)
        assert len(compiled_graphs) == 3, compiled_graphs
        return
    # Reentrant checkpointing runs each layer's forward under no_grad (an inference layer
    # graph, which gets every forward rewrite) and recomputes it with grad (the training
    # graph). Count the no-grad graphs' rewrites first, with caches off, through a
    # training-mode call without grad (the same checkpointed path minus the recompute).
    # Two layer graphs there: HF's input-grad hook makes layer 0's input require grad even
    # under no_grad, the later layers' inputs do not.
    model.train()
    with torch.no_grad(), recording() as rewrites, no_caches():
        model(input_ids=IDS, use_cache=False)
    key = lambda d: sorted(d.items())  # noqa: E731
    assert sorted(rewrites, key=key) == sorted([ONE_LAYER, ONE_LAYER, NORM_ONLY, NOTHING], key=key)
    assert len(compiled_graphs) == 4  # the pass manager ran on every graph
    assert_lora_grads_match(model, ref, IDS)
    # + the training layer graph (the recompute), final norm and head; the checkpointed
    # no-grad forward reuses the first no-grad layer graph (its input requires grad)
    assert len(compiled_graphs) == 4 + 3, compiled_graphs


# --- the training CLI ---------------------------------------------------------------------

def test_train_cli_loss_decreases_on_a_repeated_batch(tmp_path, compiled_graphs):
    tiny_config(True, 2).save_pretrained(tmp_path)
    # the LoRA graphs of test_peft_lora_training_matches_eager (same config, r, shapes): an FX-cache hit
    result = main(["--config", str(tmp_path), "--dtype", "float32", "--device", "cpu", "--steps", "8",
                   "--batches", "1", "--batch", "2", "--seq", "9", "--lr", "0.02", "--lora-r", "4", "--lora-alpha", "8",
                   "--no-progress"])
    assert len(result.losses) == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    # learning one batch (LoRA r4 and logit_scale 0.0625 keep the steps small: 4.856 -> 4.787)
    assert all(b < a for a, b in zip(result.losses, result.losses[1:])), result.losses
    assert result.losses[-1] < result.losses[0] - 0.05, result.losses
    assert result.tokens_per_s() > 0
    # cc.optimize, regional, is the CLI's default; it turns on the embedding's input-grad
    # hook, so every layer's input requires grad: one layer graph, final norm, head
    assert len(compiled_graphs) == 3


def test_train_cli_rejects_bad_token_file(tmp_path):
    path = tmp_path / "ids.pt"
    torch.save(torch.tensor([1, 2, 500]), path)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        token_batches(128, 1, 2, str(path))
    with pytest.raises(ValueError, match="fewer than one batch"):
        token_batches(1024, 2, 16, str(path))
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_model(base(), "fast")


def test_token_file_windows(tmp_path):
    ids = torch.arange(3, 103)
    path = tmp_path / "ids.pt"
    torch.save(ids, path)
    batches = token_batches(128, 2, 10, str(path), n_batches=3)
    assert len(batches) == 3 and all(b.shape == (2, 10) for b in batches)
    for row in torch.cat(batches):  # contiguous windows of the file
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10))


# --- GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_regional_lora_training_on_cuda_bf16(checkpointing, compiled_graphs):
    """bf16 on the GPU, regional: loss and LoRA gradients against an fp32 eager model with the
    same weights, no further from it than eager bf16 is (bf16 rounding alone moved a LoRA A
    gradient 3.9% between eager and compiled bf16 on the H200, so bf16-vs-bf16 cannot be the bar)."""
    def build(dtype):
        m = lora(make_model(tiny_config(True, 2, layers=3), torch.float32).to("cuda", dtype))
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    truth, ref, model = build(torch.float32), build(torch.bfloat16), cc.optimize(build(torch.bfloat16), regional=True)
    ids = IDS.cuda()
    true_loss, true_grads = step(truth, ids)
    ref_loss, ref_grads = step(ref, ids)
    loss, grads = step(model, ids)
    assert rel_err(loss.float(), true_loss) < 2 * rel_err(ref_loss.float(), true_loss) + 1e-3
    assert set(grads) == set(ref_grads) and len(grads) == 2 * len(LORA_TARGETS) * 3
    for name in grads:
        ours, eager = rel_err(grads[name].float(), true_grads[name]), rel_err(ref_grads[name].float(), true_grads[name])
        assert ours < 2 * eager + 1e-2, f"{name}: {ours:.3g} vs eager bf16 {eager:.3g}"
    assert len(compiled_graphs) == (3 if checkpointing else LORA_REGIONAL_GRAPHS), compiled_graphs


def fold_like_torch_2_11():
    """Give training graphs the form torch 2.11's joint passes give them (it folds bf16 round
    trips that torch 2.13 keeps), through the pre-pass hook, which runs before ours."""
    from cohere_compile.passes._patterns import fold_round_trip_casts

    return torch._inductor.config.patch(joint_custom_pre_pass=fold_round_trip_casts)


@pytest.mark.parametrize("device,torch_2_11_casts", [
    ("cpu", False),
    ("cpu", True),
    pytest.param("cuda", False, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")]),
])
def test_regional_bf16_lora_training_rewrites(device, torch_2_11_casts, compiled_graphs):
    """What bench/train.py's cc_rewrites peer runs, at tiny size: bf16 LoRA, regional,
    training rewrites with the default passes + the fused loss. Every layer graph must carry the
    swiglu rewrite and the head graph the fused loss. On the H200 (torch 2.11) swiglu first
    matched 0 times: 2.11 folds the gate gradient's bf16 round trip (peft's fp32 sum -> bf16
    gate) and the pattern expected it; the CPU case with 2.11's casts reproduces that form."""
    from cohere_compile.passes import DEFAULT_PASSES

    def build(dtype):
        m = lora(make_model(tiny_config(False, 2, layers=2), torch.float32).to(device, dtype))
        m.enable_input_require_grads()  # as the bench and the training CLI do: one layer graph
        return m

    truth, model = build(torch.float32), build(torch.bfloat16)
    cc.optimize(model, passes=[*DEFAULT_PASSES, "linear_cross_entropy"], regional=True, training_rewrites=True)
    ids = IDS.to(device)
    true_loss, _ = step(truth, ids)
    casts = fold_like_torch_2_11() if torch_2_11_casts else torch._inductor.config.patch({})
    with recording() as rewrites, no_caches(), casts:
        loss, grads = step(model, ids)
    assert rel_err(loss.float(), true_loss) < 2e-2
    assert grads and all(g.isfinite().all() for g in grads.values())
    # graphs: the decoder layer (reused), the final norm, the head
    assert len(rewrites) == 3, rewrites
    assert sorted((r["swiglu"], r["linear_cross_entropy"]) for r in rewrites) == [(0, 0), (0, 1), (1, 0)], rewrites
