"""Quantized KV caches (KIVI): codes, error bounds, exact bytes, and decoding against an oracle
that fake-quantizes the keys and values a step reads (written here in numpy)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing, kv_quant
from memx.kernels._dispatch import gpu_backend
from memx.kernels.attention import Mask
from memx.kernels.attention.chunk import chunk_attention_reference
from memx.kernels.kv_quant import KVQuant
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig
from memx.models.decode import cache_bytes, decode_logits, decode_nll, generate, kv_cache_bytes
from memx.models.transformer import TransformerLM
from memx.nn import attention_decode
from memx.nn.attention import Attention

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _fake_quant(x, bits, axis):
  """numpy oracle: asymmetric b-bit rounding of x over `axis` (scale 0: the group's value)."""
  x = np.asarray(x, np.float32)
  lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
  scale = (hi - lo) / np.float32(2 ** bits - 1)
  codes = np.clip(np.round((x - lo) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1)
  return codes * scale + lo, scale


def _fake_quant_keys(k, spec):
  b, t, g, d = k.shape
  x, _ = _fake_quant(np.asarray(k).reshape(b, t // spec.group, spec.group, g, d), spec.bits, 2)
  return x.reshape(k.shape)


def _fake_quant_values(v, spec):
  vg = spec.value_group(v.shape[-1])
  x, _ = _fake_quant(np.asarray(v).reshape(*v.shape[:-1], -1, vg), spec.bits, -1)
  return x.reshape(v.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_is_exact_and_packs_8_over_bits_codes_per_byte(bits):
  codes = jax.random.randint(jax.random.key(bits), (3, 5, 16), 0, 2 ** bits).astype(jnp.uint8)
  packed = kv_quant.pack(codes, bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 16 * bits // 8)
  np.testing.assert_array_equal(kv_quant.unpack(packed, bits), codes)
  if bits == 2:  # planar: channel f * W + j in byte j at bit 2 f (W = 2 bytes for 8 channels)
    one = kv_quant.pack(jnp.array([[1, 0, 2, 0, 3, 0, 1, 3]], jnp.uint8), 2)
    assert [int(b) for b in one[0]] == [1 | 2 << 2 | 3 << 4 | 1 << 6, 3 << 6]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_keys_per_channel_and_values_per_token_match_the_oracle_within_half_a_step(bits):
  spec = KVQuant(bits=bits, group=8)
  x = jax.random.normal(jax.random.key(0), (2, 24, 3, 16)) * 3
  x = x.at[:, :, :, 5].multiply(40.0)  # an outlier channel, as KIVI sees in keys
  for quant, dequant, oracle in (
      (kv_quant.quantize_keys, kv_quant.dequantize_keys, _fake_quant_keys),
      (kv_quant.quantize_values, kv_quant.dequantize_values, _fake_quant_values)):
    codes, scale, zero = quant(x, spec, jnp.float32)
    back = dequant(codes, scale, zero, spec, jnp.float32)
    np.testing.assert_allclose(back, oracle(x, spec), rtol=0, atol=1e-5 * 120)
  # The bound itself, per element: keys' scale is per (token group, channel).
  codes, scale, zero = kv_quant.quantize_keys(x, spec, jnp.float32)
  assert scale.shape == (2, 3, 3, 16)
  back = kv_quant.dequantize_keys(codes, scale, zero, spec, jnp.float32)
  half = np.repeat(np.asarray(scale), spec.group, axis=1) / 2
  assert (np.abs(np.asarray(back - x)) <= half * (1 + 1e-5) + 1e-6).all()


def test_a_constant_group_is_stored_exactly():
  spec = KVQuant(bits=2, group=4)
  x = jnp.full((1, 8, 1, 4), 0.3)
  codes, scale, zero = kv_quant.quantize_keys(x, spec, jnp.float32)
  assert float(jnp.max(scale)) == 0.0
  np.testing.assert_array_equal(kv_quant.dequantize_keys(codes, scale, zero, spec, jnp.float32),
                                x)


@pytest.mark.parametrize("spec", [KVQuant(4, 4), KVQuant(2, 8), KVQuant(8, 32)])
@pytest.mark.parametrize("max_len", [16, 21])
def test_kv_cache_bytes_count_every_array_of_the_cache(spec, max_len):
  cfg = dataclasses.replace(CFG, mixers=("mamba2", "attention"),
                            ssm=SSMConfig(d_state=8, head_dim=8, chunk_size=16))
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  cache = model.init_cache(3, max_len, kv_quant=spec)
  quant = cache["layers"][1]
  assert isinstance(quant, kv_quant.QuantCache)
  assert kv_cache_bytes(cfg, max_len, 3, kv_quant=spec) == cache_bytes(quant)
  # By hand: head_dim 8, 2 KV heads; slots rounded up to whole groups.
  slots = -(-max_len // spec.group) * spec.group
  vg = min(spec.group, 8)
  per_head = (2 * slots * 8 * spec.bits // 8 + 2 * slots // spec.group * 8 * 4
              + 2 * slots * (8 // vg) * 4 + 2 * spec.group * 8 * 4)
  assert kv_cache_bytes(cfg, max_len, 3, kv_quant=spec) == 3 * 2 * per_head


def test_at_the_llm_shape_4_bit_keeps_under_a_third_of_bf16():
  cfg = ModelConfig(vocab_size=256, d_model=2048, n_layers=2, n_heads=16, n_kv_heads=8,
                    compute_dtype="bfloat16")
  dense = kv_cache_bytes(cfg, 16384)
  assert kv_cache_bytes(cfg, 16384, kv_quant=KVQuant(4, 32)) / dense < 0.32
  assert kv_cache_bytes(cfg, 16384, kv_quant=KVQuant(2, 32)) / dense < 0.20


def _layer(spec_cfg=CFG):
  return Attention(spec_cfg, 0, rngs=nnx.Rngs(3))


def _oracle_step(attn, q, k, v, pos, spec):
  """Attention of q (position pos) over keys 0..pos: groups before pos's fake-quantized."""
  cut = spec.exact_from(pos)
  kq, vq = np.asarray(k[:, :pos + 1]).copy(), np.asarray(v[:, :pos + 1]).copy()
  if cut:
    kq[:, :cut] = _fake_quant_keys(k[:, :cut], spec)
    vq[:, :cut] = _fake_quant_values(v[:, :cut], spec)
  return chunk_attention_reference(q, jnp.asarray(kq), jnp.asarray(vq), pos,
                                   mask=attn.mask(pos + 1))


@pytest.mark.parametrize("bits,residual", [(2, 0), (4, 0), (2, 8)])
def test_decode_steps_read_earlier_groups_quantized_and_their_own_group_exactly(bits, residual):
  """Positions before exact_from(pos) (the current group, and `residual` tokens before it) are
  read quantized, the rest exactly."""
  spec = KVQuant(bits=bits, group=4, residual=residual)
  attn = _layer()
  x = jax.random.normal(jax.random.key(1), (2, 14, CFG.d_model))
  q, k, v = attn.qkv(x, jnp.broadcast_to(jnp.arange(14), (2, 14)))
  step = jit_for_test(lambda a, xt, p, c: attention_decode.step(a, xt, p, c))
  cache = attention_decode.init_cache(attn, 2, 14, kv_quant=spec)
  wo = attn.wo[...]
  for pos in range(14):
    y, cache = step(attn, x[:, pos], jnp.int32(pos), cache)
    want = jnp.einsum("bhk,hkd->bd", _oracle_step(attn, q[:, pos:pos + 1], k, v, pos, spec)[:, 0],
                      wo)
    _testing.assert_allclose(y, want, name=f"step {pos}")
  # Every group that left the ring is in the codes as the oracle rounds it; the ring is exact.
  cut = spec.exact_from(13)
  k_read, _ = cache.read(cut)
  np.testing.assert_allclose(k_read[:, :cut], _fake_quant_keys(k[:, :cut], spec), atol=1e-5)
  np.testing.assert_array_equal(k_read[:, cut:14], k[:, cut:14])


@pytest.mark.parametrize("residual", [0, 4])
def test_chunked_prefill_reads_earlier_chunks_as_stored_and_leaves_the_same_cache(residual):
  spec = KVQuant(bits=4, group=4, residual=residual)
  attn = _layer()
  x = jax.random.normal(jax.random.key(2), (2, 13, CFG.d_model))
  q, k, v = attn.qkv(x, jnp.broadcast_to(jnp.arange(13), (2, 13)))
  whole_y, whole = attention_decode.prefill(attn, x, 16, kv_quant=spec)
  cache, outs = attention_decode.init_cache(attn, 2, 16, kv_quant=spec), []
  for start in (0, 5, 10):   # chunks that start inside groups (residuals of 1 and 2 tokens)
    y, cache = attention_decode.extend(attn, x[:, start:start + 5], start, cache)
    outs.append(y)
    cut = spec.exact_from(start)
    kq, vq = np.asarray(k).copy(), np.asarray(v).copy()
    if cut:
      kq[:, :cut], vq[:, :cut] = (_fake_quant_keys(k[:, :cut], spec),
                                  _fake_quant_values(v[:, :cut], spec))
    end = min(start + 5, 13)
    want = chunk_attention_reference(q[:, start:end], jnp.asarray(kq[:, :end]),
                                     jnp.asarray(vq[:, :end]), start, mask=attn.mask(16))
    _testing.assert_allclose(y, jnp.einsum("bthk,hkd->btd", want, attn.wo[...]),
                             name=f"chunk at {start}")
  # The first chunk reads nothing from the cache: as the whole prompt's first five rows.
  _testing.assert_allclose(outs[0], whole_y[:, :5], name="first chunk")
  # The same codes and statistics; of the ring, the slots of the positions a read at 13 takes
  # exactly (the others hold unreachable leftovers of earlier chunks).
  for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
    np.testing.assert_array_equal(getattr(whole, name), getattr(cache, name), err_msg=name)
  held = np.arange(spec.exact_from(13), 13) % spec.ring
  for name in ("k_res", "v_res"):
    np.testing.assert_array_equal(getattr(whole, name)[:, held], getattr(cache, name)[:, held])


@pytest.mark.parametrize("residual", [0, 8])
def test_scanned_prefill_equals_the_unrolled_one_and_a_misaligned_chunk_unrolls(residual):
  spec = KVQuant(bits=4, group=4, residual=residual)
  model = TransformerLM(CFG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(4), (2, 19), 0, 64)
  run = jit_for_test(lambda m, t: m.prefill(t, 24, chunk_size=8, kv_quant=spec))
  unrolled = jit_for_test(lambda m, t: m.prefill(t, 24, chunk_size=8, unroll=True,
                                                 kv_quant=spec))
  (la, ca), (lb, cb) = run(model, tokens), unrolled(model, tokens)
  _testing.assert_allclose(la, lb, name="logits")
  for a, b in zip(jax.tree.leaves(ca), jax.tree.leaves(cb), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Chunks of 6 do not start on group boundaries: they run unrolled, with static offsets (a
  # scan would need a traced one). The first chunk reads nothing from the cache, so its logits
  # are the whole prompt's; later chunks read earlier chunks' quantized groups.
  odd = jit_for_test(lambda m, t: m.prefill(t, 24, chunk_size=6, kv_quant=spec))(model, tokens)
  whole = jit_for_test(lambda m, t: m.prefill(t, 24, kv_quant=spec))(model, tokens)
  _testing.assert_allclose(odd[0][:, :6], whole[0][:, :6], name="first chunk of 6")
  assert float(jnp.max(jnp.abs(odd[0][:, 12:] - whole[0][:, 12:]))) > 1e-4


def test_extend_takes_concrete_offsets_as_static_and_poisons_a_misaligned_traced_one():
  spec = KVQuant(bits=4, group=4)
  attn = _layer()
  x = jax.random.normal(jax.random.key(9), (1, 10, CFG.d_model))
  cache = attention_decode.init_cache(attn, 1, 16, kv_quant=spec)
  _, cache = attention_decode.extend(attn, x[:, :2], 0, cache)
  want, _ = attention_decode.extend(attn, x[:, 2:10], 2, cache)
  got, _ = attention_decode.extend(attn, x[:, 2:10], np.int64(2), cache)   # numpy: static
  np.testing.assert_array_equal(got, want)
  traced = jax.jit(lambda s, c: attention_decode.extend(attn, x[:, 2:10], s, c)[0])
  assert bool(jnp.isnan(traced(jnp.int32(2), cache)).all())               # off a boundary
  aligned = jax.jit(lambda s, c: attention_decode.extend(attn, x[:, :8], s, c)[0])
  fresh = attention_decode.init_cache(attn, 1, 16, kv_quant=spec)
  _testing.assert_allclose(aligned(jnp.int32(0), fresh),
                           attention_decode.extend(attn, x[:, :8], 0, fresh)[0], name="aligned")


def test_a_fresh_cache_can_be_donated():
  spec = KVQuant(bits=2, group=4)
  cache = kv_quant.init_quant_cache(spec, 1, 8, 2, 8, jnp.float32)
  kv = jnp.ones((1, 1, 2, 8))
  out = jax.jit(lambda c: c.step(kv, kv, jnp.int32(0)), donate_argnums=0)(cache)
  np.testing.assert_array_equal(out.k_res[:, 0], kv[:, 0])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bf16_scales_round_outward_so_the_bound_holds(bits):
  spec = KVQuant(bits=bits, group=8)
  x = (jax.random.normal(jax.random.key(bits), (2, 32, 2, 16)) * 5 + 3).astype(jnp.bfloat16)
  for quant, dequant, stats_axis in ((kv_quant.quantize_keys, kv_quant.dequantize_keys, 1),
                                     (kv_quant.quantize_values, kv_quant.dequantize_values, 3)):
    codes, scale, zero = quant(x, spec, jnp.bfloat16)
    back = np.asarray(dequant(codes, scale, zero, spec, jnp.float32))
    half = np.repeat(np.asarray(scale, np.float32), 8, axis=stats_axis) / 2
    assert (np.abs(back - np.asarray(x, np.float32)) <= half * (1 + 1e-6) + 1e-6).all()


def test_decode_nll_without_quantization_equals_the_forward_loss():
  model = TransformerLM(dataclasses.replace(CFG, attn_window=5, attn_sinks=1),
                        rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(5), (2, 17), 0, 64)
  logits = model(tokens)
  logp = jax.nn.log_softmax(logits[:, 6:-1], axis=-1)
  want = -jnp.take_along_axis(logp, tokens[:, 7:, None], axis=-1)[..., 0]
  _testing.assert_allclose(decode_nll(model, tokens, 7), want, name="decode nll")


def test_fewer_bits_move_the_decode_loss_further_from_full_precision():
  cfg = dataclasses.replace(CFG, d_model=64, n_heads=4, n_kv_heads=2, init_std=0.1)
  model = TransformerLM(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(6), (4, 40), 0, 64)
  full = decode_nll(model, tokens, 4)
  gap = {bits: float(jnp.mean(jnp.abs(decode_nll(model, tokens, 4, kv_quant=KVQuant(bits, 8))
                                      - full))) for bits in (2, 4, 8)}
  assert 0 < gap[8] < gap[4] < gap[2], gap


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_generate_with_a_quantized_cache_on_a_hybrid(compute_dtype):
  cfg = dataclasses.replace(CFG, mixers=("mamba2", "attention"), compute_dtype=compute_dtype,
                            ssm=SSMConfig(d_state=8, head_dim=8, chunk_size=16))
  model = TransformerLM(cfg, rngs=nnx.Rngs(2))
  prompt = jax.random.randint(jax.random.key(7), (2, 9), 0, 64)
  out = generate(model, prompt, 6, kv_quant=KVQuant(8, 4), prefill_chunk=4)
  assert out.shape == (2, 15)
  np.testing.assert_array_equal(out[:, :9], prompt)
  # 8-bit codes: greedy tokens as with the full cache on this small model.
  np.testing.assert_array_equal(out, generate(model, prompt, 6, prefill_chunk=4))


def test_bad_input_is_refused_before_any_array_is_made():
  with pytest.raises(ValueError, match="bits must be one of"):
    KVQuant(bits=3)
  with pytest.raises(ValueError, match="group"):
    KVQuant(bits=4, group=1)
  with pytest.raises(ValueError, match="BITS, BITS:GROUP"):
    KVQuant.parse("four")
  assert KVQuant.parse("2:16") == KVQuant(2, 16) and KVQuant.parse("8") == KVQuant(8, 32)
  assert KVQuant.parse("2:32:128") == KVQuant(2, 32, 128)
  with pytest.raises(ValueError, match="multiple of group 32"):
    KVQuant(2, 32, residual=48)
  odd = dataclasses.replace(CFG, d_model=40, n_heads=4, n_kv_heads=2)   # head_dim 10
  with pytest.raises(ValueError, match="head_dim 10"):
    TransformerLM(odd, rngs=nnx.Rngs(0)).init_cache(1, 8, kv_quant=KVQuant(4, 4))
  plan = dataclasses.replace(CFG, attn_plan=(((4, 0.0, 1),) * 4, None))  # (alpha, beta, sinks)
  model = TransformerLM(plan, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sparse plan"):
    model.init_cache(1, 8, kv_quant=KVQuant())
  with pytest.raises(ValueError, match="sparse plan"):
    kv_cache_bytes(plan, 8, kv_quant=KVQuant())
  model.init_cache(1, 8, kv_quant=KVQuant(4, 4), full_cache=True)  # the dense form quantizes
  attn = _layer()
  cache = attention_decode.init_cache(attn, 1, 16, kv_quant=KVQuant(4, 4))
  x = jnp.zeros((1, 6, CFG.d_model))
  with pytest.raises(ValueError, match="multiple of its key group"):
    jax.jit(lambda s: attention_decode.extend(attn, x, s, cache))(jnp.int32(0))
  with pytest.raises(ValueError, match="prompt_len"):
    decode_nll(TransformerLM(CFG, rngs=nnx.Rngs(0)), jnp.zeros((1, 4), jnp.int32), 4)


def test_decode_logits_equal_the_forward_without_quantization():
  model = TransformerLM(CFG, rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(8), (2, 12), 0, 64)
  _testing.assert_allclose(decode_logits(model, tokens, 5), model(tokens), name="logits")
  quant = decode_logits(model, tokens, 5, kv_quant=KVQuant(2, 4))
  # The prompt's logits are the prefill's (exact); steps past the first group read codes.
  _testing.assert_allclose(quant[:, :5], model(tokens)[:, :5], name="prompt")
  assert float(jnp.max(jnp.abs(quant[:, 8:] - model(tokens)[:, 8:]))) > 1e-4


# --- the decode kernel ------------------------------------------------------------------------

def _filled_cache(spec, b, s, g, d, pos, dtype, seed=0):
  """A QuantCache holding random keys/values for positions 0..pos (quantized where whole)."""
  k, v = (jax.random.normal(key, (b, pos + 1, g, d), jnp.float32).astype(dtype)
          for key in jax.random.split(jax.random.key(seed)))
  k = k.at[..., 3].multiply(8.0)                      # an outlier channel
  cache = kv_quant.init_quant_cache(spec, b, s, g, d, dtype)
  cache = cache.append(k[:, :pos], v[:, :pos], 0, 0)
  return cache.step(k[:, pos:], v[:, pos:], jnp.int32(pos))


KERNEL_CASES = [  # (bits, group, head_dim, heads, kv heads, mask, pos, splits)
    (4, 16, 64, 8, 2, Mask(causal=True), 70, 1),
    (2, 16, 64, 4, 4, Mask(causal=True), 95, 3),
    (8, 32, 64, 6, 2, Mask(causal=True), 40, 2),
    (2, 32, 128, 4, 1, Mask(causal=True, window_left=40, n_sink=5), 127, 2),
    (4, 16, 64, 8, 2, Mask(causal=True, window_left=20, n_sink=0), 99, 4),
    (4, 16, 64, 8, 2, Mask(causal=True), 9, 2),       # inside the first group: residual only
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"b{c[0]}g{c[1]}d{c[2]}p{c[6]}")
def test_decode_kernel_matches_the_reference(case, dtype):
  bits, group, d, h, g, mask, pos, splits = case
  spec = KVQuant(bits, group)
  cache = _filled_cache(spec, 2, 128, g, d, pos, dtype, seed=pos)
  q = jax.random.normal(jax.random.key(1), (2, h, d), jnp.float32).astype(dtype)
  want = kv_quant.decode_attention(q, cache, jnp.int32(pos), mask=mask,
                                   implementation="reference")
  got = jax.jit(lambda q, c, p: kv_quant.decode_attention(
      q, c, p, mask=mask, implementation="pallas_gpu", interpret=True, splits=splits))(
          q, cache, jnp.int32(pos))
  _testing.assert_allclose(got, want, name=f"{case}")


def _oracle_decode(q, k, v, pos, spec, left, sink):
  """float64 numpy: attention of q at pos over k, v [B, pos + 1, G, K], the groups before pos's
  fake-quantized (independent of the package: its own quantizer, its own softmax)."""
  b, _, g, d = k.shape
  cut = spec.exact_from(pos)
  k, v = np.array(k, np.float64), np.array(v, np.float64)
  if cut:
    k[:, :cut] = _fake_quant_keys(k[:, :cut], spec)
    v[:, :cut] = _fake_quant_values(v[:, :cut], spec)
  t = np.arange(pos + 1)
  vis = np.ones(pos + 1, bool) if left is None else (pos - t <= left) | (t < sink)
  qg = np.asarray(q, np.float64).reshape(b, g, -1, d)
  s = np.where(vis, np.einsum("bgrk,bsgk->bgrs", qg, k) / np.sqrt(d), -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bgrs,bsgk->bgrk", p, v).reshape(q.shape)


@pytest.mark.parametrize("case", [  # (bits, group, head_dim, window, sinks, pos, splits[, R])
    (4, 16, 64, 20, 40, 99, 3),      # sinks over three groups, below a window
    (4, 16, 64, 20, 40, 99, 3, 32),  # ... with 32 more tokens at full precision
    (2, 16, 64, None, 0, 40, 2, 48), # a ring not yet full: nothing quantized
    (2, 16, 64, 33, 50, 100, 8),     # sinks reaching into the window; more splits than groups
    (2, 32, 128, 0, 17, 70, 2),      # a window of the query alone, plus sinks
    (8, 16, 64, None, 0, 16, 1),     # the first step of the second group
    (4, 16, 64, 5, 3, 0, 2)])        # position 0: the residual alone
def test_decode_kernel_and_reference_match_a_float64_oracle(case):
  bits, group, d, left, sink, pos, splits = case[:7]
  spec = KVQuant(bits, group, residual=case[7] if len(case) > 7 else 0)
  k, v = (jax.random.normal(key, (2, pos + 1, 2, d), jnp.float32)
          for key in jax.random.split(jax.random.key(pos + 7)))
  k = k.at[..., 3].multiply(8.0)
  cache = kv_quant.init_quant_cache(spec, 2, 103, 2, d, jnp.float32)   # 103: not whole groups
  if pos:
    cache = cache.append(k[:, :pos], v[:, :pos], 0, 0)
  cache = cache.step(k[:, pos:], v[:, pos:], jnp.int32(pos))
  q = jax.random.normal(jax.random.key(pos), (2, 4, d), jnp.float32)
  mask = Mask(causal=True, window_left=left, n_sink=sink)
  want = _oracle_decode(q, k, v, pos, spec, left, sink)
  for impl, kw in (("reference", {}), ("pallas_gpu", {"interpret": True, "splits": splits})):
    got = kv_quant.decode_attention(q, cache, jnp.int32(pos), mask=mask, implementation=impl,
                                    **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=impl)


def test_decode_kernel_refuses_what_it_cannot_serve():
  cache = _filled_cache(KVQuant(4, 8), 1, 32, 1, 64, 20, jnp.float32)
  q = jnp.ones((1, 2, 64))
  with pytest.raises(NotImplementedError, match="power-of-two key group >= 16"):
    kv_quant.decode_attention(q, cache, jnp.int32(20), mask=Mask(causal=True),
                              implementation="pallas_gpu", interpret=True)
  cache = _filled_cache(KVQuant(4, 16), 1, 32, 1, 64, 20, jnp.float32)
  with pytest.raises(NotImplementedError, match="per-head"):
    kv_quant.decode_attention(q, cache, jnp.int32(20),
                              mask=Mask(causal=True, window_left=(4, 8)),
                              implementation="pallas_gpu", interpret=True)
  with pytest.raises(ValueError, match=r"q must be \[B, H, K\]"):
    kv_quant.decode_attention(jnp.ones((1, 2, 32)), cache, jnp.int32(20),
                              mask=Mask(causal=True))
  with pytest.raises(ValueError, match="outside the cache"):
    kv_quant.decode_attention(q, cache, jnp.int32(32), mask=Mask(causal=True))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_backend(), reason="needs an NVIDIA GPU backend")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_kernel_compiled_matches_the_reference(bits):
  """The compiled kernel at the shape the benchmark times (head_dim 128, groups of 32, GQA 4)."""
  spec = KVQuant(bits, 32)
  pos = 1000
  cache = _filled_cache(spec, 2, 1024, 4, 128, pos, jnp.bfloat16)
  q = jax.random.normal(jax.random.key(3), (2, 16, 128), jnp.bfloat16)
  for mask in (Mask(causal=True), Mask(causal=True, window_left=300, n_sink=4)):
    want = kv_quant.decode_attention(q, cache, jnp.int32(pos), mask=mask,
                                     implementation="reference")
    got = jax.jit(lambda q, c, p, m=mask: kv_quant.decode_attention(
        q, c, p, mask=m, implementation="pallas_gpu"))(q, cache, jnp.int32(pos))
    _testing.assert_allclose(got, want, name=f"{bits} bits, {mask}")
