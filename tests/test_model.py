"""The Llama model: each stability option's maths, parity with a plain reference, GQA, RoPE, presets' sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from megatron_adamc.model import PRESETS, PUBLISHED_PARAMS, Llama, LlamaConfig, apply_rope, lm_loss, rope_tables
from megatron_adamc.model import llama as llama_module

pytestmark = pytest.mark.unit  # make test-fast

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=32)


def small(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SMALL, **overrides})


def tokens(cfg: LlamaConfig, B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_llama(model: Llama, toks: torch.Tensor) -> torch.Tensor:
    """A plain Llama forward written independently: complex-number RoPE, explicit masked softmax, repeated kv."""
    cfg = model.config
    H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    T = toks.size(1)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2).float() / hd)
    freqs = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), inv_freq))

    def rope(x):  # pairs (i, i + hd/2) as one complex number
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :]) * freqs[:, None, :]
        return torch.cat([z.real, z.imag], -1)

    h = model.tok_embeddings.weight[toks]
    for layer in model.layers:
        a = rms(h, layer.attn_norm.weight) @ layer.attn.qkv.weight.T
        q, k, v = a.split([H * hd, KV * hd, KV * hd], -1)
        q, k = rope(q.unflatten(-1, (H, hd))), rope(k.unflatten(-1, (KV, hd)))
        k, v = k.repeat_interleave(H // KV, 2), v.unflatten(-1, (KV, hd)).repeat_interleave(H // KV, 2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        h = h + torch.einsum("bhts,bshd->bthd", s, v).flatten(-2) @ layer.attn.proj.weight.T
        g, u = (rms(h, layer.mlp_norm.weight) @ layer.mlp.fc1.weight.T).chunk(2, -1)
        h = h + (F.silu(g) * u) @ layer.mlp.fc2.weight.T
    return rms(h, model.norm.weight) @ model.output.weight.T


def capture(module: torch.nn.Module) -> dict:
    """Register a hook that keeps the module's last output (and input) in the returned dict."""
    store: dict = {}
    module.register_forward_hook(lambda m, i, o: store.update(out=o.detach(), inp=i[0].detach()))
    return store


def rms_normed(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps): unit RMS rows when mean(x^2) >> eps, slightly below 1 for tiny activations."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def unit_rms_rows(x: torch.Tensor, tol: float) -> bool:
    return torch.allclose(x.float().pow(2).mean(-1).sqrt(), torch.ones(()), atol=tol)


# ---- parity and structure -------------------------------------------------------------------------------------


def test_all_off_matches_plain_reference_llama():
    cfg = small()
    model = Llama(cfg, seed=3)
    toks = tokens(cfg)
    with torch.no_grad():
        assert torch.allclose(model(toks), reference_llama(model, toks), atol=1e-6, rtol=0)


def test_defaults_are_all_off_and_each_option_changes_the_output():
    assert LlamaConfig.from_preset("tiny") == LlamaConfig(**PRESETS["tiny"], qk_norm=False, softmax_cap=None)
    toks = tokens(small())
    base = Llama(small(), seed=1)(toks)
    options = dict(
        qk_norm=True, qkv_norm=True, post_proj_norm=True, post_fc2_norm=True, softmax_cap=0.05,
        embedding_scale="sqrt_d", embedding_norm=True, init="small",
    )  # fmt: skip
    for key, value in options.items():
        out = Llama(small(**{key: value}), seed=1)(toks)
        assert (out - base).abs().max() > 1e-4, f"{key} did not change the output"


def test_module_names_for_the_norm_tracker():
    names = dict(Llama(small()).named_modules())
    for i in range(2):
        for suffix in ["attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.fc1", "mlp.fc2"]:
            assert f"layers.{i}.{suffix}" in names
    assert {"tok_embeddings", "norm", "output"} <= names.keys()
    assert names["layers.0.mlp.fc1"].out_features == 2 * SMALL["ffn_dim"]
    assert names["layers.0.attn.qkv"].out_features == 64 + 2 * 2 * 16  # q + k + v with 2 kv heads of 16
    assert not any("q_norm" in n or "proj_norm" in n or "embedding_norm" in n for n in names)


def test_tied_output_shares_the_embedding_weight():
    cfg, tied_cfg = small(), small(tie_embeddings=True)
    tied = Llama(tied_cfg)
    assert tied.output is None and "output.weight" not in tied.state_dict()
    assert Llama(cfg).num_params() - tied.num_params() == cfg.vocab_size * cfg.dim
    toks = tokens(tied_cfg)
    h = {}
    tied.norm.register_forward_hook(lambda m, i, o: h.update(out=o))
    logits = tied(toks)
    assert torch.allclose(logits, h["out"] @ tied.tok_embeddings.weight.T, atol=1e-6)
    logits.sum().backward()
    assert tied.tok_embeddings.weight.grad.abs().sum() > 0


def test_deterministic_init_from_seed():
    a, b, c = Llama(small(), seed=7), Llama(small(), seed=7), Llama(small(), seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    with torch.device("meta"):
        lazy = Llama(small(), seed=7)  # allocates nothing, skips init
    lazy.to_empty(device="cpu").init_weights(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(lazy.parameters(), a.parameters(), strict=True))


def test_bf16_model_keeps_fp32_rope_tables_and_fp32_logits():
    cfg = small()
    model = Llama(cfg, seed=0)
    toks = tokens(cfg)
    with torch.no_grad():
        full = model(toks)
        model.bfloat16()  # what DeepSpeed's bf16 does to the module
        half = model(toks)
    assert model.rope(toks.device)[0].dtype == torch.float32 and half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_sequence_longer_than_max_seq_len_is_an_error():
    cfg = small()
    with pytest.raises(ValueError, match="max_seq_len"):
        Llama(cfg)(tokens(cfg, T=cfg.max_seq_len + 1))


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="qk_nrom"):
        LlamaConfig.from_preset("tiny", qk_nrom=True)
    with pytest.raises(ValidationError, match="n_kv_heads=3"):
        small(n_kv_heads=3)
    with pytest.raises(ValidationError, match="softmax_cap"):
        small(softmax_cap=0.0)
    with pytest.raises(ValidationError, match="embedding_scale"):
        small(embedding_scale="sqrt")
    with pytest.raises(ValueError, match="model.preset='7b'"):
        LlamaConfig.from_preset("7b")


# ---- attention: SDPA vs explicit, GQA, RoPE, capping, max logit -----------------------------------------------


def test_sdpa_path_equals_explicit_logit_path():
    """A cap far above the logits makes the explicit (capping) path an identity on them: it must equal SDPA."""
    cfg = small()
    model, explicit_model = Llama(cfg, seed=2), Llama(small(softmax_cap=1e4), seed=2)
    toks = tokens(cfg)
    model.track_max_logits(True)
    explicit_model.track_max_logits(True)
    with torch.no_grad():
        sdpa, explicit = model(toks), explicit_model(toks)
    assert torch.allclose(sdpa, explicit, atol=1e-5, rtol=0)
    for side, inline in zip(model.max_logits(), explicit_model.max_logits(), strict=True):
        assert torch.allclose(side, inline, rtol=1e-5)  # SDPA's side computation == the explicit path's logits


def test_max_logit_chunks_agree_with_one_block(monkeypatch):
    """The side computation, chunked over query rows, finds the same maximum as one unchunked block."""
    cfg = small(init_std=0.2)
    model = Llama(cfg, seed=7)
    model.track_max_logits(True)
    toks = tokens(cfg)
    with torch.no_grad():
        model(toks)
        whole = [m.clone() for m in model.max_logits()]
        monkeypatch.setattr(llama_module, "_MAX_LOGIT_CHUNK", 3 * toks.size(0) * cfg.n_heads * toks.size(1))
        model(toks)
    assert torch.equal(torch.stack(whole), torch.stack(model.max_logits()))


@pytest.mark.parametrize("track", [False, True])
def test_gqa_equals_full_attention_with_repeated_kv_heads(track: bool):
    """GQA with 2 kv heads for 4 query heads == MHA whose k and v heads are copies, each serving its group."""
    gqa_cfg = small()
    gqa = Llama(gqa_cfg, seed=4)
    mha = Llama(small(n_kv_heads=None), seed=5)
    H, KV, hd, d = 4, 2, 16, 64
    state = gqa.state_dict()
    for i in range(gqa_cfg.n_layers):
        q, k, v = state[f"layers.{i}.attn.qkv.weight"].split([H * hd, KV * hd, KV * hd])
        rep = lambda w: w.view(KV, hd, d).repeat_interleave(H // KV, 0).reshape(H * hd, d)
        state[f"layers.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    gqa.track_max_logits(track)
    toks = tokens(gqa_cfg)
    with torch.no_grad():
        assert torch.allclose(gqa(toks), mha(toks), atol=1e-5, rtol=0)


def test_rope_score_depends_only_on_relative_offset():
    hd, T = 32, 128
    cos, sin = rope_tables(hd, T, 10000.0)
    g = torch.Generator().manual_seed(0)
    q_vec, k_vec = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    q = apply_rope(q_vec.expand(1, T, 1, hd), cos, sin)[0, :, 0]  # the same vector placed at every position
    k = apply_rope(k_vec.expand(1, T, 1, hd), cos, sin)[0, :, 0]
    for offset in [0, 3, 17]:
        scores = torch.stack([q[m] @ k[m - offset] for m in range(offset, T)])
        assert torch.allclose(scores, scores[0].expand_as(scores), atol=1e-4)
    assert not torch.isclose(q[10] @ k[7], q[10] @ k[2], atol=1e-3)  # different offsets, different scores
    assert torch.allclose(q.norm(dim=-1), q_vec.norm().expand(T), atol=1e-5)  # a rotation keeps the norm


def test_softmax_capping_bounds_the_logits():
    """With a large init the raw logits exceed the cap; capped ones stay inside and equal cap*tanh(raw/cap)."""
    cap = 5.0
    raw_model = Llama(small(init_std=0.5), seed=0)
    capped_model = Llama(small(init_std=0.5, softmax_cap=cap), seed=0)
    toks = tokens(raw_model.config)
    for m in (raw_model, capped_model):
        m.track_max_logits(True)
        with torch.no_grad():
            m(toks)
    raw_max, capped_max = raw_model.max_logits()[0], capped_model.max_logits()[0]
    assert raw_max > 3 * cap  # the cap really bites
    assert capped_max <= cap
    assert torch.allclose(capped_max, cap * torch.tanh(raw_max / cap), atol=1e-5)  # same input in layer 0
    assert all(m <= cap for m in capped_model.max_logits())


def test_max_logit_over_the_first_sequences():
    """``sequences=1`` reads only the first sequence: the same value as a forward on that sequence alone."""
    cfg = small(init_std=0.2)
    model = Llama(cfg, seed=8)
    toks = tokens(cfg, B=4)
    with torch.no_grad():
        model.track_max_logits(True)
        model(toks[:1])
        first = torch.stack(model.max_logits())
        model(toks)
        every = torch.stack(model.max_logits())
        model.track_max_logits(True, sequences=1)
        model(toks)
        sampled = torch.stack(model.max_logits())
    assert torch.allclose(sampled, first, rtol=1e-6)
    assert (every > sampled).any()  # the other sequences hold larger logits somewhere: the sample is smaller
    with pytest.raises(ValueError, match="sequences=-1"):
        model.track_max_logits(True, sequences=-1)


def test_max_logit_value_against_hand_computation():
    cfg = small(n_layers=1, qk_norm=True)
    model = Llama(cfg, seed=6)
    model.track_max_logits(True)
    qkv = capture(model.layers[0].attn.qkv)
    toks = tokens(cfg)
    with torch.no_grad():
        model(toks)
    T = toks.size(1)
    q, k, _ = qkv["out"].split([64, 32, 32], -1)
    rms = lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)  # gains are 1 at init
    cos, sin = rope_tables(16, T, cfg.rope_theta)
    q = apply_rope(rms(q.unflatten(-1, (4, 16))), cos, sin)
    k = apply_rope(rms(k.unflatten(-1, (2, 16))), cos, sin).repeat_interleave(2, 2)
    logits = torch.einsum("bthd,bshd->bhts", q, k) / 4.0
    assert logits.shape[-1] == T
    visible = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    assert visible.max() < logits.max()  # the hidden (future) positions hold a larger logit: the mask matters
    assert torch.allclose(model.max_logits()[0], visible.max(), atol=1e-5)


# ---- norms -----------------------------------------------------------------------------------------------------


def test_qk_norm_makes_query_and_key_rows_unit_rms_times_gain():
    model = Llama(small(qk_norm=True), seed=0)
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
        attn.k_norm.weight.fill_(3.0)
    q_out, k_out = capture(attn.q_norm), capture(attn.k_norm)
    with torch.no_grad():
        model(tokens(model.config))
    assert q_out["out"].shape[-2:] == (4, 16) and k_out["out"].shape[-2:] == (2, 16)  # per head
    assert unit_rms_rows(q_out["out"] / attn.q_norm.weight, 1e-3)
    assert unit_rms_rows(k_out["out"] / 3.0, 1e-3)
    assert not unit_rms_rows(q_out["inp"], 0.1)  # the raw projections were not unit RMS


def test_qkv_norm_removes_the_attention_pre_norm():
    model = Llama(small(qkv_norm=True), seed=0)
    names = dict(model.named_modules())
    assert "layers.0.attn_norm" not in names and model.layers[0].attn_norm is None
    assert "layers.0.attn.qkv_norm" in names and "layers.0.mlp_norm" in names
    block_in, qkv_in = capture(model.layers[1]), capture(model.layers[1].attn.qkv)
    qkv_norm = capture(model.layers[1].attn.qkv_norm)
    with torch.no_grad():
        model(tokens(model.config))
    assert torch.equal(qkv_in["inp"], block_in["inp"])  # the qkv layer sees the raw residual stream
    x, y = qkv_norm["inp"], qkv_norm["out"]
    assert y.shape[-1] == 64 + 2 * 32  # one norm over the fused q, k, v output
    # Without the pre-norm the qkv output is small (rms ~ 3e-3), so eps=1e-5 shows: compare with the exact formula.
    assert torch.allclose(y, rms_normed(x), atol=1e-5)


def test_post_proj_and_post_fc2_norms_normalise_the_sublayer_outputs():
    model = Llama(small(post_proj_norm=True, post_fc2_norm=True), seed=0)
    attn_out, mlp_out = capture(model.layers[0].attn), capture(model.layers[0].mlp)
    proj, fc2 = capture(model.layers[0].attn.proj), capture(model.layers[0].mlp.fc2)
    with torch.no_grad():
        model(tokens(model.config))
    assert torch.allclose(attn_out["out"], rms_normed(proj["out"]), atol=1e-5)  # gains are 1 at init
    assert torch.allclose(mlp_out["out"], rms_normed(fc2["out"]), atol=1e-5)
    assert not unit_rms_rows(proj["out"], 0.1) and not unit_rms_rows(fc2["out"], 0.1)


def test_scaled_embedding_is_sqrt_d_times_the_lookup():
    model = Llama(small(embedding_scale="sqrt_d"), seed=0)
    toks = tokens(model.config)
    with torch.no_grad():
        assert torch.allclose(model.embed(toks), math.sqrt(64) * model.tok_embeddings(toks), rtol=1e-6, atol=0)
        assert torch.equal(Llama(small(), seed=0).embed(toks), model.tok_embeddings(toks))  # off: the raw lookup


def test_embedding_layernorm_output_has_unit_rms_and_zero_mean():
    model = Llama(small(embedding_norm=True), seed=0)
    assert isinstance(model.embedding_norm, torch.nn.LayerNorm)
    with torch.no_grad():
        toks = tokens(model.config)
        h, raw = model.embed(toks), model.tok_embeddings(toks)
    centred = raw - raw.mean(-1, keepdim=True)
    assert torch.allclose(h, rms_normed(centred), atol=1e-5)  # LayerNorm = RMS norm of the centred row, gain 1
    # eps=1e-5 against a row variance of 0.02^2 lowers the RMS by 1-3%; with variance >> eps it is 1.
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(10.0)
        assert unit_rms_rows(model.embed(toks), 1e-3)
    assert h.mean(-1).abs().max() < 1e-5


# ---- init ------------------------------------------------------------------------------------------------------

INIT_CFG = dict(dim=256, n_layers=8, n_heads=4, ffn_dim=512, vocab_size=512, max_seq_len=16)


def _stds(model: Llama) -> dict[str, float]:
    return {n: p.std().item() for n, p in model.named_parameters() if p.ndim == 2}


def test_normal_init_std_is_init_std_everywhere():
    """Every matrix has >= 65k entries, so the sample std is within ~0.3% (1 sigma) of the target: tolerance 3%."""
    model = Llama(LlamaConfig(**INIT_CFG), seed=0)
    stds = _stds(model)
    assert len(stds) == 2 + 4 * 8  # embedding, output, 4 matrices per layer
    for name, std in stds.items():
        assert std == pytest.approx(0.02, rel=0.03), name
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if p.ndim == 1)


def test_small_init_std_and_depth_scaled_output_projections():
    model = Llama(LlamaConfig(**INIT_CFG, init="small"), seed=0)
    base = math.sqrt(2 / (5 * 256))  # 0.0395
    scaled = base / math.sqrt(2 * 8)  # 0.0099: attn.proj and mlp.fc2
    for name, std in _stds(model).items():
        target = scaled if name.endswith(("attn.proj.weight", "mlp.fc2.weight")) else base
        assert std == pytest.approx(target, rel=0.03), name


# ---- loss ------------------------------------------------------------------------------------------------------


def test_z_loss_against_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])  # [B=1, T=2, V=3]
    targets = torch.tensor([[0, 1]])
    lse = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(2 * math.exp(0.5) + math.exp(3))]
    ce = ((lse[0] - 2.0) + (lse[1] - 0.5)) / 2
    z = 1e-4 * (lse[0] ** 2 + lse[1] ** 2) / 2
    loss, parts = lm_loss(logits, targets, z_loss=1e-4)
    assert loss.item() == pytest.approx(ce + z, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6) and parts["z_loss"].item() == pytest.approx(z, rel=1e-5)
    off, off_parts = lm_loss(logits, targets)
    assert off.item() == pytest.approx(ce, abs=1e-6) and off_parts["z_loss"].item() == 0.0
    # ignored targets drop out of both terms
    loss_ign, parts_ign = lm_loss(logits, torch.tensor([[0, -100]]), z_loss=1.0)
    assert parts_ign["ce"].item() == pytest.approx(lse[0] - 2.0, abs=1e-6)
    assert loss_ign.item() == pytest.approx(lse[0] - 2.0 + lse[0] ** 2, abs=1e-5)


def test_model_loss_uses_the_config_z_loss_and_trains():
    cfg = small(z_loss=1e-2)
    model = Llama(cfg, seed=0)
    toks = tokens(cfg, B=4, T=17)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, parts = model.loss(model(toks[:, :-1]), toks[:, 1:])
        assert loss.item() == pytest.approx((parts["ce"] + parts["z_loss"]).item(), rel=1e-6)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(parts["ce"].item())
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # uniform at init
    assert losses[-1] < 0.5 * losses[0]  # memorises one batch


# ---- sizes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published_sizes(name: str):
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_preset(name))
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert model.num_params() == pytest.approx(PUBLISHED_PARAMS[name], rel=0.10)


def test_num_params_and_flops_per_token_by_hand():
    cfg = small()
    model = Llama(cfg)
    d, V, L, f, kv = 64, 97, 2, 96, 32
    per_layer = d * (d + 2 * kv) + d * d + d * 2 * f + f * d + 2 * d  # qkv, proj, fc1, fc2, two norms
    assert model.num_params() == V * d + L * per_layer + d + V * d
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * d
    assert model.flops_per_token(32) == 6 * (L * per_layer + d + V * d) + 12 * L * d * 32
    tied = Llama(small(tie_embeddings=True))
    assert tied.flops_per_token(32) == model.flops_per_token(32)  # the tied head still does its matmul
