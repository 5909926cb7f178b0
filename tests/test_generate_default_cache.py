"""cc.optimize(model, paged_cache=True) makes cc.PagedKVCache the default cache of Hugging Face
generate (cohere_compile/cache/hf_default.py; opt-in, off by default): the compiled model's greedy
generate against the eager model's (DynamicCache), which cache each kind of call gets, and the
default / opt-out.

Only the first test compiles. The others check which cache generate builds and that the tokens
stay HF's; that choice is made in Python before any forward, so they run the optimized model
with Dynamo disabled (eager forwards through the same caches) to stay fast on CPU."""

import pytest
import torch
import transformers
from conftest import make_model, padded_inputs, tiny_config
from torch._dynamo.utils import counters
from transformers import DynamicCache, StaticCache

import cohere_compile as cc
from cohere_compile.api import options_of
from cohere_compile.cache import hf_default

PROMPT = 9  # padded_inputs' sequence length
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)


def _config():
    cfg = tiny_config(True, 2)
    # sharper logits than the default init, so greedy tokens depend on the context
    cfg.logit_scale, cfg.initializer_range = 1.0, 0.2
    return cfg


@pytest.fixture
def built(monkeypatch):
    """Every PagedKVCache the generate hook constructs, in order."""
    made = []

    class Spy(cc.PagedKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(hf_default, "PagedKVCache", Spy)
    return made


@pytest.fixture
def eager():
    with torch._dynamo.config.patch(disable=True):
        yield


def _inputs(batch):
    ids, mask = padded_inputs(batch, PROMPT, pad=3)  # batch 2: row 1 left-padded by 3
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.usefixtures("ops_torch_path")
def test_optimized_generate_uses_paged_cache_and_matches_eager(built):
    """Compiled: batch 1, then a left-padded batch of 2 (one compiled model, two calls)."""
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), paged_cache=True)
    assert options_of(model).paged_cache is True
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for batch in (1, 2):
        want = ref.generate(**_inputs(batch), max_new_tokens=8, **GREEDY)
        assert type(want.past_key_values) is DynamicCache
        new = want.sequences[:, PROMPT:]
        assert len(set(new.flatten().tolist())) > 2  # not a constant stream: a wrong cache would show
        got = model.generate(**_inputs(batch), max_new_tokens=8, **GREEDY)
        assert torch.equal(got.sequences, want.sequences)
        cache = got.past_key_values
        assert len(built) == batch and cache is built[-1]  # one fresh cache per call, the one generate used
        # sized for this request: HF's max_cache_length = 9 + 8 - 1 = 16 tokens a row -> one 64-token block
        assert (cache.rows, cache.block_size, cache.max_seq_len, cache.num_blocks) == (batch, 64, 64, batch)
        assert (cache.dtype, cache.device) == (torch.float32, torch.device("cpu"))
        assert cache.seq_lens == [PROMPT + 8 - 1] * batch  # every fed token went through it
    # the compiled model ran (not eager HF), with each forward planned before it ran: no graph
    # break; one prefill and one decode graph per batch size
    assert counters["stats"]["unique_graphs"] - graphs_before == 4
    assert sum(counters["graph_break"].values()) == breaks_before


@pytest.mark.parametrize("lengths,blocks", [
    (dict(max_new_tokens=5), 1),  # max_cache_length 60 + 5 - 1 = 64: exactly one block
    (dict(max_new_tokens=6), 2),  # 65: a second block
    (dict(max_length=66), 2),     # 65 through max_length
    ({}, 2),                      # HF's default: 20 new tokens, 79
])
def test_cache_is_sized_from_hfs_resolved_length(built, eager, lengths, blocks):
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), paged_cache=True)
    ids, mask = padded_inputs(1, 60)
    want = ref.generate(ids, attention_mask=mask, **lengths, **GREEDY)
    got = model.generate(ids, attention_mask=mask, **lengths, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    (cache,) = built
    assert got.past_key_values is cache and cache.max_seq_len == 64 * blocks and cache.num_blocks == blocks
    assert cache.seq_lens == [want.sequences.shape[1] - 1]


def test_sampling_with_return_sequences_gets_one_row_each(built, eager):
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), paged_cache=True)
    kw = dict(_inputs(2), **{**GREEDY, "do_sample": True}, max_new_tokens=6, top_k=20, num_return_sequences=3)
    torch.manual_seed(0)
    want = ref.generate(**kw)
    torch.manual_seed(0)
    got = model.generate(**kw)
    assert torch.equal(got.sequences, want.sequences) and got.sequences.shape[0] == 6
    assert got.past_key_values is built[0] and built[0].rows == 6


@pytest.mark.parametrize("kw", [{}, {"paged_cache": False}], ids=["default", "explicit"])
def test_default_and_opt_out_keep_hf_cache(built, eager, kw):
    """Off unless asked for: on the H200 it measured 0.48x HF's DynamicCache in model.generate."""
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), **kw)
    assert options_of(model).paged_cache is False and not hf_default.is_installed(model)
    got = model.generate(**_inputs(2), max_new_tokens=5, **GREEDY)
    assert type(got.past_key_values) is DynamicCache and built == []
    assert torch.equal(got.sequences, ref.generate(**_inputs(2), max_new_tokens=5, **GREEDY).sequences)
    # optimizing again switches it on and off
    cc.optimize(model, paged_cache=True)
    assert hf_default.is_installed(model)
    assert isinstance(model.generate(**_inputs(1), max_new_tokens=2, **GREEDY).past_key_values, cc.PagedKVCache)
    cc.optimize(model, paged_cache=False)
    assert not hf_default.is_installed(model)


def test_caller_choices_go_to_hf_untouched(built, eager):
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), paged_cache=True)
    want = ref.generate(**_inputs(2), max_new_tokens=5, **GREEDY).sequences
    mine = cc.PagedKVCache(model.config, max_batch_size=2, max_tokens=64, block_size=4, device="cpu")
    got = model.generate(**_inputs(2), max_new_tokens=5, past_key_values=mine, **GREEDY)
    assert got.past_key_values is mine and torch.equal(got.sequences, want)
    dyn = DynamicCache(config=model.config)
    assert model.generate(**_inputs(2), max_new_tokens=5, past_key_values=dyn, **GREEDY).past_key_values is dyn
    got = model.generate(**_inputs(2), max_new_tokens=5, cache_implementation="static", **GREEDY)
    assert type(got.past_key_values) is StaticCache and torch.equal(got.sequences, want)
    config = transformers.GenerationConfig(max_new_tokens=5, cache_implementation="dynamic", **GREEDY)
    got = model.generate(**_inputs(2), generation_config=config)
    assert type(got.past_key_values) is DynamicCache and torch.equal(got.sequences, want)
    got = model.generate(**_inputs(2), max_new_tokens=5, use_cache=False, **GREEDY)
    assert got.past_key_values is None and torch.equal(got.sequences, want)
    assert built == []


def test_beam_search_and_assisted_decoding_keep_hf_cache(built, eager):
    """They reorder (beams) or crop (assisted) the cache, which the paged cache cannot."""
    ref, model = make_model(_config()), cc.optimize(make_model(_config()), paged_cache=True)
    ids, mask = padded_inputs(2, 60)  # 65 tokens a row: two blocks, so a paged cache's pools != rows
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    beams = model.generate(**kw, num_beams=3)
    assert type(beams.past_key_values) is DynamicCache
    assert torch.equal(beams.sequences, ref.generate(**kw, num_beams=3).sequences)
    one = dict(_inputs(1), max_new_tokens=6, **GREEDY)
    greedy = ref.generate(**one).sequences
    lookup = model.generate(**one, prompt_lookup_num_tokens=3)  # assisted decoding, no second model
    assert type(lookup.past_key_values) is DynamicCache and torch.equal(lookup.sequences, greedy)
    # the optimized model as the draft of another model (its cache is cropped too)
    drafted = ref.generate(**one, assistant_model=model)
    assert torch.equal(drafted.sequences, greedy)
    assert built == []
    # and plain greedy still gets the paged cache afterwards
    assert model.generate(**one).past_key_values is built[0]


@pytest.mark.parametrize("order", ["optimize_then_peft", "peft_then_optimize"])
def test_peft_model_generate_reaches_the_paged_cache(built, eager, order, monkeypatch):
    import peft

    plans = []
    plan = cc.PagedKVCache.plan_hf_step
    monkeypatch.setattr(cc.PagedKVCache, "plan_hf_step", lambda self, b, n: (plans.append((b, n)), plan(self, b, n)))
    ref = make_model(_config())
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"])  # B = 0: same logits as ref
    if order == "optimize_then_peft":
        model = peft.get_peft_model(cc.optimize(make_model(_config()), paged_cache=True), lora)
    else:
        model = cc.optimize(peft.get_peft_model(make_model(_config()), lora), paged_cache=True)
    model.eval()
    assert hf_default.is_installed(model.get_base_model())
    got = model.generate(**_inputs(2), max_new_tokens=6, **GREEDY)
    assert got.past_key_values is built[0] and built[0].rows == 2
    assert plans == [(2, PROMPT)] + [(2, 1)] * 5  # every forward planned outside the model (6th token never fed)
    assert torch.equal(got.sequences, ref.generate(**_inputs(2), max_new_tokens=6, **GREEDY).sequences)


def test_install_wraps_an_existing_instance_attribute_and_restores_it(built, eager):
    model = make_model(_config())
    seen = []
    mine = model.prepare_inputs_for_generation  # e.g. set by another library on this instance

    def theirs(*args, **kwargs):
        seen.append(1)
        return mine(*args, **kwargs)

    model.prepare_inputs_for_generation = theirs
    cc.optimize(model, paged_cache=True)
    cc.optimize(model, paged_cache=True)  # idempotent: still one wrapper around theirs
    assert model.prepare_inputs_for_generation.inner is theirs
    assert isinstance(model.generate(**_inputs(1), max_new_tokens=3, **GREEDY).past_key_values, cc.PagedKVCache)
    assert len(seen) == 3
    cc.optimize(model, paged_cache=False)
    assert model.prepare_inputs_for_generation is theirs and "_prepare_cache_for_generation" not in vars(model)


def test_regional_keeps_hf_cache_and_refuses_paged(built, eager):
    model = cc.optimize(make_model(_config()), regional=True)
    assert options_of(model).paged_cache is False and not hf_default.is_installed(model)
    got = model.generate(**_inputs(1), max_new_tokens=3, **GREEDY)
    assert type(got.past_key_values) is DynamicCache and built == []
    with pytest.raises(ValueError, match="paged_cache=True does not combine with regional=True"):
        cc.optimize(make_model(_config()), regional=True, paged_cache=True)


def test_transformers_without_the_hook_fails_before_compiling():
    class OlderHF(transformers.CohereForCausalLM):  # an older signature of the method we hook
        def _prepare_cache_for_generation(self, generation_config, model_kwargs, assistant_model, batch_size,
                                          max_cache_length, device):
            raise AssertionError("not called")

    model = OlderHF(tiny_config(False, 2)).eval()
    with pytest.raises(RuntimeError, match=r"missing: \['generation_mode'\].*paged_cache=False"):
        cc.optimize(model, paged_cache=True)
    assert not hasattr(model, "_cohere_compile_options") and model._compiled_call_impl is None
    cc.optimize(model, paged_cache=False)
    assert options_of(model).paged_cache is False


def test_a_planned_step_that_never_ran_is_an_error():
    cache = cc.PagedKVCache(_config(), max_batch_size=1, max_tokens=16, block_size=4, device="cpu")
    cache.plan_hf_step(1, 3)
    assert cache.get_seq_length() == 0 and cache.seq_lens == [3]  # HF's query offset: before the step
    with pytest.raises(RuntimeError, match="never ran"):
        cache.plan_hf_step(1, 1)


def test_unsizable_request_raises():
    hook = hf_default.PagedDefaultCache(make_model(_config()))
    with pytest.raises(ValueError, match="cannot be sized.*max_new_tokens"):
        hook.make_cache(transformers.GenerationConfig(), 1, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimized_generate_uses_paged_cache_on_cuda(built):
    """On the GPU (Triton kernels, paged_attention on decode): a left-padded batch whose rows
    cross a 64-token block; fp32 so greedy ties stay rare."""
    cfg = transformers.CohereConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True, logit_scale=1.0,
                                    initializer_range=0.2, pad_token_id=0, eos_token_id=2)
    ref, model = make_model(cfg).cuda(), make_model(cfg).cuda()
    cc.optimize(model, paged_cache=True)
    ids, mask = (t.cuda() for t in padded_inputs(3, 50, pad=20))
    kw = dict(attention_mask=mask, max_new_tokens=30, **GREEDY)
    want = ref.generate(ids, **kw)
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    cache = got.past_key_values
    assert cache is built[0] and (cache.rows, cache.max_seq_len, cache.device.type) == (3, 128, "cuda")
    assert cache.seq_lens == [50 + 30 - 1] * 3
