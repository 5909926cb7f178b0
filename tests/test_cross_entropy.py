"""``linear_cross_entropy``: the chunked kernel against a float64 torch reference, the pass on
tiny Cohere models in training against eager Hugging Face, and peak memory at a 256k vocabulary."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import cohere_compile as cc
from cohere_compile.backend import make_backend
from cohere_compile.kernels import cross_entropy as kernel
from cohere_compile.ops import cross_entropy as ce
from cohere_compile.ops import reference
from cohere_compile.passes import recording
from cohere_compile.training_outputs import ForwardWithoutTrainingLogits
from conftest import make_model, padded_inputs, rel_err, tiny_config

PASS = "linear_cross_entropy"


def fp64_reference(hidden, weight, labels, scale, reduction="mean"):
    h = hidden.detach().double().requires_grad_(hidden.requires_grad)
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    loss = reference.linear_cross_entropy(h, w, labels, scale, -100, reduction)
    loss.backward()
    return loss, h.grad, w.grad


def random_problem(n, hidden, vocab, dtype, seed, ignore_every=0, weight_grad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5 * 4).to(dtype).requires_grad_(weight_grad)
    y = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


@pytest.fixture
def chunk_bytes(monkeypatch):
    """Set the per-chunk logits budget (bytes) so small tests run several chunks."""
    def set_budget(nbytes):
        monkeypatch.setitem(ce.CHUNK_BYTES, "cpu", nbytes)
    return set_budget


# (tokens, hidden, vocab, scale, dtype, rows per chunk, ignore every k-th label)
KERNEL_CASES = [
    pytest.param(37, 24, 301, 0.0625, torch.float32, 8, 5, id="fp32-odd-5chunks"),
    pytest.param(29, 40, 1000, 0.8333, torch.float32, 29, 0, id="fp32-one-chunk-no-ignore"),
    pytest.param(33, 32, 517, 0.125, torch.bfloat16, 7, 3, id="bf16-odd"),
    pytest.param(19, 16, 70000, 1.0, torch.float16, 6, 4, id="fp16-vocab-over-two-blocks"),
]


@pytest.mark.parametrize("n,hid,vocab,scale,dtype,rows,ignore_every", KERNEL_CASES)
def test_kernel_matches_fp64_reference(n, hid, vocab, scale, dtype, rows, ignore_every, chunk_bytes):
    chunk_bytes(rows * vocab * torch.finfo(dtype).bits // 8)
    h, w, y = random_problem(n, hid, vocab, dtype, seed=n, ignore_every=ignore_every)
    loss = cc.linear_cross_entropy(h, w, y, scale)
    loss.backward()
    ref_loss, ref_gh, ref_gw = fp64_reference(h, w, y, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert rel_err(h.grad, ref_gh) < tol
    assert rel_err(w.grad, ref_gw) < tol
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    if ignore_every:
        assert torch.all(h.grad[::ignore_every] == 0)


def test_all_ignored_chunk_and_sum_reduction(chunk_bytes):
    """The first chunk is entirely ignored: it adds 0 to the loss and exactly 0 gradient."""
    n, hid, vocab, rows = 23, 16, 211, 8
    chunk_bytes(rows * vocab * 4)
    h, w, y = random_problem(n, hid, vocab, torch.float32, seed=3)
    y[:rows] = -100
    loss = cc.linear_cross_entropy(h, w, y, 0.5, reduction="sum")
    loss.backward()
    ref_loss, ref_gh, ref_gw = fp64_reference(h, w, y, 0.5, reduction="sum")
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * ref_loss.item()
    assert torch.all(h.grad[:rows] == 0)
    assert rel_err(h.grad, ref_gh) < 1e-5 and rel_err(w.grad, ref_gw) < 1e-5


def test_every_label_ignored_gives_nan_mean_and_zero_grads():
    """As torch's cross_entropy: 0 / 0 loss; no row contributes a gradient."""
    h, w, y = random_problem(9, 8, 40, torch.float32, seed=9)
    y[:] = -100
    loss = cc.linear_cross_entropy(h, w, y, 0.5)
    assert torch.isnan(loss) and torch.isnan(reference.linear_cross_entropy(h, w, y, 0.5))
    loss.backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_chunk_rows():
    assert kernel.chunk_rows(4096, 256000, 2, 512 * 2**20) == 1024  # Aya on CUDA: 4 chunks of 1024
    assert kernel.chunk_rows(10, 100, 4, 64 * 2**20) == 10
    assert kernel.chunk_rows(5, 10**6, 4, 1) == 1
    assert kernel.chunk_rows(300, 1000, 4, 100 * 4000) == 100  # under 128 rows: not rounded


def test_grad_output_scales_gradients():
    """Gradients are computed in the forward and multiplied by grad_output in the backward."""
    h, w, y = random_problem(11, 8, 50, torch.float32, seed=4, ignore_every=4)
    (cc.linear_cross_entropy(h, w, y, 0.3) * 2.5).backward()
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (reference.linear_cross_entropy(h2, w2, y, 0.3) * 2.5).backward()
    assert rel_err(h.grad, h2.grad) < 1e-5 and rel_err(w.grad, w2.grad) < 1e-5


def test_frozen_weight_and_no_grad():
    h, w, y = random_problem(13, 8, 90, torch.float32, seed=5, weight_grad=False)
    loss, g_h, g_w = ce.linear_cross_entropy_op(h, w, y, 0.5, -100, "mean", True, False)
    assert g_w.numel() == 0 and g_h.shape == h.shape
    cc.linear_cross_entropy(h, w, y, 0.5).backward()
    assert w.grad is None
    _, ref_gh, _ = fp64_reference(h, w, y, 0.5)
    assert rel_err(h.grad, ref_gh) < 1e-5
    with torch.no_grad():
        loss, g_h, g_w = ce.linear_cross_entropy_op(h, w, y, 0.5, -100, "mean", False, False)
    assert g_h.numel() == 0 and g_w.numel() == 0
    assert abs(loss.item() - fp64_reference(h, w, y, 0.5)[0].item()) < 1e-5


def test_tensor_scale_twin_matches():
    """``dynamic=True`` graphs carry logit_scale as a 0-d float64 tensor: the op twin reads it."""
    h, w, y = random_problem(12, 8, 77, torch.float32, seed=10, ignore_every=5)
    a = ce.linear_cross_entropy_op(h, w, y, 0.3, -100, "sum", True, True)
    b = torch.ops.cohere.linear_cross_entropy_tensor_scale(
        h, w, y, torch.tensor(0.3, dtype=torch.float64), -100, "sum", True, True
    )
    for x, z in zip(a, b):
        assert torch.equal(x, z)


def test_torch_path_matches_triton_path(monkeypatch):
    """Without TRITON_INTERPRET the op runs the same chunking with a plain-torch row function."""
    h, w, y = random_problem(17, 12, 333, torch.bfloat16, seed=6, ignore_every=3)
    triton_out = ce.linear_cross_entropy_op(h, w, y, 0.7, -100, "mean", True, True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_out = ce.linear_cross_entropy_op(h, w, y, 0.7, -100, "mean", True, True)
    for a, b in zip(triton_out, torch_out):
        assert rel_err(a, b) < 1e-2


def test_bad_inputs_raise_clear_errors():
    h, w, y = random_problem(5, 8, 20, torch.float32, seed=7)
    bad = y.clone()
    bad[2] = 20
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cc.linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="reduction"):
        cc.linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="int64"):
        cc.linear_cross_entropy(h, w, y.int())
    with pytest.raises(ValueError, match="cast"):
        cc.linear_cross_entropy(h, w.detach().bfloat16(), y)
    with pytest.raises(ValueError, match="do not fit"):
        cc.linear_cross_entropy(h, w[:, :4], y)


# ---------------------------------------------------------------- memory at a 256k vocabulary


def peak_alloc_bytes(fn) -> int:
    """Peak of live bytes allocated by torch's CPU allocator while ``fn`` runs (the
    profiler records every allocation and free)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-head", "trainable-head"])
def test_memory_256k_vocab_fused_far_under_unfused(weight_grad, monkeypatch, chunk_bytes):
    """hidden 64, 256 tokens, vocab 256000, fp32: the unfused loss+backward holds several
    [tokens, vocab] tensors (250 MB each); the fused one a 16 MB chunk at a time. Measured on
    the op's plain-torch CPU path (same chunking code; the interpreter's numpy buffers would
    escape torch's allocator and flatter the fused number)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    chunk_bytes(16 * 2**20)
    n, hid, vocab = 256, 64, 256000
    h, w, y = random_problem(n, hid, vocab, torch.float32, seed=8, ignore_every=7, weight_grad=weight_grad)
    logits_bytes = n * vocab * 4

    def fused():
        cc.linear_cross_entropy(h, w, y, 0.125).backward()

    def unfused():
        reference.linear_cross_entropy(h, w, y, 0.125).backward()

    fused_peak = peak_alloc_bytes(fused)
    fused_grads = h.grad.clone(), (w.grad.clone() if weight_grad else None)
    h.grad = w.grad = None
    unfused_peak = peak_alloc_bytes(unfused)
    assert unfused_peak > 2 * logits_bytes  # the baseline really materialises the logits
    weight_bytes = w.numel() * 4
    # fused: one 16 MB chunk (x3 with fp32 temporaries) plus, if trained, one [vocab, hidden]
    # gradient (scaled in place in the backward; autograd builds no zeros for the op's gradient outputs)
    assert fused_peak < 4 * 16 * 2**20 + (weight_bytes if weight_grad else 0)
    assert fused_peak < unfused_peak / (10 if not weight_grad else 3)
    assert rel_err(fused_grads[0], h.grad) < 1e-5
    if weight_grad:
        assert rel_err(fused_grads[1], w.grad) < 1e-5


# ---------------------------------------------------------------- the pass on tiny Cohere models


def count_op_calls(monkeypatch):
    calls = []
    real = kernel.fused_linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "fused_linear_cross_entropy", counted)
    return calls


def labels_for(ids, am):
    labels = ids.clone()
    labels[am == 0] = -100
    labels[0, 2:4] = -100
    return labels


def train_step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# (qk norm, kv heads, dtype, num_items_in_batch, peft LoRA on all seven linears: frozen tied LM head)
TRAIN_CASES = [
    pytest.param(True, 2, torch.float32, False, False, id="qknorm-gqa-fp32-mean-full"),
    pytest.param(False, 4, torch.float32, True, True, id="mha-fp32-num_items-lora-dynamic"),
    pytest.param(False, 2, torch.bfloat16, True, False, id="gqa-bf16-num_items-full"),
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    # random A and B (peft's default B = 0 would make every A gradient exactly 0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("qk,kv,dtype,num_items,lora", TRAIN_CASES)
def test_pass_training_matches_eager(qk, kv, dtype, num_items, lora, monkeypatch):
    model = make_model(tiny_config(qk, kv, layers=1), dtype).train()
    if lora:
        model = with_lora(model).train()
    ids, am = padded_inputs()
    inputs = dict(input_ids=ids, attention_mask=am, labels=labels_for(ids, am))
    if num_items:
        inputs["num_items_in_batch"] = torch.tensor(11)
    ref_out, ref_grads = train_step(model, **inputs)
    assert ref_out.logits is not None
    fp32_grads = None
    if dtype != torch.float32:  # bf16: judge both against an fp32 eager copy of the same weights
        model32 = make_model(tiny_config(qk, kv, layers=1), torch.float32).train()
        model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        fp32_out, fp32_grads = train_step(model32, **inputs)

    cc.optimize(model, passes=[PASS], dynamic=lora, training_rewrites=True)  # the LoRA case also covers dynamic shapes
    calls = count_op_calls(monkeypatch)
    with recording() as graphs, torch._inductor.config.patch(force_disable_caches=True):
        out, grads = train_step(model, **inputs)
    assert sum(g.get(PASS, 0) for g in graphs) == 1, graphs
    assert len(calls) == 1, "the compiled training step did not run cohere::linear_cross_entropy"
    assert out.logits is None  # dropped in training so the logits never exist
    assert set(grads) == set(ref_grads)
    if lora:  # only adapters train; the tied embedding / LM head is frozen
        assert grads and all("lora_" in name for name in grads)
    else:
        assert "model.embed_tokens.weight" in grads
    if dtype == torch.float32:
        assert abs(out.loss.item() - ref_out.loss.item()) < 1e-5 * abs(ref_out.loss.item())
        for name, g in grads.items():
            assert rel_err(g, ref_grads[name]) < 1e-4, name
    else:
        assert abs(out.loss.item() - fp32_out.loss.item()) < 1e-2 * abs(fp32_out.loss.item())
        for name, g in grads.items():
            eager_err = rel_err(ref_grads[name], fp32_grads[name])
            assert rel_err(g, fp32_grads[name]) < 2 * eager_err + 5e-3, name


def test_keep_training_logits_does_not_fuse_and_stays_correct(monkeypatch):
    model = make_model(tiny_config(False, 2, layers=1), torch.float32).train()
    ids, am = padded_inputs()
    inputs = dict(input_ids=ids, attention_mask=am, labels=labels_for(ids, am))
    ref_out, ref_grads = train_step(model, **inputs)
    cc.optimize(model, passes=[PASS], keep_training_logits=True)
    calls = count_op_calls(monkeypatch)
    with recording() as graphs, torch._inductor.config.patch(force_disable_caches=True):
        out, grads = train_step(model, **inputs)
    assert sum(g.get(PASS, 0) for g in graphs) == 0 and not calls
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert abs(out.loss.item() - ref_out.loss.item()) < 1e-5 * ref_out.loss.item()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, name
    # optimize again without the opt-out re-installs the wrapper (checked eagerly through
    # model.forward itself, which the compiled __call__ would wrap: no second compile)
    cc.optimize(model, passes=[PASS], training_rewrites=True)
    assert isinstance(model.__dict__["forward"], ForwardWithoutTrainingLogits)
    assert model.forward(**inputs).logits is None
    model.eval()
    assert model.forward(**inputs).logits is not None


def test_eval_loss_without_grad_uses_inference_pattern(monkeypatch):
    """Eval mode keeps HF's outputs (logits included); a compiled function that only needs
    the loss gets the forward-only rewrite."""
    model = make_model(tiny_config(True, 4, layers=1), torch.float32)
    ids, am = padded_inputs()
    labels = labels_for(ids, am)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, labels=labels)
    backend = make_backend({"passes": [PASS]})
    loss_fn = torch.compile(lambda i, a, y: model(input_ids=i, attention_mask=a, labels=y).loss, backend=backend)
    calls = count_op_calls(monkeypatch)
    with torch.no_grad(), recording() as graphs, torch._inductor.config.patch(force_disable_caches=True):
        loss = loss_fn(ids, am, labels)
    assert sum(g.get(PASS, 0) for g in graphs) == 1 and len(calls) == 1
    assert abs(loss.item() - ref.loss.item()) < 1e-5 * ref.loss.item()
    cc.optimize(model, passes=[PASS], training_rewrites=True)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is not None and rel_err(out.logits, ref.logits) < 1e-5


def test_explain_counts_the_fused_loss():
    model = make_model(tiny_config(False, 2, layers=1), torch.float32).train()
    ids, am = padded_inputs()
    cc.optimize(model, passes=[PASS], training_rewrites=True)
    rep = cc.explain(model, ids, attention_mask=am, labels=labels_for(ids, am))
    assert rep.matches[PASS] == 1 and rep.expected[PASS] == 1 and rep.missing == {}
    assert rep.graph_breaks == 0
