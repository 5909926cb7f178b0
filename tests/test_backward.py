"""Backward of every ``cohere::`` op: each Triton backward kernel (through the interpreter)
against float64 autograd on random odd shapes, and tiny Cohere models trained through
``cc.optimize``: every parameter's gradient against eager Hugging Face, exact rewrite
counts of the joint (forward + backward) graph, and the number of times each of our
backward kernels runs in ``loss.backward()``.

Counting kernel launches (a counting wrapper around each launcher in
``cohere_compile.kernels``) proves the compiled *backward* graph calls our ops: the
decomposed aten backward Inductor would otherwise generate never reaches them, and the
count does not depend on graph caches or on how Inductor names or partitions nodes.
"""

import contextlib

import pytest
import torch

import cohere_compile as cc
from cohere_compile.kernels import attention_backward as attn_kernels
from cohere_compile.kernels import layer_norm as ln_kernels
from cohere_compile.kernels import rope as rope_kernels
from cohere_compile.kernels import swiglu as swiglu_kernels
from cohere_compile.passes import PASS_NAMES, recording
from conftest import make_model, padded_inputs, rel_err, tiny_config

ops = torch.ops.cohere
EPS = 1e-5
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _leaf(x, dtype=None):
    x = x.detach()
    return (x.to(dtype) if dtype is not None else x).requires_grad_()


def _grads_vs_fp64(fn_ours, fn_ref, inputs, grads_out, dtype):
    """Run ``fn_ours`` on ``inputs`` and ``fn_ref`` on their fp64 copies; return the
    relative error of every input gradient (None inputs and non-grad inputs skipped)."""
    ours = [_leaf(x) if x is not None else None for x in inputs]
    ref = [_leaf(x, torch.float64) if x is not None else None for x in inputs]
    out = fn_ours(*ours)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, grads_out)
    out_ref = fn_ref(*ref)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    torch.autograd.backward(out_ref, [g.double() for g in grads_out])
    errs = []
    for a, b in zip(ours, ref):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape
        assert torch.isfinite(a.grad).all()
        errs.append(rel_err(a.grad, b.grad))
    return errs


def _noncontig_like(t):
    """A random gradient with ``t``'s shape whose last two dims are transposed in memory."""
    g = torch.randn(*t.shape[:-2], t.shape[-1], t.shape[-2], dtype=t.dtype).transpose(-1, -2)
    assert not g.is_contiguous()
    return g


# ---------------------------------------------------------------- float64 references


def ref_layer_norm(x, w, eps=EPS):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w


def ref_qk_norm_rope(q, k, qw, kw, cos, sin, eps=EPS, k_eps=None):
    """q: (B, H, T, D); weights (H, D) or None; interleaved RoPE."""
    def rope(x):
        c, s = cos.double()[:, None], sin.double()[:, None]
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        return x * c + rot * s

    if qw is not None:
        q = ref_layer_norm(q, qw[None, :, None, :], eps)
        k = ref_layer_norm(k, kw[None, :, None, :], eps if k_eps is None else k_eps)
    return rope(q), rope(k)


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_matches_fp64(dtype):
    gate, up = torch.randn(3, 7, 333, dtype=dtype) * 3, torch.randn(3, 7, 333, dtype=dtype)
    grad = _noncontig_like(gate)
    errs = _grads_vs_fp64(ops.swiglu, lambda g, u: torch.nn.functional.silu(g) * u, [gate, up], [grad], dtype)
    assert max(errs) < TOL[dtype], errs


def test_swiglu_backward_op_direct_larger_than_one_block():
    gate, up, grad = (torch.randn(2, 1500) for _ in range(3))
    d_gate, d_up = ops.swiglu_backward(grad, gate, up)
    g = gate.double()
    sig = torch.sigmoid(g)
    assert rel_err(d_up, grad.double() * g * sig) < 1e-6
    assert rel_err(d_gate, grad.double() * up.double() * sig * (1 + g * (1 - sig))) < 1e-6


# ---------------------------------------------------------------- layer norm / add3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tensor_eps", [False, True])
def test_layer_norm_backward_matches_fp64(dtype, tensor_eps):
    x = torch.randn(3, 11, 77, dtype=dtype) * 2 + 0.5
    w = 1 + 0.3 * torch.randn(77, dtype=dtype)
    grad = _noncontig_like(x)
    if tensor_eps:
        def ours(x, w):
            return ops.layer_norm_tensor_eps(x, w, torch.tensor(EPS))
    else:
        def ours(x, w):
            return ops.layer_norm(x, w, EPS)
    errs = _grads_vs_fp64(ours, ref_layer_norm, [x, w], [grad], dtype)
    assert max(errs) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_sum", [True, False])
def test_add3_layer_norm_backward_fans_out(dtype, use_sum):
    """Gradient reaches all three addends; the sum output's own gradient joins it when used."""
    r, a, m = (torch.randn(2, 9, 50, dtype=dtype) for _ in range(3))
    w = 1 + 0.3 * torch.randn(50, dtype=dtype)
    g_out = _noncontig_like(r)
    grads = [torch.randn_like(r), g_out] if use_sum else [g_out]

    def ours(r, a, m, w):
        h, out = ops.add3_layer_norm(r, a, m, w, EPS)
        return (h, out) if use_sum else out

    def ref(r, a, m, w):
        h = r + a + m
        return (h, ref_layer_norm(h, w)) if use_sum else ref_layer_norm(h, w)

    errs = _grads_vs_fp64(ours, ref, [r, a, m, w], grads, dtype)
    assert max(errs) < TOL[dtype], errs


def test_layer_norm_backward_op_many_rows_and_grad_h():
    """More rows than programs (each program reduces a block of rows) and ``grad_h`` added."""
    x, dy, dh = torch.randn(37, 24), torch.randn(37, 24), torch.randn(37, 24)
    w = torch.randn(24)
    dx, dw = ops.layer_norm_backward(dy, x, w, EPS, dh)
    xr, wr = _leaf(x, torch.float64), _leaf(w, torch.float64)
    ref_layer_norm(xr, wr).backward(dy.double())
    assert rel_err(dx, xr.grad + dh.double()) < 1e-5
    assert rel_err(dw, wr.grad) < 1e-5


# ---------------------------------------------------------------- qk norm + rope


def _rope_inputs(dtype, b=2, hq=5, hk=3, t=7, d=12, norm=True):
    q = torch.randn(b, t, hq, d, dtype=dtype).transpose(1, 2)  # HF's (B, T, H, D) -> (B, H, T, D) view
    k = torch.randn(b, hk, t, d, dtype=dtype)
    qw = 1 + 0.3 * torch.randn(hq, d, dtype=dtype) if norm else None
    kw = 1 + 0.3 * torch.randn(hk, d, dtype=dtype) if norm else None
    ang = (torch.rand(1, t, d // 2) * 6).repeat_interleave(2, -1)
    return q, k, qw, kw, ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_backward_matches_fp64(dtype, norm):
    q, k, qw, kw, cos, sin = _rope_inputs(dtype, norm=norm)
    grads = [_noncontig_like(q), torch.randn(k.shape, dtype=dtype)]

    def ours(q, k, qw, kw):
        return ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)

    def ref(q, k, qw, kw):
        return ref_qk_norm_rope(q, k, qw, kw, cos, sin)

    errs = _grads_vs_fp64(ours, ref, [q, k, qw, kw], grads, dtype)
    assert len(errs) == (4 if norm else 2)
    assert max(errs) < TOL[dtype], errs


def test_qk_norm_rope_backward_tensor_eps_and_many_tokens():
    q, k, qw, kw, cos, sin = _rope_inputs(torch.float32, b=3, t=13, hq=4, hk=4, d=8)
    grads = [torch.randn(q.shape), torch.randn(k.shape)]

    def ours(q, k, qw, kw):
        return ops.qk_norm_rope_tensor_eps(q, k, qw, kw, cos, sin, torch.tensor(EPS))

    errs = _grads_vs_fp64(ours, lambda *a: ref_qk_norm_rope(*a, cos, sin), [q, k, qw, kw], grads, torch.float32)
    assert max(errs) < 1e-5, errs


def test_qk_norm_rope_backward_tensor_eps_with_own_k_eps():
    q, k, qw, kw, cos, sin = _rope_inputs(torch.float32, b=2, t=5, hq=4, hk=2, d=8)
    grads = [torch.randn(q.shape), torch.randn(k.shape)]

    def ours(q, k, qw, kw):
        return ops.qk_norm_rope_tensor_eps(q, k, qw, kw, cos, sin, torch.tensor(EPS), torch.tensor(0.5))

    def ref(*args):
        return ref_qk_norm_rope(*args, cos, sin, EPS, 0.5)

    errs = _grads_vs_fp64(ours, ref, [q, k, qw, kw], grads, torch.float32)
    assert len(errs) == 4 and max(errs) < 1e-5, errs


def test_qk_norm_rope_backward_rejects_grad_for_cos():
    q, k, qw, kw, cos, sin = _rope_inputs(torch.float32)
    cos = cos.requires_grad_()
    q_out, k_out = ops.qk_norm_rope(q.requires_grad_(), k, qw, kw, cos, sin, EPS)
    with pytest.raises(RuntimeError, match="no gradient for cos, sin or eps"):
        (q_out.sum() + k_out.sum()).backward()


# ---------------------------------------------------------------- flash attention


def ref_attention(q, k, v, mask, scale, is_causal):
    """softmax(q k^T * scale + mask) v in fp64, K/V repeated per GQA group; rows that
    see nothing give zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    visible = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            visible = visible & (mask > torch.finfo(mask.dtype).min / 2)
            s = s + torch.where(visible, mask.double(), 0.0)
    if is_causal:
        visible = visible & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0) @ v


def _attention_inputs(dtype, b, h, hk, q_len, kv_len, d, mask_kind):
    q = torch.randn(b, q_len, h, d, dtype=dtype).transpose(1, 2)  # HF layout views
    k = torch.randn(b, hk, kv_len, d, dtype=dtype)
    v = torch.randn(b, kv_len, hk, d, dtype=dtype).transpose(1, 2)
    mask = None
    if mask_kind == "additive":  # HF's padding mask (finfo.min) plus a finite bias
        mask = (torch.randn(b, 1, q_len, kv_len) * 0.5).to(dtype)
        mask[-1, :, :, :3] = torch.finfo(dtype).min
    elif mask_kind == "bool-per-head":
        mask = torch.rand(b, h, q_len, kv_len) > 0.3
    return q, k, v, mask


ATTN_CASES = [
    # dtype, batch, heads, kv heads, q_len, kv_len, head_dim, mask, causal
    pytest.param(torch.float32, 2, 4, 2, 19, 19, 24, None, False, id="fp32-gqa-dense"),
    pytest.param(torch.bfloat16, 2, 4, 2, 21, 21, 16, "additive", True, id="bf16-gqa-causal-padding"),
    pytest.param(torch.float32, 1, 3, 3, 17, 23, 20, "bool-per-head", False, id="fp32-mha-bool-q<kv"),
    pytest.param(torch.bfloat16, 1, 6, 2, 13, 30, 32, None, True, id="bf16-gqa3-causal-q<kv"),
]


@pytest.mark.parametrize("dtype,b,h,hk,q_len,kv_len,d,mask_kind,causal", ATTN_CASES)
def test_flash_attention_backward_matches_fp64(dtype, b, h, hk, q_len, kv_len, d, mask_kind, causal):
    q, k, v, mask = _attention_inputs(dtype, b, h, hk, q_len, kv_len, d, mask_kind)
    scale = d ** -0.5
    grad = _noncontig_like(torch.empty(b, h, q_len, d, dtype=dtype))

    def ours(q, k, v):
        return ops.flash_attention_lse(q, k, v, mask, scale, causal)[0]

    errs = _grads_vs_fp64(ours, lambda q, k, v: ref_attention(q, k, v, mask, scale, causal), [q, k, v], [grad], dtype)
    assert max(errs) < TOL[dtype], errs


def test_flash_attention_lse_is_the_log_sum_exp_in_log2_units():
    q, k, v, mask = _attention_inputs(torch.float32, 2, 4, 2, 11, 11, 16, "additive")
    _, lse = ops.flash_attention_lse(q, k, v, mask, 0.25, True)
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25 + mask.double()
    s = s.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    s = s.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))
    ref = torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    finite = torch.isfinite(ref)
    assert lse.shape == (2, 4, 11) and lse.dtype == torch.float32
    assert rel_err(lse[finite], ref[finite]) < 1e-6
    assert torch.equal(torch.isneginf(lse), ~finite)  # the padded queries see nothing: -inf


def test_flash_attention_backward_fully_masked_rows_get_zero_grad():
    q, k, v, _ = _attention_inputs(torch.float32, 1, 2, 1, 6, 6, 16, None)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 sees no key
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.flash_attention_lse(*leaves, mask, 0.25, False)[0]
    out.backward(torch.randn_like(out))
    assert torch.equal(leaves[0].grad[:, :, 2], torch.zeros_like(leaves[0].grad[:, :, 2]))
    assert torch.isfinite(leaves[1].grad).all() and torch.isfinite(leaves[2].grad).all()


def test_flash_attention_inference_op_backward_recomputes_lse():
    """The inference op ``cohere::flash_attention`` is differentiable too (one extra forward)."""
    q, k, v, mask = _attention_inputs(torch.float32, 1, 4, 2, 9, 9, 16, "additive")

    def ours(q, k, v):
        return ops.flash_attention(q, k, v, mask, 0.25, True)

    errs = _grads_vs_fp64(ours, lambda q, k, v: ref_attention(q, k, v, mask, 0.25, True), [q, k, v],
                          [torch.randn(1, 4, 9, 16)], torch.float32)
    assert max(errs) < 1e-5, errs


def test_flash_attention_rejects_mask_grad():
    q, k, v, mask = _attention_inputs(torch.float32, 1, 2, 2, 5, 5, 16, "additive")
    out = ops.flash_attention_lse(q.requires_grad_(), k, v, mask.requires_grad_(), 0.25, False)[0]
    with pytest.raises(RuntimeError, match="mask gets no gradient"):
        out.sum().backward()


# ---------------------------------------------------------------- gradcheck (fp32: our ops reject fp64)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_all_backward_ops():
    """Finite differences against each op's registered backward. The ops serve fp32 /
    bf16 / fp16 only, so this runs in fp32 with tolerances to match."""
    kw = dict(eps=1e-2, atol=2e-2, rtol=2e-2, fast_mode=True)
    x = torch.randn(3, 10, dtype=torch.float32, requires_grad=True)
    y = torch.randn(3, 10, dtype=torch.float32, requires_grad=True)
    w = (1 + 0.3 * torch.randn(10)).requires_grad_()
    assert torch.autograd.gradcheck(ops.swiglu, (x, y), **kw)
    assert torch.autograd.gradcheck(lambda x, w: ops.layer_norm(x, w, EPS), (x, w), **kw)
    m = torch.randn(3, 10)
    assert torch.autograd.gradcheck(lambda a, b, w: ops.add3_layer_norm(a, b, m, w, EPS), (x, y, w), **kw)
    q, k, qw, kw_, cos, sin = _rope_inputs(torch.float32, b=1, hq=2, hk=1, t=3, d=4)
    leaves = [t.detach().requires_grad_() for t in (q, k, qw, kw_)]
    assert torch.autograd.gradcheck(lambda *a: ops.qk_norm_rope(*a, cos, sin, EPS), leaves, **kw)
    q, k, v, mask = _attention_inputs(torch.float32, 1, 2, 1, 5, 5, 16, "additive")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: ops.flash_attention_lse(*a, mask, 0.25, True)[0], leaves, **kw)


# ---------------------------------------------------------------- tiny Cohere models, trained

LAYERS = 2
# Backward kernel launches per loss.backward() with every pass on: one per rewritten subgraph.
BACKWARD_LAUNCHERS = {
    "swiglu": (swiglu_kernels, "swiglu_backward"),
    "layer_norm": (ln_kernels, "layer_norm_backward"),
    "qk_norm_rope": (rope_kernels, "qk_norm_rope_backward"),
    "attention": (attn_kernels, "flash_attention_backward"),
}


@contextlib.contextmanager
def counting_backward_kernels(monkeypatch):
    """Counts launches per pass; for attention also records the K heads the backward got
    (the KV heads when GQA is native, the query heads if K/V were repeated)."""
    counts = {name: 0 for name in BACKWARD_LAUNCHERS}
    counts["attention_k_heads"] = set()
    for name, (module, attr) in BACKWARD_LAUNCHERS.items():
        original = getattr(module, attr)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            if _name == "attention":
                counts["attention_k_heads"].add(args[2].shape[1])  # (grad_out, q, k, ...)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)
    yield counts


def _train_step(model, ids, am, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# (use_qk_norm, kv heads, attn implementation, frozen, dynamic): "frozen" trains like LoRA
# does around the layers (embeddings and norm weights frozen), exercising the patterns
# whose inputs do not all need grad and the inference-style match of the first norm;
# dynamic=True turns the norms' eps into graph inputs (the *_tensor_eps twins).
TRAIN_CONFIGS = [
    pytest.param(True, 2, "sdpa", False, True, id="qknorm-gqa-sdpa-full-dynamic"),
    pytest.param(False, 4, "eager", True, False, id="noqknorm-mha-eager-frozen-static"),
    pytest.param(True, 2, "sdpa", True, False, id="qknorm-gqa-sdpa-frozen-static"),
]


@pytest.mark.parametrize("use_qk_norm,kv_heads,attn,frozen,dynamic", TRAIN_CONFIGS)
def test_training_gradients_match_eager_and_backward_uses_our_kernels(
    use_qk_norm, kv_heads, attn, frozen, dynamic, monkeypatch
):
    model = make_model(tiny_config(use_qk_norm, kv_heads, attn, layers=LAYERS), torch.float32).train()
    if frozen:
        for name, p in model.named_parameters():
            if "embed" in name or "norm" in name:
                p.requires_grad_(False)
    ids, am = padded_inputs()
    labels = ids.masked_fill(am == 0, -100)
    ref_loss, ref_grads = _train_step(model, ids, am, labels)
    assert len(ref_grads) > 0

    cc.optimize(model, passes=PASS_NAMES, dynamic=dynamic, training_rewrites=True)
    with counting_backward_kernels(monkeypatch) as launches, recording() as graphs, \
            torch._inductor.config.patch(force_disable_caches=True):
        loss, grads = _train_step(model, ids, am, labels)

    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    errs = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    assert max(errs.values()) < 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:3]

    # One joint graph. SDPA's training form (forward + backward pair) is rewritten; HF
    # eager attention in training is not (its pattern is forward-only): 0 there.
    assert len(graphs) == 1, graphs
    n_attn = LAYERS if attn == "sdpa" else 0
    # the loss (labels given, training) is fused too: linear_cross_entropy is in PASS_NAMES
    expected = {"qk_norm_rope": LAYERS, "causal_attention": 0, "attention": n_attn, "paged_attention": 0,
                "swiglu": LAYERS, "layer_norm": LAYERS + 1, "linear_cross_entropy": 1}
    assert graphs[0] == expected
    # Frozen norms: the first norm's input (the embeddings) needs no grad, so it has no
    # backward at all; the fused add3 norms still backpropagate to the residual stream.
    want = {"swiglu": LAYERS, "qk_norm_rope": LAYERS, "layer_norm": LAYERS if frozen else LAYERS + 1,
            "attention": n_attn, "attention_k_heads": {kv_heads} if n_attn else set()}
    assert launches == want


def test_training_patterns_survive_a_first_build_under_inference_mode():
    """Patterns are built once per process; a first build inside torch.inference_mode
    (e.g. under generate) must still register the joint (training) variants."""
    from cohere_compile.passes import swiglu

    def n_entries(pass_):
        return sum(len(v) for v in pass_.patterns.values())

    normal = n_entries(swiglu.build()[0])
    with torch.inference_mode():
        under_inference = n_entries(swiglu.build()[0])
    # fwd_only x {fp32, bf16} + joint_fwd_bwd x {fp32, bf16, fp16} traces, + the torch 2.11 form of
    # the joint graph with an fp32 gate x {bf16, fp16}
    assert normal == under_inference == 7


def test_plain_torch_backward_path(monkeypatch):
    """CPU without TRITON_INTERPRET: the backward ops take the autograd-based references, which
    must record autograd inside the custom op (the dispatcher excludes autograd there)."""
    from cohere_compile.ops import attention, norm, reference, rope

    for module in (attention, norm, rope):
        monkeypatch.setattr(module, "use_triton", lambda t: False)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    cs = torch.randn(1, 5, 8, generator=g)
    qw, kw = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    cases = [
        (lambda x, w: torch.ops.cohere.layer_norm(x, w, EPS), lambda x, w: reference.layer_norm(x, w, EPS), (x, w)),
        (lambda q, k, qw, kw: sum(o.sum() for o in torch.ops.cohere.qk_norm_rope(q, k, qw, kw, cs, cs, EPS)),
         lambda q, k, qw, kw: sum(o.sum() for o in reference.qk_norm_rope(q, k, qw, kw, cs, cs, EPS)), (q, k, qw, kw)),
        (lambda q, k: torch.ops.cohere.flash_attention(q, k, k, None, 0.3, True),
         lambda q, k: reference.flash_attention(q, k, k, None, 0.3, True), (q, k)),
    ]
    for op, ref, inputs in cases:
        ours = [t.clone().requires_grad_() for t in inputs]
        want = [t.clone().requires_grad_() for t in inputs]
        op(*ours).sum().backward()
        ref(*want).sum().backward()
        for a, b in zip(ours, want):
            assert rel_err(a.grad, b.grad) < 1e-5
