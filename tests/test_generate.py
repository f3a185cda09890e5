"""Speculative decoding (`hybridize.generate`): greedy output equal to the target's own, sampled output following the
target distribution, caches after a rollback equal to those of a run that never saw the rejected tokens, and the
errors a user can hit."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from tiny import TINY, make_tiny, run_cli, word_tokenizer

from hybridize import save
from hybridize.errors import ConfigError
from hybridize.generate import GenerateConfig, PromptLookupDraft, compare_generate, early_exit_draft, generate
from hybridize.generate import speculative as speculative_module
from hybridize.generate.speculative import _accept, _Decoder, _probs, _Rows
from hybridize.modeling import MIXERS, HybridConfig, HybridForCausalLM

# Small windows and chunks, so that 30 new tokens cross chunks, evict from streaming caches and fill NHA slots
MIXER_SETTINGS = {
    "mamba2": {"chunk_size": 8},
    "streaming": {"sinks": 2, "window": 8, "block_size": 4},
    "nha": {"slots": 4, "window": 8, "chunk_size": 4},
}


def _hybrid(mixer: str, *, seed: int = 0, dtype=torch.float64, **overrides) -> HybridForCausalLM:
    """A tiny hybrid with weights large enough (initializer_range 0.3) that greedy decoding does not loop on a token."""
    torch.manual_seed(seed)
    values = {**TINY, "initializer_range": 0.3, **overrides}
    config = HybridConfig(
        **values, mixer_types=[mixer, "attention", mixer, mixer][: values["num_hidden_layers"]], mixers=MIXER_SETTINGS
    )
    model = HybridForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # move the SSM parameters and norms off their defaults so every term matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _noisy_copy(model, scale: float, seed: int = 1):
    """A draft close to the target: accepts often, but not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return draft


@pytest.fixture(params=sorted(MIXERS))
def mixer(request):
    return request.param


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_greedy_speculation_equals_target_greedy(mixer, draft_tokens):
    model = _hybrid(mixer, dtype=torch.float32)
    prompt = torch.randint(3, 128, (1, 9))
    expected = model.generate(prompt, max_new_tokens=30, do_sample=False)[0, 9:].tolist()
    config = GenerateConfig(max_new_tokens=30, draft_tokens=draft_tokens, adaptive=False, ignore_eos=False)
    for draft in (_noisy_copy(model, 0.05), early_exit_draft(model, 2)):
        result = generate(model, config, tokenizer=word_tokenizer(eos="w2"), prompt=prompt[0].tolist(), draft=draft)
        assert list(result.token_ids) == expected
        assert 0 < result.accepted < result.drafted  # some drafts were accepted, some rolled back


def test_adaptive_draft_length_keeps_greedy_output(mixer):
    model = _hybrid(mixer, dtype=torch.float32)
    prompt = torch.randint(3, 128, (1, 6))
    expected = model.generate(prompt, max_new_tokens=40, do_sample=False)[0, 6:].tolist()
    config = GenerateConfig(max_new_tokens=40, draft_tokens=2, max_draft_tokens=6, adaptive=True)
    result = generate(
        model, config, tokenizer=word_tokenizer(eos="w2"), prompt=prompt[0].tolist(), draft=_noisy_copy(model, 0.05)
    )
    assert list(result.token_ids) == expected
    assert len(set(result.draft_tokens)) > 1 and max(result.draft_tokens) <= 6


def test_any_causal_lm_with_the_same_vocabulary_drafts():
    model = _hybrid("mamba2", dtype=torch.float32)
    prompt = torch.randint(3, 128, (1, 7))
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, 7:].tolist()
    llama = make_tiny("llama")  # a plain transformers model: a DynamicCache, cropped
    result = generate(
        model,
        GenerateConfig(max_new_tokens=20),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=prompt[0].tolist(),
        draft=llama,
    )
    assert list(result.token_ids) == expected
    # and a plain transformers target with a hybrid draft
    expected = llama.generate(prompt, max_new_tokens=20, do_sample=False)[0, 7:].tolist()
    result = generate(
        llama,
        GenerateConfig(max_new_tokens=20),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=prompt[0].tolist(),
        draft=model,
    )
    assert list(result.token_ids) == expected


def _cache_contents(cache) -> list:
    """Everything a cache holds, layer by layer, minus the rollback bookkeeping and the unused capacity of
    preallocated KV buffers (their filled part is `keys` and `values`)."""
    out = []
    for layer in cache.layers:
        for name, value in sorted(vars(layer).items()):
            if name in ("checkpoint", "steps", "key_buffer", "value_buffer"):
                continue
            values = value.values() if isinstance(value, dict) else [value]
            out.extend((name, v) for v in values if isinstance(v, (torch.Tensor, int, float, bool)))
    out.append(("num_seen_tokens", getattr(cache, "num_seen_tokens", None)))
    return out


@pytest.mark.parametrize("keep", [0, 1, 3, 5])
def test_rollback_equals_a_run_without_the_rejected_tokens(mixer, keep):
    model = _hybrid(mixer)
    ids = torch.randint(3, 128, (14,)).tolist()
    prompt, verified = ids[:9], ids[9:]  # 5 tokens verified in one forward (the target) ...
    rolled = _Decoder(model)
    rolled.forward(prompt)
    rolled.begin()
    logits = rolled.forward(verified)
    rolled.commit(keep)
    generic = _Decoder(model)  # the verify path's logits are the generic path's
    generic.forward(prompt)
    torch.testing.assert_close(logits, generic.forward(verified), rtol=1e-10, atol=1e-10)
    clean = _Decoder(model)
    clean.forward(prompt)
    if keep:
        clean.forward(verified[:keep])
    assert rolled.seen == clean.seen == 9 + keep
    for (name, a), (other, b) in zip(_cache_contents(rolled.cache), _cache_contents(clean.cache), strict=True):
        assert name == other
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        else:
            assert a == b, name
    # ... and both continue alike
    torch.testing.assert_close(rolled.forward([5, 6]), clean.forward([5, 6]), rtol=1e-10, atol=1e-10)


def test_rollback_over_several_forwards(mixer):
    """The draft's pattern: one forward of the unseen tokens, then one token at a time; keep a prefix."""
    model = _hybrid(mixer)
    ids = torch.randint(3, 128, (15,)).tolist()
    rolled = _Decoder(model)
    rolled.forward(ids[:9])
    rolled.begin()
    rolled.forward(ids[9:11])
    for token in ids[11:14]:
        rolled.forward([token])
    rolled.commit(3)
    clean = _Decoder(model)
    clean.forward(ids[:9])
    clean.forward(ids[9:12])
    torch.testing.assert_close(rolled.forward(ids[12:15]), clean.forward(ids[12:15]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lengths", [(2, 12, 1), (12, 1), (1, 1, 1)])
def test_mamba2_rollback_inside_and_across_calls(lengths):
    """A verify span of several calls, one longer than a chunk (it takes the generic scans and records scan inputs
    instead of every state), rolled back to each token: equal to a run that only saw the kept tokens."""
    model = _hybrid("mamba2")  # chunk_size 8
    ids = torch.randint(3, 128, (9 + sum(lengths),)).tolist()
    for keep in range(sum(lengths) + 1):
        rolled, clean = _Decoder(model), _Decoder(model)
        rolled.forward(ids[:9])
        rolled.begin()
        start = 9
        for length in lengths:
            rolled.forward(ids[start : start + length])
            start += length
        rolled.commit(keep)
        clean.forward(ids[: 9 + keep])
        for (name, a), (_, b) in zip(_cache_contents(rolled.cache), _cache_contents(clean.cache), strict=True):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} keeping {keep}")
        torch.testing.assert_close(rolled.forward([5, 6]), clean.forward([5, 6]), rtol=1e-10, atol=1e-10)


def test_rows_compute_the_logits_a_round_reads():
    """Greedy acceptance reads the logits of the accepted drafts and the next position only, each computed once;
    sampling the same; models outside `_HEAD_ONLY` get every row up front, with the same tokens."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 10, bias=False)
    hidden = torch.randn(5, 4)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    best = head(hidden).argmax(-1).tolist()
    calls.clear()
    drafts = [best[0], (best[1] + 1) % 10, best[2], best[3]]  # the second draft is rejected
    rows = _Rows(hidden, head)
    assert _accept(rows, drafts, [None] * 4, GenerateConfig(), torch.Generator()) == (1, best[1])
    assert calls == [(1, 1, 4)] * 2  # one position at a time, two of five
    rows[0], rows[-4]
    assert len(calls) == 2  # cached
    calls.clear()
    config = GenerateConfig(do_sample=True)
    q = [F.one_hot(torch.tensor(t), 10).float() for t in drafts]
    n, _ = _accept(_Rows(hidden, head), drafts, q, config, torch.Generator().manual_seed(0))
    assert len(calls) == n + 1
    assert _accept(_Rows(head(hidden)), drafts, [None] * 4, GenerateConfig(), torch.Generator()) == (1, best[1])


def test_models_without_a_known_head_verify_all_rows(monkeypatch):
    model = _hybrid("mamba2", dtype=torch.float32)
    prompt = torch.randint(3, 128, (1, 9))
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, 9:].tolist()
    monkeypatch.setattr(speculative_module, "_HEAD_ONLY", ())
    result = generate(
        model,
        GenerateConfig(max_new_tokens=20),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=prompt[0].tolist(),
        draft=model,
    )
    assert list(result.token_ids) == expected and result.accepted == result.drafted > 0


def _exact_marginals(model, prompt: list[int], config: GenerateConfig) -> torch.Tensor:
    """The exact distribution of the 2nd and 3rd generated tokens under the target (vocab V): (2, V)."""
    with torch.no_grad():
        p1 = _probs(model(torch.tensor([prompt])).logits[0, -1].float(), config)  # (V,)
        V = p1.shape[0]
        ids = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = _probs(model(ids).logits[:, -1].float(), config)  # (V, V): row t1
        ids2 = torch.cat([ids.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        p3 = _probs(model(ids2).logits[:, -1].float(), config).view(V, V, V)  # [t1, t2, t3]
    second = p1 @ p2
    third = torch.einsum("a,ab,abc->c", p1, p2, p3)
    return torch.stack([second, third])


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit, cells with fewer than 5 expected pooled; 0 if an impossible token came."""
    expected = probs.double() * counts.sum()
    if bool((counts[expected == 0] > 0).any()):
        return 0.0
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_sampled_tokens_follow_the_target_distribution(kind):
    """The 2nd and 3rd tokens come out of speculative rounds (the 1st from the prefill): their empirical distribution
    over many seeds fits the target's exact marginals, and clearly not the draft model's."""
    vocab = 8
    model = _hybrid("mamba2", dtype=torch.float32, vocab_size=vocab, num_hidden_layers=2)
    draft = _hybrid("attention", seed=5, dtype=torch.float32, vocab_size=vocab, num_hidden_layers=2)
    prompt = [3, 7, 1, 6, 3, 7]
    config = GenerateConfig(
        max_new_tokens=3, do_sample=True, temperature=0.8, top_p=0.95, draft_tokens=2, adaptive=False, ignore_eos=True
    )
    counts, accepted, drafted = torch.zeros(2, vocab), 0, 0
    for seed in range(500):
        result = generate(
            model,
            dataclasses.replace(config, seed=seed),
            tokenizer=word_tokenizer(vocab, eos="w2"),
            prompt=prompt,
            draft=draft if kind == "model" else PromptLookupDraft(),
        )
        counts[0, result.token_ids[1]] += 1
        counts[1, result.token_ids[2]] += 1
        accepted, drafted = accepted + result.accepted, drafted + result.drafted
    assert 0 < accepted < drafted  # both outcomes of the acceptance test happen
    target = _exact_marginals(model, prompt, config)
    for position in range(2):
        assert _chi2_pvalue(counts[position], target[position]) > 1e-3
    if kind == "model":  # the test can tell the target's distribution from the draft's
        proposed = _exact_marginals(draft, prompt, config)
        assert all(_chi2_pvalue(counts[i], proposed[i]) < 1e-6 for i in range(2))


def test_prompt_lookup_draft():
    lookup = PromptLookupDraft(max_ngram=2, min_ngram=1)
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2], 3) == [3, 4, 9]  # the 2-gram (1, 2) came before, then 3 4 9
    assert lookup.propose([5, 1, 2, 7, 8, 2], 2) == [7, 8]  # no earlier (8, 2): falls back to the 1-gram (2,)
    assert lookup.propose([1, 2, 3], 2) == []
    assert PromptLookupDraft().propose([5, 1, 2, 7, 8, 2], 2) == []  # by default a lone token is no evidence
    assert PromptLookupDraft().propose([5, 1, 2, 7, 8, 1, 2], 2) == [7, 8]
    model = _hybrid("mamba2", dtype=torch.float32)
    prompt = torch.randint(3, 128, (1, 12))
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, 12:].tolist()
    result = generate(
        model,
        GenerateConfig(max_new_tokens=20),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=prompt[0].tolist(),
        draft=lookup,
    )
    assert list(result.token_ids) == expected
    with pytest.raises(ConfigError, match="min_ngram <= max_ngram"):
        PromptLookupDraft(min_ngram=3, max_ngram=2)


def test_mismatched_vocabulary_is_a_clear_error():
    model = _hybrid("mamba2")
    with pytest.raises(ConfigError, match="draft predicts 64 tokens and the target 128"):
        generate(
            model,
            GenerateConfig(max_new_tokens=4),
            tokenizer=word_tokenizer(eos="w2"),
            prompt=[5, 6],
            draft=_hybrid("mamba2", vocab_size=64),
        )
    with pytest.raises(ConfigError, match="draft's tokenizer .* differs"):
        generate(
            model,
            GenerateConfig(),
            tokenizer=word_tokenizer(eos="w2"),
            prompt=[5, 6],
            draft=model,
            draft_tokenizer=word_tokenizer(100, eos="w2"),
        )


def test_too_many_draft_tokens_for_a_window_is_a_clear_error():
    model = _hybrid("streaming")  # window 8: a round may hold 7 tokens, so K <= 6
    with pytest.raises(ConfigError, match="draft_tokens <= 6"):
        generate(
            model,
            GenerateConfig(draft_tokens=7, adaptive=False),
            tokenizer=word_tokenizer(eos="w2"),
            prompt=[5, 6],
            draft=model,
        )
    result = generate(
        model,
        GenerateConfig(draft_tokens=7, max_draft_tokens=12),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=[5, 6],
        draft=model,
    )
    assert max(result.draft_tokens) <= 6


def test_stop_strings_and_streamed_text():
    model = _hybrid("mamba2")
    tokenizer = word_tokenizer(eos="w2")
    prompt = [5, 9, 17]
    full = generate(model, GenerateConfig(max_new_tokens=20, ignore_eos=True), tokenizer=tokenizer, prompt=prompt)
    words = full.text.split()
    stop = f" {words[6]} {words[7]}"
    pieces = []
    config = GenerateConfig(max_new_tokens=20, stop=(stop,), ignore_eos=True, draft_tokens=3)
    result = generate(
        model, config, tokenizer=tokenizer, prompt=prompt, draft=_noisy_copy(model, 0.3), stream=pieces.append
    )
    assert result.stop_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == result.text
    ids = full.token_ids  # kept: up to the token completing the stop string
    assert result.token_ids == ids[: next(k for k in range(len(ids)) if stop in tokenizer.decode(ids[:k]))]


def test_eos_ends_generation():
    model = _hybrid("mamba2")
    full = generate(
        model, GenerateConfig(max_new_tokens=12, ignore_eos=True), tokenizer=word_tokenizer(eos="w2"), prompt=[5, 9]
    )
    eos = full.token_ids[4]
    model.generation_config.eos_token_id = eos
    result = generate(
        model,
        GenerateConfig(max_new_tokens=12),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=[5, 9],
        draft=_noisy_copy(model, 0.3),
    )
    assert result.stop_reason == "eos"
    assert result.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]


def test_chat_template_wraps_the_prompt():
    tokenizer = word_tokenizer(eos="w2")
    tokenizer.chat_template = "{% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}w12"
    model = _hybrid("attention")
    chat = generate(model, GenerateConfig(max_new_tokens=3, chat=True), tokenizer=tokenizer, prompt="w5 w6")
    plain = generate(model, GenerateConfig(max_new_tokens=3), tokenizer=tokenizer, prompt="w10 w5 w6 w11 w12")
    assert chat.prompt_tokens == 5 and chat.token_ids == plain.token_ids
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        generate(model, GenerateConfig(chat=True), tokenizer=tokenizer, prompt="w5")


def test_early_exit_draft_shares_the_targets_weights():
    model = _hybrid("mamba2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    draft = early_exit_draft(model, 2)
    assert draft.config.num_hidden_layers == 2 and draft.config.mixer_types == model.config.mixer_types[:2]
    assert draft.model.layers[1] is model.model.layers[1] and draft.lm_head is model.lm_head
    assert all(p.device.type == "cpu" for p in draft.parameters())
    generate(
        model, GenerateConfig(max_new_tokens=8), tokenizer=word_tokenizer(eos="w2"), prompt=[5, 6, 7], draft=draft
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match=r"draft layers must be in \[1, 3\]"):
        early_exit_draft(model, 4)


def test_compare_reports_both_speeds():
    model = _hybrid("mamba2", dtype=torch.float32)
    result = compare_generate(
        model,
        GenerateConfig(max_new_tokens=10),
        tokenizer=word_tokenizer(eos="w2"),
        prompt=[5, 6, 7],
        draft=early_exit_draft(model, 2),
        repeats=2,
    )
    assert result["same_tokens"] and result["speedup"] > 0
    assert result["plain"]["first_run"]["acceptance_rate"] is None
    assert 0 <= result["speculative"]["first_run"]["acceptance_rate"] <= 1


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="temperature must be positive, got 0"):
        GenerateConfig(temperature=0)
    with pytest.raises(ConfigError, match="draft_tokens must be at least 1, got 0"):
        GenerateConfig(draft_tokens=0)
    with pytest.raises(ConfigError, match=r"max_draft_tokens \(2\) must be >= draft_tokens \(4\)"):
        GenerateConfig(max_draft_tokens=2)


@pytest.fixture
def saved(tmp_path):
    """A tiny Mamba2 hybrid, a noisy copy (a draft) and a model with another vocabulary, saved with tokenizers."""
    model = _hybrid("mamba2", dtype=torch.float32)
    paths = {}
    for name, m, vocab in (
        ("target", model, 128),
        ("draft", _noisy_copy(model, 0.05), 128),
        ("other", _hybrid("mamba2", dtype=torch.float32, vocab_size=64), 64),
    ):
        paths[name] = tmp_path / name
        save(m, paths[name], tokenizer=word_tokenizer(vocab, eos="w2"))
    return paths


def test_cli_generates_with_a_draft_and_compares(saved, tmp_path):
    code, out = run_cli("generate", saved["target"], "--prompt", "w5 w6 w7", "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0, out
    plain_text = out.splitlines()[0]
    assert "12 tokens (length)" in out and "tokens/s" in out
    code, out = run_cli(
        "generate", saved["target"], "--prompt", "w5 w6 w7", "--max-new-tokens", "12", "--ignore-eos",
        "--draft", saved["draft"], "--draft-tokens", "3", "--no-adaptive", "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, out
    assert out.splitlines()[0] == plain_text and "acceptance" in out
    assert json.loads((tmp_path / "r.json").read_text())["new_tokens"] == 12
    code, out = run_cli(
        "generate", saved["target"], "--prompt", "w5 w6", "--max-new-tokens", "6", "--draft-layers", "2",
        "--compare", "--repeats", "1",
    )  # fmt: skip
    assert code == 0, out
    assert "speculative" in out and "speedup x" in out and "same tokens: yes" in out


def test_cli_errors(saved):
    code, out = run_cli("generate", saved["target"], "--prompt", "w5", "--draft", saved["other"])
    assert code == 1 and "error: the draft's tokenizer (64 tokens) differs from the target's (128 tokens)" in out
    code, out = run_cli("generate", saved["target"], "--prompt", "w5", "--compare")
    assert code == 1 and "give --draft, --draft-layers or --prompt-lookup" in out
