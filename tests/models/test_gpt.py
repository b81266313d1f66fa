import dataclasses
import math

import pytest
import torch

from llm.models.gpt import GPT, Block, GPTConfig, KVCache, Rotary, swiglu_hidden

V, T, L, H, C = 50, 16, 2, 2, 32
VARIANTS = {
    "rope-rms-swiglu-tied": {},
    "learned-ln-gelu-untied-bias": dict(
        pos_emb="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True
    ),
    "rope-ln-gelu": dict(norm="layernorm", mlp="gelu"),
    "learned-rms-swiglu-untied": dict(pos_emb="learned", tie_embeddings=False),
    "grouped-queries-and-other-widths": dict(n_kv_head=1, mlp_hidden=40, rope_base=500000.0, norm_eps=1e-6),
    "wide-heads-normed-queries-and-keys": dict(head_size=24, qk_norm=True, n_kv_head=1),  # as a Qwen3 0.6B
}


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **kw)).eval()


def test_config_round_trips_through_a_dict_and_rejects_unknown_fields():
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, pos_emb="learned", dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_heads": 4})
    # heads given the usual width, n_embd / n_head, are the usual model: one config, as an import reads it back
    assert dataclasses.replace(cfg, head_size=C // H) == cfg and dataclasses.replace(cfg, head_size=8).head_size == 8
    assert dataclasses.replace(cfg, n_kv_head=H) == cfg and dataclasses.replace(cfg, n_kv_head=1).n_kv_head == 1


@pytest.mark.parametrize("field, value, words", [
    ("n_embd", 33, "multiple of n_head"), ("norm", "batchnorm", "rmsnorm, layernorm"), ("n_layer", 0, ">= 1"),
    ("n_kv_head", 3, r"n_head \(2\) must be a multiple of n_kv_head \(3\)"), ("n_kv_head", -1, ">= 0"),
    ("mlp_hidden", -1, ">= 0"), ("rope_base", 0.0, "> 0"), ("norm_eps", float("nan"), "> 0"),
])
def test_config_rejects_bad_values(field, value, words):
    kw = dict(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C) | {field: value}
    with pytest.raises(ValueError, match=words):
        GPTConfig(**kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_gives_logits_per_position(variant):
    model = tiny(**VARIANTS[variant])
    logits = model(torch.randint(0, V, (3, T)))
    assert logits.shape == (3, T, V)
    assert torch.isfinite(logits).all()
    assert model(torch.randint(0, V, (2, 5))).shape == (2, 5, V)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_future_token_does_not_change_earlier_logits(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, V, (1, T))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_positions_matter_with_either_encoding():
    for pos in ("rope", "learned"):
        model = tiny(pos_emb=pos)
        idx = torch.tensor([[1, 2, 3, 4]])
        swapped = torch.tensor([[2, 1, 3, 4]])
        # the last token sees the same set of tokens; only their order differs
        assert not torch.allclose(model(idx)[0, -1], model(swapped)[0, -1]), pos


def test_too_long_a_sequence_raises():
    with pytest.raises(ValueError, match="block_size 16"):
        tiny()(torch.zeros(1, T + 1, dtype=torch.long))


def test_blocks_are_a_module_list_of_self_contained_blocks():
    model = tiny()
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == L
    x = torch.randn(2, 7, C)
    assert all(isinstance(b, Block) and b(x).shape == x.shape for b in model.blocks)


def test_tied_embeddings_share_one_matrix():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_num_params_matches_a_hand_count():
    # gelu, learned, layernorm with bias, untied: per block 12C^2 + 13C
    model = tiny(pos_emb="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True)
    total = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C + V * C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C - V * C
    # swiglu, rope, rmsnorm, tied, no bias: per block 4C^2 + 3*C*hidden + 2C
    hidden = swiglu_hidden(C)
    assert hidden == 128 and swiglu_hidden(768) == 2048
    model = tiny()
    assert model.num_params() == model.num_params(False) == V * C + L * (4 * C * C + 3 * C * hidden + 2 * C) + C


def test_grouped_queries_compute_what_heads_with_their_key_value_head_copied_do():
    """Query head h reads key-value head h // (n_head / n_kv_head), as in Llama: the same model with each
    key-value head's rows repeated for its queries gives the same logits, with fewer weights and cache."""
    torch.manual_seed(0)
    grouped = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=C, n_kv_head=2)).eval()
    full = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=C)).eval()
    state, d = grouped.state_dict(), C // 4
    for i in range(L):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([C, 2 * d, 2 * d])
        k, v = (t.view(2, d, C).repeat_interleave(2, dim=0).reshape(C, C) for t in (k, v))
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    full.load_state_dict(state)
    assert grouped.blocks[0].attn.qkv.weight.shape == (C + 2 * 2 * d, C)
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(grouped(idx), full(idx))
    cache = KVCache(grouped.config)
    with torch.no_grad():
        grouped(idx[:1], cache)
    assert cache.layers[0].k.shape[1] == 2  # the cache keeps the key-value heads only


def test_the_kv_cache_grows_with_the_text_not_to_the_whole_context():
    model = GPT(GPTConfig(vocab_size=V, block_size=4096, n_layer=1, n_head=H, n_embd=C)).eval()
    idx = torch.randint(0, V, (1, 600))
    cache = KVCache(model.config)
    with torch.no_grad():
        parts = [model(idx[:, :10], cache)]
        assert cache.layers[0].k.size(2) == 256
        parts += [model(idx[:, t:t + 90], cache) for t in range(10, 600, 90)]
        assert cache.layers[0].k.size(2) == 1024 and cache.length == 600  # 256, 512, 1024: doubled as it filled
        torch.testing.assert_close(torch.cat(parts, dim=1), model(idx), rtol=1e-5, atol=1e-5)


def test_flops_per_token_is_six_n_plus_the_attention_term():
    model = tiny()
    assert model.flops_per_token(8) == 6 * model.num_params() + 12 * L * C * 8
    assert model.flops_per_token() == model.flops_per_token(T)
    wide = tiny(head_size=24)  # the attention's scores and sums are over heads of 24, 48 wide in all
    assert wide.blocks[0].attn.qkv.weight.shape == (3 * 48, C) and wide.blocks[0].attn.proj.weight.shape == (C, 48)
    assert wide.flops_per_token(8) == 6 * wide.num_params() + 12 * L * 48 * 8


def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=8, n_head=4, n_embd=128))
    attn = model.blocks[0].attn
    assert attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_initial_loss_is_near_uniform():
    model = tiny()
    idx, targets = torch.randint(0, V, (2, 4, T))  # targets unrelated to inputs
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(math.log(V), abs=0.1)


def test_rotary_keeps_norms_and_makes_scores_depend_on_relative_position():
    rope = Rotary(head_dim=8, max_len=32)
    q, k = torch.randn(8), torch.randn(8)
    # the same vector at every position (B, T, H, D): rotation keeps its length
    qs = rope(q.expand(1, 32, 1, 8))
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(1, 32, 1))
    ks = rope(k.expand(1, 32, 1, 8))
    score = lambda i, j: (qs[0, i, 0] @ ks[0, j, 0]).item()  # noqa: E731
    assert score(5, 3) == pytest.approx(score(20, 18), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)


def test_all_blocks_share_one_pair_of_rotary_tables():
    config = GPTConfig(vocab_size=V, n_layer=3, n_head=2, n_embd=16, block_size=4096)
    tables = dict(GPT(config).named_buffers())
    # one (cos, sin) pair of block_size rows, not one a block: 64 MiB a pair for Llama 3.1's 131072 positions
    assert sorted(tables) == ["blocks.0.attn.rope.cos", "blocks.0.attn.rope.sin"]
    assert all(t.shape == (4096, 4) for t in tables.values())
    assert GPT(dataclasses.replace(config, pos_emb="learned")).blocks[0].attn.rope is None



@pytest.mark.parametrize("variant", VARIANTS)
def test_a_model_built_from_weights_computes_as_one_built_then_loaded(variant):
    built = tiny(**VARIANTS[variant])
    state = built.state_dict()
    given = {}

    def load(model, weights):
        given.update(weights)
        model.load_state_dict(weights, strict=True, assign=True)

    model = GPT.from_weights(built.config, state, load).eval()
    idx = torch.randint(0, V, (2, T))
    assert torch.equal(model(idx), built(idx))
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert (model.lm_head.weight is model.tok_emb.weight) == built.config.tie_embeddings
    # the weights given are the model's own: no second copy of them, and no random ones made first
    assert model.blocks[0].mlp.proj.weight.data_ptr() == state["blocks.0.mlp.proj.weight"].data_ptr()
    # bfloat16 weights (an import's) are taken in float32, as a model built to take them copies them
    half = GPT.from_weights(built.config, {k: v.bfloat16() for k, v in state.items()}, load)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert torch.equal(half.norm_f.weight, state["norm_f.weight"].bfloat16().float())

def test_greedy_generation_follows_the_argmax_and_crops_the_context():
    model = tiny()
    prompt = torch.randint(0, V, (T + 5,))  # longer than block_size: cropped
    out = list(model.generate_stream(prompt, 6, temperature=0))
    assert len(out) == 6 and all(isinstance(t, int) and 0 <= t < V for t in out)
    seq = prompt.tolist()
    for token in out:
        expected = model(torch.tensor([seq[-T:]]))[0, -1].argmax().item()
        assert token == expected
        seq.append(token)
    assert list(model.generate_stream(prompt[None], 6, temperature=0.7, top_k=1)) == out
    for temperature in (1e-39, 1e-300):  # logits / 1e-39 would overflow; 1e-300 is 0 in float32
        assert list(model.generate_stream(prompt, 6, temperature=temperature)) == out, temperature


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_kv_cache_gives_the_logits_of_reading_the_whole_context(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, V, (1, T))
    cache = KVCache(model.config)
    with torch.no_grad():
        full = model(idx)
        # a prompt, a few tokens at once (each sees the cache and the ones before it), then one at a time
        parts = [model(idx[:, :5], cache), model(idx[:, 5:8], cache)]
        parts += [model(idx[:, t:t + 1], cache) for t in range(8, T)]
    assert cache.length == T
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"sequence length {T + 1} exceeds the model's block_size {T}"):
        model(idx[:, :1], cache)


def test_generation_runs_the_head_on_the_last_position_alone():
    model = tiny()
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        assert model(torch.randint(0, V, (2, 5)), last_only=True).shape == (2, 1, V)
        torch.testing.assert_close(model(torch.ones(1, 5, dtype=torch.long), last_only=True),
                                   model(torch.ones(1, 5, dtype=torch.long))[:, -1:])
        shapes.clear()
        list(model.generate_stream(torch.randint(0, V, (T - 2,)), 4, temperature=0))  # the cache fills, then slides
    assert shapes == [(1, 1, V)] * 4  # a prompt's worth of logits to read one row was T x vocab


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_from_a_short_prompt_reads_as_the_whole_context_would_past_the_block(variant):
    model = tiny(**VARIANTS[variant])
    prompt = torch.randint(0, V, (4,))
    out = list(model.generate_stream(prompt, 2 * T, temperature=0))  # the cache fills, then the window slides
    seq = prompt.tolist()
    for token in out:
        assert token == model(torch.tensor([seq[-T:]]))[0, -1].argmax().item()
        seq.append(token)


def test_sampling_is_reproducible_with_a_generator_and_stays_in_the_top_k():
    model = tiny()
    prompt = torch.tensor([1, 2, 3])
    a = list(model.generate_stream(prompt, 20, generator=torch.Generator().manual_seed(1)))
    b = list(model.generate_stream(prompt, 20, generator=torch.Generator().manual_seed(1)))
    assert a == b
    first_top3 = model(prompt[None])[0, -1].topk(3).indices.tolist()
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        assert next(model.generate_stream(prompt, 1, temperature=2.0, top_k=3, generator=g)) in first_top3


def test_top_k_holds_at_a_temperature_so_high_that_it_rounds_every_logit_to_zero():
    model = tiny()
    prompt = torch.tensor([1, 2, 3])
    greedy = list(model.generate_stream(prompt, 8, temperature=0))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert list(model.generate_stream(prompt, 8, temperature=1e300, top_k=1, generator=g)) == greedy
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got inf"):
        next(model.generate_stream(prompt, 1, temperature=math.inf))


def test_top_p_samples_only_from_the_smallest_set_of_likeliest_tokens_that_reaches_p():
    model = tiny()
    prompt = torch.tensor([1, 2, 3])
    with torch.no_grad():
        probs = model(prompt[None])[0, -1].softmax(-1)
    ordered = probs.sort(descending=True)
    nucleus = ordered.indices[:int((ordered.values.cumsum(0) < 0.3).sum()) + 1].tolist()
    assert 1 < len(nucleus) < V
    drawn = {next(model.generate_stream(prompt, 1, generator=torch.Generator().manual_seed(seed), top_p=0.3))
             for seed in range(200)}
    assert drawn == set(nucleus)  # every one of them, and no other
    greedy = list(model.generate_stream(prompt, 5, temperature=0))
    assert list(model.generate_stream(prompt, 5, temperature=3.0, top_p=1e-6)) == greedy


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=5), dict(top_p=0.9)])
def test_generation_never_picks_an_id_past_vocab_even_when_those_logits_lead(sampling):
    model, vocab = tiny(), 30  # as if the tokenizer had 30 tokens and the model's vocabulary were padded to V
    original = model.forward

    def leading_padding(idx, cache=None, last_only=False):  # the padded ids' logits far ahead of the rest
        logits = original(idx, cache, last_only)
        return torch.cat([logits[..., :vocab], logits[..., vocab:] + 100.0], dim=-1)

    model.forward = leading_padding
    prompt = torch.tensor([1, 2, 3])
    unmasked = list(model.generate_stream(prompt, 10, generator=torch.Generator().manual_seed(0), **sampling))
    assert all(i >= vocab for i in unmasked)  # the test can fail: without vocab the padding is sampled
    kept = list(model.generate_stream(prompt, 10, generator=torch.Generator().manual_seed(0), vocab=vocab,
                                      **sampling))
    assert len(kept) == 10 and all(i < vocab for i in kept)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=5), dict(top_p=0.9)])
def test_logits_that_are_not_numbers_end_generation_with_an_error_not_a_token(sampling):
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")  # one token's logit: greedy's argmax took it, silently
    with pytest.raises(FloatingPointError, match=r"^the model's logits for token 3 are not numbers"):
        list(model.generate_stream(torch.tensor([1, 2, 3]), 5, **sampling))


def test_generation_rejects_bad_arguments():
    model = tiny()
    for kwargs in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=0), dict(top_p=0.0),
                   dict(top_p=1.5), dict(vocab=0), dict(vocab=V + 1)):
        with pytest.raises(ValueError):
            next(model.generate_stream(torch.tensor([1]), 1, **kwargs))
    with pytest.raises(ValueError, match="one non-empty prompt"):
        next(model.generate_stream(torch.zeros(2, 3, dtype=torch.long), 1))


def test_dropout_is_active_only_in_training_mode():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, V, (2, T))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_weights_with_a_longer_position_table_are_cut_to_this_context_to_start_from():
    long, short = (GPT(GPTConfig(vocab_size=11, block_size=n, n_layer=1, n_head=2, n_embd=8, pos_emb="learned"))
                   for n in (16, 8))
    fitted = short.fit_weights(long.state_dict())
    assert torch.equal(fitted["pos_emb.weight"], long.pos_emb.weight[:8])
    short.load_state_dict(fitted, strict=True)
    assert long.fit_weights(short.state_dict())["pos_emb.weight"].shape == (8, 8)  # a shorter table: as it was
    rope = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    assert rope.fit_weights(rope.state_dict()).keys() == rope.state_dict().keys()
