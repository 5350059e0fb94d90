"""Speculative decoding: lossless against plain decoding (greedy tokens equal, sampled tokens
distributed as the target's), and the extend/rewind it rests on."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from memx.kernels import _testing
from memx.models import speculative
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig, matmulfree_config
from memx.models.decode import generate
from memx.models.speculative import speculative_generate
from memx.models.transformer import TransformerLM

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                   attn_window=5, attn_sinks=1, tie_embeddings=False,
                   ssm=SSMConfig(d_state=16, head_dim=16, chunk_size=16, gated=True))
HYBRID = dataclasses.replace(BASE, mixers=("mamba2", "attention", "linear_attention"))
MLGRU = matmulfree_config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                          tie_embeddings=False, ssm=SSMConfig(chunk_size=16))
# A plan layer's ring cache cannot be rewound: speculative decoding gives it a dense one.
PLAN = dataclasses.replace(BASE, attn_window=None, attn_sinks=0,
                           attn_plan=(None, ((3.0, 0.0, 1), (1.0, 0.1, 0), (0.0, 1.0, 0),
                                             (2.0, 0.0, 2)), None))
SMALL = dataclasses.replace(BASE, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1)


def _tokens(b, t, seed, vocab=64):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


@pytest.mark.parametrize("cfg", [BASE, HYBRID, MLGRU], ids=["attention", "hybrid", "mlgru"])
def test_extend_equals_forward_and_rewinds_to_any_token(cfg):
  """extend(C tokens) from a prefilled cache gives the forward's logits at those positions;
  rewound to any keep ≤ C, feeding the sequence on from there gives them again (recurrent
  layers take their state after token keep; attention caches hold stale keys past it)."""
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(2, 16, seed=1)
  full = jit_for_test(lambda m, t: m(t))(model, tokens)
  _, cache = jit_for_test(lambda m, t: m.prefill(t, 16, full_cache=True))(model, tokens[:, :6])
  extend = jit_for_test(lambda m, t, c: m.extend(t, c))
  # Feed 4 tokens that differ from the sequence from their second on: what a rejected draft
  # leaves in the cache.
  wrong = tokens[:, 6:10].at[:, 1:].set((tokens[:, 7:10] + 1) % 64)
  logits, after, states = extend(model, wrong, cache)
  _testing.assert_allclose(logits[:, 0], full[:, 6], name="extend, first token")
  assert int(after["pos"]) == 10
  for keep in (1, 2, 4):
    rewound = jit_for_test(lambda m, c, s, k=keep: m.rewind(c, s, jnp.int32(k), jnp.int32(6)))(
        model, after, states)
    assert int(rewound["pos"]) == 6 + keep
    fed = jnp.concatenate([wrong[:, :keep], tokens[:, 6 + keep:]], axis=1)
    more, _, _ = extend(model, fed[:, keep:keep + 5], rewound)
    if keep == 1:
      _testing.assert_allclose(more, full[:, 7:12], name=f"rewound to {keep}")
    else:  # the kept wrong tokens are part of the sequence now: compare with its forward
      seq = jnp.concatenate([tokens[:, :6], fed], axis=1)[:, :6 + keep + 5]
      want = jit_for_test(lambda m, t: m(t))(model, seq)
      _testing.assert_allclose(more, want[:, 6 + keep:], name=f"rewound to {keep}")


CASES = {  # target, draft, draft_len
    "attention, smaller draft": (BASE, SMALL, 3),
    "attention, hybrid draft": (BASE, HYBRID, 4),
    "hybrid, attention draft": (HYBRID, BASE, 2),
    "mlgru, mlgru draft": (MLGRU, dataclasses.replace(MLGRU, n_layers=1, mixers=("mlgru",)), 3),
    "plan, k = 1": (PLAN, SMALL, 1),
}


@pytest.mark.parametrize("case", tuple(CASES))
def test_greedy_output_equals_generate(case):
  target_cfg, draft_cfg, k = CASES[case]
  target = TransformerLM(target_cfg, rngs=nnx.Rngs(0))
  draft = TransformerLM(draft_cfg, rngs=nnx.Rngs(1))
  prompt = _tokens(2, 7, seed=2)
  new, max_len = 14, 7 + 14 + k
  want = generate(target, prompt, new, max_len=max_len)
  got, stats = speculative_generate(target, draft, prompt, new, draft_len=k, max_len=max_len)
  np.testing.assert_array_equal(got, want)
  assert stats.new_tokens == new and stats.drafted == stats.rounds * k
  if case == "hybrid, attention draft":  # a prompt prefilled in chunks: the same tokens
    chunked, _ = speculative_generate(target, draft, prompt, new, draft_len=k, max_len=max_len,
                                      prefill_chunk=3)
    np.testing.assert_array_equal(chunked, want)
  # Every round emits accepted + 1 tokens: together the new tokens after the prompt's first.
  assert stats.accepted + stats.rounds >= new - 1
  assert stats.accepted + stats.rounds <= new - 1 + k


def test_draft_equal_to_target_is_always_accepted():
  target = TransformerLM(HYBRID, rngs=nnx.Rngs(0))
  prompt = _tokens(1, 5, seed=3)
  got, stats = speculative_generate(target, target, prompt, 13, draft_len=3)
  np.testing.assert_array_equal(got, generate(target, prompt, 13, max_len=5 + 13 + 2))
  assert stats.rounds == 3 and stats.accepted == 9 and stats.acceptance == 1.0
  assert stats.tokens_per_round == 4.0


def test_greedy_rounds_use_partial_acceptance():
  """The cases above must exercise acceptance that stops inside a round: a draft that agrees
  sometimes (the target with its weights perturbed) keeps some drafted tokens and not all."""
  target = TransformerLM(BASE, rngs=nnx.Rngs(0))
  draft = TransformerLM(BASE, rngs=nnx.Rngs(0))
  state = nnx.state(draft, nnx.Param)
  noise = jax.tree.map(lambda x: 0.6 * jnp.std(x) * jax.random.normal(jax.random.key(9), x.shape,
                                                                     x.dtype), state)
  nnx.update(draft, jax.tree.map(jnp.add, state, noise))
  prompt = _tokens(1, 6, seed=4)
  got, stats = speculative_generate(target, draft, prompt, 24, draft_len=4)
  np.testing.assert_array_equal(got, generate(target, prompt, 24, max_len=6 + 24 + 3))
  assert 0 < stats.accepted < stats.drafted, stats


def _sample_many(target, draft, prompt, new, k, temperature, n, seed):
  """n independent single-row runs (vmapped: each row's loop advances on its own)."""
  tg, ts = nnx.split(target)
  dg, ds = nnx.split(draft)
  run = jax.jit(jax.vmap(lambda key: speculative._speculative(
      tg, ts, dg, ds, prompt, key, max_new_tokens=new, k=k, temperature=temperature,
      max_len=prompt.shape[1] + new + k)))
  out, rounds, accepted = run(jax.random.split(jax.random.key(seed), n))
  return np.asarray(out[:, :, prompt.shape[1]:]), np.asarray(rounds), np.asarray(accepted)


def _exact_joint(model, prompt, new, vocab, temperature):
  """The target's exact probability of every continuation of `new` tokens [vocab ** new]."""
  conts = np.stack(np.meshgrid(*[np.arange(vocab)] * new, indexing="ij"), -1).reshape(-1, new)
  seqs = jnp.concatenate([jnp.broadcast_to(prompt, (len(conts), prompt.shape[1])),
                          jnp.asarray(conts, jnp.int32)], axis=1)
  logits = model(seqs)[:, prompt.shape[1] - 1:-1] / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.asarray(conts)[..., None], axis=-1)[..., 0]
  return np.exp(np.asarray(jnp.sum(picked, axis=1), np.float64)), conts


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_tokens_follow_the_target_distribution(temperature):
  """20k three-token continuations against the target's exact joint distribution (512 cells,
  chi-square). The same samples are far from the draft's distribution, so the test can tell
  the two apart; drafts are accepted at some positions and not at others."""
  vocab, new, k = 8, 3, 2
  cfg = dataclasses.replace(SMALL, vocab_size=vocab, n_layers=2, d_model=32, n_heads=4,
                            n_kv_heads=2)
  target = TransformerLM(cfg, rngs=nnx.Rngs(0))
  draft = TransformerLM(dataclasses.replace(cfg, n_layers=1), rngs=nnx.Rngs(7))
  prompt = _tokens(1, 4, seed=5, vocab=vocab)
  samples, rounds, accepted = _sample_many(target, draft, prompt, new, k, temperature,
                                           n=20000, seed=11)
  assert 0 < accepted.sum() < rounds.sum() * k
  samples = samples[:, 0]
  assert _pvalue(samples, _exact_joint(target, prompt, new, vocab, temperature)[0]) > 1e-3
  assert _pvalue(samples, _exact_joint(draft, prompt, new, vocab, temperature)[0]) < 1e-12


def _pvalue(samples, p):
  """Chi-square p-value of continuations [n, new] against probabilities p [vocab ** new]
  (cells expected to hold < 5 samples pooled, as the approximation needs)."""
  vocab = round(len(p) ** (1 / samples.shape[1]))
  cells = (samples * vocab ** np.arange(samples.shape[1])[::-1]).sum(1)
  counts = np.bincount(cells, minlength=len(p))
  small = p * len(samples) < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(p[~small], p[small].sum()) * len(samples)
  return scipy.stats.chisquare(obs, exp / exp.sum() * obs.sum()).pvalue


def test_rows_of_a_batch_each_follow_their_target_distribution():
  """Three different prompts in one batch keep the batch's fewest accepted tokens per round;
  each row's continuations still follow the target's distribution for its own prompt (here
  with a Mamba-2 draft, k = 3, 6000 runs)."""
  vocab, new, k = 8, 3, 3
  cfg = dataclasses.replace(SMALL, vocab_size=vocab, n_layers=2, d_model=32, n_heads=4,
                            n_kv_heads=2)
  target = TransformerLM(cfg, rngs=nnx.Rngs(0))
  draft = TransformerLM(dataclasses.replace(cfg, n_layers=1, mixers=("mamba2",), mlp=False),
                        rngs=nnx.Rngs(3))
  prompts = _tokens(3, 4, seed=6, vocab=vocab)
  samples, rounds, accepted = _sample_many(target, draft, prompts, new, k, 1.0, n=6000,
                                           seed=12)
  assert 0 < accepted.sum() < rounds.sum() * k
  for row in range(3):
    exact = _exact_joint(target, prompts[row:row + 1], new, vocab, 1.0)[0]
    assert _pvalue(samples[:, row], exact) > 1e-3, row


def test_acceptance_rule_reproduces_the_target_distribution_exactly():
  """One position: d ~ q, kept with probability min(1, p(d)/q(d)), else a sample of
  norm(max(0, p - q)). Its distribution is p, for any q (including q = p and q with zeros)."""
  vocab, n = 6, 200_000
  p = np.asarray([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
  p_logits = jnp.log(jnp.asarray(p, jnp.float32))
  for q in ([0.05, 0.05, 0.1, 0.1, 0.3, 0.4], [0.4, 0.3, 0.1, 0.1, 0.05, 0.05],
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]):
    q_logits = jnp.log(jnp.asarray(q))
    d = jax.random.categorical(jax.random.key(0), q_logits, shape=(n, 1)).astype(jnp.int32)
    ok, fix = speculative._judge(jnp.broadcast_to(p_logits, (n, 2, vocab)),
                                 jnp.broadcast_to(q_logits, (n, 1, vocab)), d,
                                 jax.random.key(1), 1.0)
    out = np.where(ok[:, 0], d[:, 0], fix[:, 0])
    counts = np.bincount(out, minlength=vocab)
    assert scipy.stats.chisquare(counts, p * n).pvalue > 1e-3, q
    # The bonus position samples p itself.
    counts = np.bincount(np.asarray(fix[:, 1]), minlength=vocab)
    assert scipy.stats.chisquare(counts, p * n).pvalue > 1e-3


def test_bad_inputs_are_refused_before_compiling():
  target = TransformerLM(BASE, rngs=nnx.Rngs(0))
  prompt = _tokens(1, 4, seed=0)
  other_vocab = TransformerLM(dataclasses.replace(SMALL, vocab_size=32), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vocabulary"):
    speculative_generate(target, other_vocab, prompt, 4)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="draft_len"):
      speculative_generate(target, target, prompt, 4, draft_len=bad)
  with pytest.raises(ValueError, match="max_len must be >= prompt 4 \\+ new tokens 4 \\+ "
                                       "draft_len 4 - 1 = 11"):
    speculative_generate(target, target, prompt, 4, max_len=10)
  with pytest.raises(ValueError, match="rng"):
    speculative_generate(target, target, prompt, 4, temperature=1.0)
  with pytest.raises(ValueError, match="token ids"):
    speculative_generate(target, target, prompt + 64, 4)
  with pytest.raises(ValueError, match="TransformerLM"):
    speculative_generate(target, object(), prompt, 4)


def test_extend_refuses_caches_it_cannot_rewind():
  from memx.kernels.kv_quant import KVQuant
  model = TransformerLM(BASE, rngs=nnx.Rngs(0))
  _, cache = model.prefill(_tokens(1, 4, seed=0), 16, kv_quant=KVQuant(bits=4, group=4,
                                                                         residual=4))
  with pytest.raises(ValueError, match="dense KV caches"):
    model.extend(_tokens(1, 2, seed=1), cache)
  _, cache = model.prefill(_tokens(1, 4, seed=0), 8, full_cache=True)
  with pytest.raises(ValueError, match="do not fit the cache's max_len 8"):
    model.extend(_tokens(1, 5, seed=1), cache)
