"""Networks: RoPE, block-causal encoder, KV cache (incremental, sliding window, per-stream reset),
AdaLN-Zero initialisation, the monolithic baseline's history cache and the conv image encoder."""

from __future__ import annotations

import pytest
import torch

from scd_policy.models import (
    CausalDiffusionTransformer,
    CausalEncoder,
    ConvImageEncoder,
    DiffusionDecoder,
    History,
    KVCache,
    StepTokenizer,
    WindowedDiffusionTransformer,
)
from scd_policy.models.layers import AdaLNBlock, Modulation, apply_rope, rope_cos_sin

D, HEADS, S, N_CTX, H, DA = 64, 4, 3, 2, 5, 3
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_encoder() -> CausalEncoder:
    return CausalEncoder(D, HEADS, n_layers=2, mlp_ratio=4.0, dropout=0.0, n_context_tokens=N_CTX).eval()


def make_causal_dit() -> CausalDiffusionTransformer:
    model = CausalDiffusionTransformer(
        D, HEADS, n_layers=3, mlp_ratio=4.0, dropout=0.0, action_dim=DA, horizon=H
    )
    # Fresh AdaLN-Zero blocks are identities; randomise the zero-initialised parts so the tests below
    # exercise real attention through every layer.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mod_table" in name or "modulation" in name or "final" in name:
                param.normal_(0.0, 0.1)
    return model.eval()


def test_rope_scores_depend_only_on_position_differences() -> None:
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(pq: float, pk: float) -> torch.Tensor:
        rq = apply_rope(q, *rope_cos_sin(torch.tensor([pq]), 16))
        rk = apply_rope(k, *rope_cos_sin(torch.tensor([pk]), 16))
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(3.0, 1.0), score(10.0, 8.0), atol=1e-5, rtol=0)
    # Rotation preserves norms; a zero offset is the identity.
    assert not torch.allclose(score(3.0, 1.0), score(3.0, 2.0))
    torch.testing.assert_close(apply_rope(q, *rope_cos_sin(torch.tensor([0.0]), 16)), q)


def test_encoder_is_causal_across_steps_and_bidirectional_within() -> None:
    encoder = make_encoder()
    tokens = torch.randn(2, 6, S, D)
    ctx = encoder(tokens)
    assert ctx.shape == (2, 6, N_CTX, D)
    changed = tokens.clone()
    changed[:, 4:] += torch.randn_like(changed[:, 4:])  # steps 4, 5 change
    ctx2 = encoder(changed)
    torch.testing.assert_close(ctx2[:, :4], ctx[:, :4], atol=1e-6, rtol=0)
    assert (ctx2[:, 4:] - ctx[:, 4:]).abs().max() > 1e-3
    # Within a step every token is visible: changing the step's last token changes its context.
    within = tokens.clone()
    within[:, 2, -1] += torch.randn(D)  # (a constant shift would vanish in LayerNorm)
    assert (encoder(within)[:, 2] - ctx[:, 2]).abs().max() > 1e-4


def test_encoder_incremental_equals_full_forward() -> None:
    encoder = make_encoder()
    tokens = torch.randn(3, 7, S, D)
    full = encoder(tokens)
    cache = encoder.new_cache(max_steps=None)
    steps = [encoder(tokens[:, i : i + 1], cache) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert cache.n_steps == 7 and cache.keys[0].shape == (3, HEADS, 7 * (S + N_CTX), D // HEADS)
    # Priming with several steps at once, then continuing one by one, is the same too.
    cache2 = encoder.new_cache(max_steps=None)
    first = encoder(tokens[:, :4], cache2)
    rest = [encoder(tokens[:, i : i + 1], cache2) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=ATOL, rtol=0)


def test_sliding_window_streaming_equals_one_windowed_pass_and_memory_is_flat() -> None:
    encoder = make_encoder()
    window, total = 4, 11
    tokens = torch.randn(2, total, S, D)
    # One pass over the whole history with the N-step window mask: every step its own window.
    windowed = encoder(tokens, encoder.new_cache(max_steps=window))
    torch.testing.assert_close(windowed[:, :window], encoder(tokens[:, :window]), atol=ATOL, rtol=0)
    cache = encoder.new_cache(max_steps=window)
    for i in range(total):
        ctx = encoder(tokens[:, i : i + 1], cache)
        assert cache.n_steps == min(i + 1, window)  # memory stays flat
        assert cache.keys[-1].shape[2] == min(i + 1, window) * (S + N_CTX)
        torch.testing.assert_close(ctx[:, 0], windowed[:, i], atol=ATOL, rtol=0)
    # With one layer there is no deeper state: the window equals a fresh pass over the last N steps.
    single = CausalEncoder(D, HEADS, n_layers=1, mlp_ratio=4.0, dropout=0.0, n_context_tokens=N_CTX).eval()
    cache = single.new_cache(max_steps=window)
    for i in range(total):
        ctx = single(tokens[:, i : i + 1], cache)
    fresh = single(tokens[:, total - window :])[:, -1:]
    torch.testing.assert_close(ctx, fresh, atol=ATOL, rtol=0)


def test_reset_one_stream_equals_a_fresh_history_for_it() -> None:
    encoder = make_encoder()
    tokens = torch.randn(2, 8, S, D)
    cache = encoder.new_cache(max_steps=6)
    for i in range(5):
        encoder(tokens[:, i : i + 1], cache)
    cache.reset(torch.tensor([True, False]))
    outs = [encoder(tokens[:, i : i + 1], cache) for i in range(5, 8)]
    # Stream 0 restarted at step 5; stream 1 is unaffected by the reset of stream 0.
    torch.testing.assert_close(outs[-1][0, 0], encoder(tokens[:1, 5:8])[0, -1], atol=ATOL, rtol=0)
    reference = encoder(tokens[1:], encoder.new_cache(max_steps=6))
    torch.testing.assert_close(outs[-1][1, 0], reference[0, -1], atol=ATOL, rtol=0)
    cache.reset()
    assert cache.n_steps == 0 and cache.valid is None


def test_kv_cache_rejects_a_different_batch_and_bad_sizes() -> None:
    encoder = make_encoder()
    cache = encoder.new_cache(max_steps=3)
    encoder(torch.randn(2, 1, S, D), cache)
    with pytest.raises(ValueError, match="2 streams"):
        encoder(torch.randn(3, 1, S, D), cache)
    with pytest.raises(ValueError, match="max_steps"):
        KVCache(2, max_steps=0)
    with pytest.raises(ValueError, match="bool tensor"):
        cache.reset(torch.tensor([1, 0]))


def test_kv_cache_snapshot_is_not_changed_by_later_steps() -> None:
    encoder = make_encoder()
    cache = encoder.new_cache(max_steps=2)
    encoder(torch.randn(1, 1, S, D), cache)
    snapshot = cache.copy()
    keys = snapshot.keys[0].clone()
    encoder(torch.randn(1, 2, S, D), cache)
    assert snapshot.n_steps == 1 and torch.equal(snapshot.keys[0], keys)


def test_adaln_block_and_decoders_start_as_identity_and_zero() -> None:
    block = AdaLNBlock(D, HEADS, 4.0, 0.0)
    x = torch.randn(2, 5, D)
    mod = Modulation(D)(torch.randn(2, D)).unsqueeze(1)
    assert torch.equal(block(x, mod)[0], x)

    decoder = DiffusionDecoder(D, HEADS, 2, 4.0, 0.0, DA, H, N_CTX)
    out = decoder(torch.randn(4, H, DA), decoder.noise_levels(torch.rand(4)), torch.randn(4, N_CTX, D))
    assert out.shape == (4, H, DA) and torch.equal(out, torch.zeros_like(out))

    dit = CausalDiffusionTransformer(D, HEADS, 3, 4.0, 0.0, DA, H)
    cache = dit.new_cache(None)
    dit.encode(torch.randn(2, 3, S, D), cache)
    out = dit.denoise(
        torch.randn(2, 1, H, DA), torch.rand(2, 1), History.from_cache(cache), torch.tensor([2])
    )
    assert torch.equal(out, torch.zeros_like(out))

    windowed = WindowedDiffusionTransformer(D, HEADS, 3, 4.0, 0.0, DA, H)
    out = windowed(torch.randn(2, H, DA), windowed.noise_levels(torch.rand(2)), torch.randn(2, 2, S, D))
    assert torch.equal(out, torch.zeros_like(out))


def test_block_carrying_only_the_last_tokens_equals_the_full_block_there() -> None:
    block = AdaLNBlock(D, HEADS, 4.0, 0.0).eval()
    with torch.no_grad():
        block.mod_table.normal_(0.0, 0.3)
    b, n, q = 2, 7, 4
    x = torch.randn(b, n, D)
    rope = rope_cos_sin(torch.arange(n), D // HEADS)
    prefix = (torch.randn(b, HEADS, 3, D // HEADS), torch.randn(b, HEADS, 3, D // HEADS))
    mask = torch.rand(b, 1, n, 3 + n) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    per_token = Modulation(D)(torch.randn(b, n, D))  # (B, N, 6, D): the per-call (training) path
    shared = tuple(torch.randn(D) for _ in range(6))  # one noise level for the batch (sampling path)
    for mod in (per_token, shared):
        full, k_full, v_full = block(x, mod, rope=rope, prefix=prefix, mask=mask)  # type: ignore[arg-type]
        last, k_last, v_last = block(x, mod, rope=rope, prefix=prefix, mask=mask, queries=q)  # type: ignore[arg-type]
        assert last.shape == (b, q, D)
        torch.testing.assert_close(last, full[:, -q:], atol=ATOL, rtol=0)
        # Every token still gave its key and value to the others.
        assert torch.equal(k_last, k_full) and torch.equal(v_last, v_full)


def test_decoder_has_no_history_access_and_depends_on_context() -> None:
    decoder = DiffusionDecoder(D, HEADS, 1, 4.0, 0.0, DA, H, N_CTX)
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if "mod_table" in name or "modulation" in name or "final" in name:
                param.normal_(0.0, 0.1)
    x, t, ctx = torch.randn(3, H, DA), torch.rand(3), torch.randn(3, N_CTX, D)
    out = decoder(x, decoder.noise_levels(t), ctx)
    # Batch elements are independent samples: changing one sample's context touches only that sample.
    ctx2 = ctx.clone()
    ctx2[1] += torch.randn(N_CTX, D)
    out2 = decoder(x, decoder.noise_levels(t), ctx2)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]], atol=1e-6, rtol=0)
    assert (out2[1] - out[1]).abs().max() > 1e-4


def test_causal_dit_history_cache_is_causal_and_incremental() -> None:
    model = make_causal_dit()
    tokens = torch.randn(2, 5, S, D)
    x_t, t = torch.randn(2, 5, H, DA), torch.rand(2, 5)
    steps = torch.arange(5)
    cache = model.new_cache(None)
    model.encode(tokens, cache)
    full = model.denoise(x_t, t, History.from_cache(cache), steps)  # chunk of every step at once
    # The chunk of step i equals one denoise call after encoding steps 0..i one at a time.
    inc = model.new_cache(None)
    for i in range(5):
        model.encode(tokens[:, i : i + 1], inc)
        out = model.denoise(x_t[:, i : i + 1], t[:, i : i + 1], History.from_cache(inc), torch.tensor([i]))
        torch.testing.assert_close(out[:, 0], full[:, i], atol=ATOL, rtol=0)
    # Future steps never reach an earlier step's chunk.
    changed = tokens.clone()
    changed[:, 3:] += torch.randn_like(changed[:, 3:])
    cache2 = model.new_cache(None)
    model.encode(changed, cache2)
    full2 = model.denoise(x_t, t, History.from_cache(cache2), steps)
    torch.testing.assert_close(full2[:, :3], full[:, :3], atol=1e-6, rtol=0)
    assert (full2[:, 3:] - full[:, 3:]).abs().max() > 1e-4


def test_causal_dit_sliding_window_streaming_equals_one_windowed_pass() -> None:
    model = make_causal_dit()
    tokens = torch.randn(1, 9, S, D)
    x_t, t = torch.randn(1, 1, H, DA), torch.rand(1, 1)
    cache = model.new_cache(max_steps=4)
    for i in range(9):
        model.encode(tokens[:, i : i + 1], cache)
    assert cache.n_steps == 4
    streamed = model.denoise(x_t, t, History.from_cache(cache), torch.tensor([3]))
    one_pass = model.new_cache(max_steps=4)
    model.encode(tokens, one_pass)
    expected = model.denoise(x_t, t, History.from_cache(one_pass), torch.tensor([3]))
    torch.testing.assert_close(streamed, expected, atol=ATOL, rtol=0)


def test_image_encoder_tokens_and_batch_independence() -> None:
    encoder = ConvImageEncoder(3, [8, 16, 16], n_tokens=2, d_model=D).eval()
    images = torch.rand(3, 3, 24, 24) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (3, 2, D)
    # GroupNorm, not BatchNorm: a sample's tokens do not depend on the rest of the batch.
    torch.testing.assert_close(encoder(images[1:2]), tokens[1:2], atol=1e-5, rtol=0)


def test_step_tokenizer_layout_and_missing_previous_action() -> None:
    tokenizer = StepTokenizer({"state": [4], "cam": [3, 16, 16]}, DA, D, 2, [8, 16], use_prev_action=True)
    assert tokenizer.tokens_per_step == 1 + 2 + 1  # cam (2 tokens), state, previous action
    obs = {"state": torch.randn(2, 3, 4), "cam": torch.rand(2, 3, 3, 16, 16)}
    prev = torch.randn(2, 3, DA)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    tokens = tokenizer(obs, prev, valid)
    assert tokens.shape == (2, 3, 4, D)
    # Without a previous action the token is the learned "none" token, whatever the action values.
    tokens2 = tokenizer(obs, prev + 5.0, valid)
    torch.testing.assert_close(tokens2[0, 0, -1], tokens[0, 0, -1])
    torch.testing.assert_close(tokens[0, 0, -1], tokenizer.no_prev_action + tokenizer.slot_embed[-1])
    assert (tokens2[1, 0, -1] - tokens[1, 0, -1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="expected a vector"):
        StepTokenizer({"bad": [2, 3]}, DA, D, 2, [8], use_prev_action=False)
