"""Gated DeltaNet's own identities (the chunked form and the decode step equal the token-by-token reference), what
test_mixers.py's contract does not check of it (the in-place step is taken, q/k/v biases and padding, speculative
rollback of its states, gradients reaching its new parameters), its settings and its conversion from attention."""

import copy

import pytest
import torch
from tiny import TINY, TOLERANCES, count_steps, decode_one_by_one, make_tiny, tiny_hybrid
from tiny import word_tokenizer as make_word_tokenizer

import hybridize
from hybridize.convert import ConvertConfig
from hybridize.convert.gdn import init_gdn_from_attention
from hybridize.generate import GenerateConfig, generate
from hybridize.generate.speculative import _rollback_for
from hybridize.modeling import HybridConfig, HybridForCausalLM, RollbackCacheLayer
from hybridize.modeling.gdn import (
    GatedDeltaNetCacheLayer,
    GatedDeltaNetMixer,
    GatedDeltaNetMixerConfig,
    gdn_chunked,
    gdn_ref,
    gdn_step,
    l2_normalize,
)

CHUNK = 8
LAYERS = ["gdn", "attention", "gdn", "gdn"]


def _hybrid(dtype=torch.float32, **settings) -> HybridForCausalLM:
    return tiny_hybrid(LAYERS, dtype, {"gdn": {"chunk_size": CHUNK, **settings}})


def _inputs(length, dtype, b=2, h=4, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(b, length, h, d, generator=gen, dtype=dtype)) / d**0.5
    k = l2_normalize(torch.randn(b, length, h, d, generator=gen, dtype=dtype))
    v = torch.randn(b, length, h, d, generator=gen, dtype=dtype)
    g = -torch.rand(b, length, h, generator=gen, dtype=dtype) * 2  # alpha in (e^-2, 1)
    beta = torch.rand(b, length, h, generator=gen, dtype=dtype)
    state = torch.randn(b, h, d, d, generator=gen, dtype=dtype)
    return q, k, v, g, beta, state


# The three paths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("chunk_size", [CHUNK, 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_and_step_equal_the_reference(dtype, length, chunk_size, with_state):
    q, k, v, g, beta, state = _inputs(length, dtype)
    state = state if with_state else None
    o_ref, s_ref = gdn_ref(q, k, v, g, beta, state)
    o, s = gdn_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(s, s_ref, **TOLERANCES[dtype])
    stepped = torch.zeros_like(s_ref) if state is None else state.clone()
    o_step = torch.stack([gdn_step(stepped, *(t[:, i] for t in (q, k, v, g, beta))) for i in range(length)], 1)
    torch.testing.assert_close(o_step, o_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(stepped, s_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("length", [1, 63, 64, 193])
@pytest.mark.parametrize("with_state", [False, True])
def test_float32_chunked_is_within_1e5_of_the_float64_reference(length, with_state):
    """The default chunk (64) at lengths 1, chunk - 1, chunk and 3 chunks + 1: absolute error below 1e-5."""
    inputs = _inputs(length, torch.float64, d=16)
    state = inputs[-1] if with_state else None
    o_ref, s_ref = gdn_ref(*inputs[:-1], state)
    o, s = gdn_chunked(*(t.float() for t in inputs[:-1]), None if state is None else state.float())
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=1e-5)


def test_chunked_prefill_then_steps_equal_one_chunked_pass():
    q, k, v, g, beta, _ = _inputs(2 * CHUNK + 3, torch.float64)
    o_full, s_full = gdn_chunked(q, k, v, g, beta, chunk_size=CHUNK)
    split = CHUNK + 2
    o, state = gdn_chunked(*(t[:, :split] for t in (q, k, v, g, beta)), chunk_size=CHUNK)
    outputs = [o] + [gdn_step(state, *(t[:, i] for t in (q, k, v, g, beta)))[:, None] for i in range(split, 19)]
    torch.testing.assert_close(torch.cat(outputs, 1), o_full, **TOLERANCES[torch.float64])
    torch.testing.assert_close(state, s_full, **TOLERANCES[torch.float64])


def test_delta_rule_by_hand():
    """One head, d = 1 (k = +-1): S_t = alpha S (1 - beta) + beta v k, o = S q."""
    k = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    v = torch.tensor([2.0, 1.0, -3.0], dtype=torch.float64).view(1, 3, 1, 1)
    q = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    alpha = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)
    beta = torch.tensor([0.25, 1.0, 0.5], dtype=torch.float64)
    S, expected = 0.0, []
    for t in range(3):
        S = alpha[t] * S * (1 - beta[t] * k.flatten()[t] ** 2) + beta[t] * v.flatten()[t] * k.flatten()[t]
        expected.append(S * q.flatten()[t])
    o, _ = gdn_chunked(q, k, v, alpha.log().view(1, 3, 1), beta.view(1, 3, 1), chunk_size=2)
    torch.testing.assert_close(o.flatten(), torch.stack(expected))


def test_chunked_gradients_equal_the_reference():
    inputs = [t.requires_grad_() for t in _inputs(2 * CHUNK + 1, torch.float64)]
    grads = []
    for scan in (gdn_ref, lambda *a: gdn_chunked(*a, chunk_size=CHUNK)):
        o, s = scan(*inputs)
        grads.append(torch.autograd.grad((o.sin().sum() + s.cos().sum()), inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


# The mixer in a model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 1])
def test_ref_equals_chunked_equals_step_in_the_model(monkeypatch, dtype, length):
    ref, fast = _hybrid(dtype, impl="ref"), _hybrid(dtype)
    ids = torch.randint(0, 128, (2, length))
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(fast(ids).logits, expected, **TOLERANCES[dtype])
    steps = count_steps(monkeypatch, GatedDeltaNetMixer)
    stepped, _ = decode_one_by_one(fast, ids, torch.ones_like(ids), prefill=1)
    torch.testing.assert_close(stepped, expected, **TOLERANCES[dtype])
    assert len(steps) == 3 * (length - 1)  # every decode token of every GDN layer took the in-place step


def test_left_padding_with_q_k_v_biases_does_not_change_the_sequence():
    """Padded positions never enter the conv or the state, also with q/k/v biases (Qwen2), which a padded position's
    projection would otherwise carry into the conv."""
    model = HybridForCausalLM(HybridConfig(**TINY, mixer_types=LAYERS, attention_bias=True)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ids = torch.randint(1, 128, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 4:]
    torch.testing.assert_close(out, model(ids).logits, rtol=1e-9, atol=1e-9)


def test_batched_decode_with_left_padding_equals_one_forward(monkeypatch):
    model = _hybrid(torch.float64)
    ids = torch.randint(1, 128, (2, 21))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    stepped, _ = decode_one_by_one(model, ids, mask, prefill=9)
    full = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(stepped[1], full[1], **TOLERANCES[torch.float64])
    torch.testing.assert_close(stepped[0, 5:], full[0, 5:], **TOLERANCES[torch.float64])


def _gdn_states(cache):
    return [
        (layer.conv_states[0].clone(), layer.recurrent_states[0].clone())
        for layer in cache.layers
        if isinstance(layer, GatedDeltaNetCacheLayer)
    ]


@pytest.mark.parametrize("keep", range(6))
def test_speculative_rollback_equals_a_run_without_the_rejected_tokens(keep):
    """Batch 2, the first row left-padded: 5 tokens verified in two calls over the cache give the logits of the
    generic path, and `commit(keep)` leaves the states, and the next logits, of a run that only saw the kept ones."""
    model = _hybrid(torch.float64)
    ids = torch.randint(1, 128, (2, 15))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(cache, start, end):
        span = slice(start, end)
        out = model(ids[:, span], attention_mask=mask[:, :end], position_ids=positions[:, span], cache=cache)
        return out.logits, out.cache

    with torch.no_grad():
        generic, _ = run(run(None, 0, 9)[1], 9, 14)
        _, cache = run(None, 0, 9)
        rollbacks = [_rollback_for(layer, i) for i, layer in enumerate(cache.layers)]
        for rollback in rollbacks:
            rollback.begin()
        verified = torch.cat([run(cache, 9, 12)[0], run(cache, 12, 14)[0]], 1)
        torch.testing.assert_close(verified, generic, **TOLERANCES[torch.float64])
        for rollback in rollbacks:
            rollback.commit(keep)
        _, expected_cache = run(None, 0, 9 + keep)
        for (conv, state), (conv_ref, state_ref) in zip(_gdn_states(cache), _gdn_states(expected_cache)):
            torch.testing.assert_close(conv, conv_ref, **TOLERANCES[torch.float64])
            torch.testing.assert_close(state, state_ref, **TOLERANCES[torch.float64])
        after, _ = run(cache, 9 + keep, 15)
        expected, _ = run(expected_cache, 9 + keep, 15)
        torch.testing.assert_close(after, expected, **TOLERANCES[torch.float64])
    assert all(layer.checkpoint is None for layer in cache.layers if isinstance(layer, RollbackCacheLayer))


def test_greedy_speculation_equals_target_greedy():
    torch.manual_seed(0)  # weights large enough (initializer_range 0.3) that greedy decoding does not loop on a token
    config = HybridConfig(**TINY, initializer_range=0.3, mixer_types=LAYERS, mixers={"gdn": {"chunk_size": CHUNK}})
    model = HybridForCausalLM(config).eval()
    prompt = torch.randint(3, 128, (1, 9))
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, 9:].tolist()
    torch.manual_seed(1)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    config = GenerateConfig(max_new_tokens=16, draft_tokens=3, adaptive=False, ignore_eos=False)
    result = generate(model, config, tokenizer=make_word_tokenizer(eos="w2"), prompt=prompt[0].tolist(), draft=draft)
    assert list(result.token_ids) == expected
    assert 0 < result.accepted < result.drafted  # some drafts were accepted, some rolled back


def test_gradients_reach_the_new_parameters():
    model = _hybrid().train()
    ids = torch.randint(0, 128, (2, 19))
    model(ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("A_log", "dt_bias", "a_proj.weight", "b_proj.weight", "g_proj.weight", "conv1d.weight"):
        assert grads[f"model.layers.0.mixer.{name}"].abs().sum() > 0, name


def test_settings_default_to_the_attention_and_are_validated():
    config = HybridConfig(**TINY, mixer_types=LAYERS)
    s = GatedDeltaNetMixerConfig.from_hybrid_config(config)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.chunk_size, s.impl) == (4, 2, 16, 64, "auto")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        GatedDeltaNetMixerConfig(num_heads=4, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="impl"):
        GatedDeltaNetMixerConfig(num_heads=4, num_kv_heads=2, head_dim=8, impl="fast")
    with pytest.raises(ValueError, match="unknown gdn settings"):
        HybridForCausalLM(HybridConfig(**TINY, mixer_types=LAYERS, mixers={"gdn": {"chunk": 8}}))


def test_init_weights_spreads_the_decays():
    mixer = GatedDeltaNetMixer(HybridConfig(**TINY, mixer_types=LAYERS), 0)
    A, dt = mixer.A_log.exp(), torch.nn.functional.softplus(mixer.dt_bias)
    torch.testing.assert_close(A[[0, -1]], torch.tensor([1.0, 16.0]))
    torch.testing.assert_close(dt[[0, -1]], torch.tensor([1e-3, 1e-1]))
    assert torch.equal(mixer.norm.weight, torch.ones(16))


# The initialiser


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_init_from_attention_copies_q_k_v_o(family):
    source = make_tiny(family)
    config = HybridConfig(
        **TINY,
        mixer_types=LAYERS,
        attention_bias=family == "qwen2",
        attention_out_bias=False,
        mixers={"gdn": {"chunk_size": CHUNK}},
    )
    attn = source.model.layers[2].self_attn
    mixer = init_gdn_from_attention(
        attn, config, 2, ConvertConfig(mixer="gdn", mixer_init="attention"), torch.Generator().manual_seed(0)
    )
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for key, value in getattr(attn, name).state_dict().items():
            assert torch.equal(getattr(mixer, name).state_dict()[key], value), f"{name}.{key}"
    # a delta conv and constant gates: q, k and v pass through the conv unchanged up to its tap
    weight = mixer.conv1d.weight[:, 0]
    assert not weight[:, :-1].any() and torch.all(weight[:, -1] == weight[0, -1])
    assert not mixer.a_proj.weight.any() and not mixer.b_proj.weight.any()
    x = torch.randn(2, 3 * CHUNK + 1, TINY["hidden_size"])
    out = mixer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mixer_init", ["calibrated", "random"])
def test_convert_calibrates_the_gate_and_the_decays(tokenizer, text_file, mixer_init):
    from hybridize.convert.calibrated import HALF_LIVES

    source = make_tiny("llama")
    config = ConvertConfig(
        mixer="gdn",
        attn_layers=(1,),
        mixer_init=mixer_init,
        mixer_settings={"chunk_size": CHUNK},
        calibration=str(text_file),
        calibration_docs=4,
        calibration_len=64,
    )
    hybrid = hybridize.convert(source, config, tokenizer=tokenizer)
    assert hybrid.config.mixer_types == LAYERS
    mixer, attn = hybrid.model.layers[0].mixer, source.model.layers[0].self_attn
    assert torch.equal(mixer.v_proj.weight, attn.v_proj.weight) == (mixer_init == "calibrated")
    if mixer_init == "calibrated":
        report = hybrid.hybridize_steps[-1]["metrics"]["readout"]["0"]
        assert set(report["half_lives"]) <= set(HALF_LIVES) and report["gate"] in ("mean", "random")
        assert ("betas" in report) == (report["gate"] == "mean")  # both need the inputs on their mean's side
        assert not torch.equal(mixer.o_proj.weight, attn.o_proj.weight)  # refit on the source attention's output
    ids = torch.randint(0, 128, (1, 20))
    assert torch.isfinite(hybrid(ids).logits).all()


def test_half_lives_give_every_group_short_and_long_memories():
    from hybridize.convert.gdn import HALF_LIVES_RANGE, head_half_lives

    lives = head_half_lives(9, 3).view(3, 3)  # (groups, heads per group)
    assert lives.min() == pytest.approx(HALF_LIVES_RANGE[0]) and lives.max() == pytest.approx(HALF_LIVES_RANGE[1])
    assert (lives[:, 0] < lives[:, 1]).all() and (lives[:, 1] < lives[:, 2]).all()  # each group spans the range
    assert lives[:, 0].max() < lives[:, 1].min()


@torch.no_grad()
def test_beta_fit_recovers_the_write_strength_of_each_head():
    """Targets made by the same mixer with known write strengths per head: each head's own explains its target."""
    from hybridize.convert.calibrated import mean_direction, mixer_features
    from hybridize.convert.gdn import BETAS, fit_beta

    model = _hybrid(torch.float64)
    mixer, rotary = model.model.layers[0].mixer, model.model.rotary_emb
    torch.manual_seed(1)
    direction = torch.randn(TINY["hidden_size"], dtype=torch.float64)
    inputs = [torch.randn(1, 48, TINY["hidden_size"], dtype=torch.float64) + 2 * direction for _ in range(4)]
    pe = rotary(inputs[0], position_ids=torch.arange(48)[None])
    mean, positive = mean_direction(inputs)
    assert positive > 0.99
    truth = torch.tensor([0.1, 0.5, 0.25, 0.1], dtype=torch.float64)
    logits = torch.log(truth / (1 - truth))
    mixer.b_proj.weight.copy_(logits[:, None] * mean / mean.dot(mean))
    targets = [mixer_features(mixer, x, pe) for x in inputs]
    # b averages logit(beta) over the tokens: beta is set per head through the mean direction
    b = torch.cat([mixer.b_proj(x) for x in inputs], 1)[0]  # (tokens, heads)
    torch.testing.assert_close(b.mean(0), logits)
    mixer.b_proj.weight.zero_()
    report = fit_beta(mixer, mean, inputs, targets, pe)
    assert report["betas"] == truth.tolist() and set(report["betas"]) <= set(BETAS)
    assert min(report["beta_r2"]) > 0.999
    torch.testing.assert_close(mixer_features(mixer, inputs[0], pe), targets[0])
