"""Block diffusion (BD3-LM): the block layout and the attention mask against brute-force definitions; the one
vectorized pass over x_t and x_0 against a per-block computation; L' = L against the MD4 loss and L' = 1 at t = 1
against the next-token NLL of a causal pass, with the same parameters and the same draws."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax import blocks, losses
from d3pm_jax.config import from_config
from d3pm_jax.models.transformer import Transformer, attention
from d3pm_jax.training import state
from pallas_kernels import attention as kernels

from test_oracle import markov_block_oracle
from test_train import load_config

LAYOUTS = [(8, 1), (8, 2), (8, 8), (12, 4), (12, 3)]  # (L, L')


def _segments(seed, batch, length):
  """Rows of two or three documents and some padding, and one stream-like row (a single document)."""
  rng = np.random.default_rng(seed)
  out = np.zeros((batch, length), np.int32)
  out[0] = 1
  for b in range(1, batch):
    cuts = np.sort(rng.choice(np.arange(1, length - 1), 2, replace=False))
    out[b, :cuts[0]], out[b, cuts[0]:cuts[1]] = 1, 2
    out[b, cuts[1]:length - b % 2] = 3
  return out


def _brute_block_ids(segments, block_size):
  """Per row: walk left to right, open a new block at a document's first token or after block_size tokens."""
  ids = np.zeros_like(segments)
  for b, row in enumerate(segments):
    block, offset = -1, 0
    for n, s in enumerate(row):
      offset = 0 if n == 0 or s != row[n - 1] else offset + 1
      if offset % block_size == 0:
        block += 1
      ids[b, n] = block
  return ids


@pytest.mark.parametrize("length,block_size", LAYOUTS)
def test_block_ids_follow_their_definition(length, block_size):
  segments = _segments(length * 10 + block_size, 4, length)
  np.testing.assert_array_equal(blocks.block_ids(4, length, block_size, jnp.asarray(segments)),
                                _brute_block_ids(segments, block_size))
  stream = np.asarray(blocks.block_ids(2, length, block_size))
  np.testing.assert_array_equal(stream, _brute_block_ids(np.ones((2, length), np.int32), block_size))
  assert stream.max() + 1 == length // block_size == blocks.num_slots(length, block_size, False)


def _brute_mask(segments, ids):
  """The BD3-LM mask over x_t (n < L) then x_0 (n >= L), one pair of positions at a time."""
  batch, length = segments.shape
  out = np.zeros((batch, 2 * length, 2 * length), bool)
  for b in range(batch):
    for i in range(2 * length):
      for j in range(2 * length):
        qi, kj = i % length, j % length
        if segments[b, qi] != segments[b, kj] or segments[b, kj] == 0:
          continue
        q_block, k_block = ids[b, qi], ids[b, kj]
        if i < length and j < length:      # x_t sees x_t of its own block
          out[b, i, j] = q_block == k_block
        elif i < length:                   # x_t sees x_0 of the earlier blocks
          out[b, i, j] = k_block < q_block
        elif j >= length:                  # x_0 sees x_0 of its block and the earlier ones
          out[b, i, j] = k_block <= q_block
  return out


@pytest.mark.parametrize("length,block_size", LAYOUTS)
@pytest.mark.parametrize("packed", [False, True])
def test_the_mask_equals_its_definition(length, block_size, packed):
  segments = _segments(length + block_size, 3, length) if packed else np.ones((3, length), np.int32)
  ids = _brute_block_ids(segments, block_size)
  got = kernels.visible(jnp.tile(jnp.asarray(segments), (1, 2)) if packed else None, 2 * length, 3, False,
                        jnp.tile(jnp.asarray(ids), (1, 2)))
  np.testing.assert_array_equal(np.asarray(got), _brute_mask(segments, ids))


@pytest.mark.parametrize("packed", [False, True])
def test_xla_attention_under_the_mask_equals_the_reference(packed):
  """The model's attention (the XLA implementation) under the block-diffusion mask equals the float32 reference's
  softmax over the visible keys, outputs and gradients."""
  length, block_size, batch = 12, 4, 3
  segments = _segments(5, batch, length) if packed else np.ones((batch, length), np.int32)
  seg2 = jnp.tile(jnp.asarray(segments), (1, 2))
  ids2 = jnp.tile(blocks.block_ids(batch, length, block_size, jnp.asarray(segments) if packed else None), (1, 2))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, 2 * length, 2, 8)), jnp.float32) for _ in range(3))
  mask = kernels.visible(seg2, 2 * length, batch, False, ids2)[:, None]
  want, want_vjp = jax.vjp(lambda *a: kernels.attention_reference(*a, seg2, False, ids2), q, k, v)
  got, got_vjp = jax.vjp(lambda *a: attention(*a, False, mask), q, k, v)
  cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  for a, b in [(got, want)] + list(zip(got_vjp(cotangent), want_vjp(cotangent))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def _model(arg=None, scan_layers=False, **process):
  """The tests' tiny model, bidirectional and without time conditioning (BD3-LM's), over 12 byte positions."""
  cfg = load_config("test", arg)
  cfg.model.update(time_conditioning=False, scan_layers=scan_layers)
  cfg.data.seq_len = 12
  cfg.process.update(**process)
  exp = from_config(cfg, vocab_size=256)
  model = Transformer(exp.model)
  params = state.init_state(exp, model, state.make_optimizer(exp.train)).params
  # A few steps' worth of movement away from the init, so no two positions' logits coincide by symmetry.
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape),
                                  params)
  return exp, model, params


def _tokens(seed, batch, length, mask_rate, mask_id):
  rng = np.random.default_rng(seed)
  x0 = rng.integers(0, 256, (batch, length)).astype(np.int32)
  x_t = np.where(rng.random((batch, length)) < mask_rate, mask_id, x0).astype(np.int32)
  return jnp.asarray(x0), jnp.asarray(x_t)


@pytest.mark.parametrize("block_size", [1, 3, 4, 12])
def test_the_vectorized_pass_equals_a_per_block_computation(block_size):
  """For each block b, the network run on [x_0 of the blocks before b, x_t of block b] alone, with attention
  causal by block (a mask built here from that definition: a query sees the keys of its block and earlier ones),
  gives block b's logits of the one 2L pass. (Each such row is padded to L with x_0's later blocks, which causal
  attention keeps out of block b, so all of them run as one batch.)"""
  exp, model, params = _model()
  length, batch = 12, 2
  num_blocks = length // block_size
  x0, x_t = _tokens(block_size, batch, length, 0.5, 256)
  ids = blocks.block_ids(batch, length, block_size)
  vectorized = jax.jit(model.apply)({"params": params}, x_t, clean_BxL=x0, blocks_BxL=ids)
  block_of = np.arange(length) // block_size
  rows = jnp.concatenate([jnp.where(block_of == b, x_t, x0) for b in range(num_blocks)])  # [num_blocks * B, L]
  causal_by_block = jnp.asarray(block_of[:, None] >= block_of[None, :])[None].repeat(rows.shape[0], 0)
  alone = jax.jit(model.apply)({"params": params}, rows, mask_BxLxL=causal_by_block)
  for b in range(num_blocks):
    span = slice(b * block_size, (b + 1) * block_size)
    np.testing.assert_allclose(np.asarray(vectorized[:, span]), np.asarray(alone[b * batch:(b + 1) * batch, span]),
                               rtol=0, atol=2e-5)


def test_block_size_l_is_the_md4_loss_for_the_same_draws():
  """One block of the whole row: block_elbo's terms equal continuous_elbo(kind='masked')'s for the same key
  (same times, same masks, the x_0 half invisible to x_t), training form and evaluation form."""
  exp, model, params = _model()
  process = state.build_process(exp.process, exp.model)
  x0, _ = _tokens(3, 6, 12, 0.0, 256)

  apply = jax.jit(model.apply)

  def md4_logits(x_t, t_B):
    return apply({"params": params}, x_t)

  def block_logits(x_t, clean, ids):
    return apply({"params": params}, x_t, clean_BxL=clean, blocks_BxL=ids)

  for key in jax.random.split(jax.random.PRNGKey(4), 3):
    for recon in (False, True):
      want = losses.continuous_elbo(process, md4_logits, key, x0, kind="masked", with_recon=recon)
      got = losses.block_elbo(process, block_logits, key, x0, 12, with_recon=recon)
      assert set(got) == set(want)
      for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=2e-6, err_msg=name)
      assert float(jnp.min(want["diffusion"])) > 0


@pytest.mark.parametrize("packed", [False, True])
def test_one_block_per_row_runs_the_x_t_pass_alone_with_the_same_logits(packed):
  """block_size >= L (MD4 as block diffusion): the model skips the x_0 half, which no x_t query sees, and its
  logits equal those of the full 2L pass under the block-diffusion mask (block_size=0 runs it), also in packed
  rows where each document is its own block; the compiled pass does about half the 2L pass's FLOPs."""
  exp, model, params = _model()
  batch, length = 2, 12
  segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32) if packed else None
  x0, x_t = _tokens(5, batch, length, 0.5, 256)
  ids = blocks.block_ids(batch, length, length, segments)
  run = {size: jax.jit(lambda x_t, x0, size=size: model.apply({"params": params}, x_t, clean_BxL=x0, blocks_BxL=ids,
                                                              segments_BxL=segments, block_size=size))
         for size in (0, length)}
  np.testing.assert_allclose(np.asarray(run[length](x_t, x0)), np.asarray(run[0](x_t, x0)), rtol=0, atol=2e-5)
  flops = {size: fn.lower(x_t, x0).compile().cost_analysis()["flops"] for size, fn in run.items()}
  assert flops[length] < 0.6 * flops[0], flops


def test_block_size_one_at_t_one_is_the_next_token_nll_of_a_causal_pass():
  """L' = 1, every block at t = 1 (all of x_t masked): the loss divided by the weight -alpha'(1)/(1 - alpha(1))
  is sum_n -log p(x_0^n | x_0^{<n}), where p is read from the same parameters run as the causal (AR) network on
  [x_0^{<n}, mask] at its last position, one prefix at a time."""
  exp, model, params = _model()
  process = state.build_process(exp.process, exp.model)
  causal = Transformer(dataclasses.replace(exp.model, causal=True))
  batch, length, mask = 3, 12, process.mask_id
  x0, _ = _tokens(9, batch, length, 0.0, mask)
  ids = blocks.block_ids(batch, length, 1)
  t = jnp.ones((batch, length))
  key = jax.random.PRNGKey(1)
  assert bool(jnp.all(process.sample_marginal(key, x0, t) == mask))  # alpha(1) = eps: this key masks everything
  apply = jax.jit(model.apply)
  loss = losses.block_masked_diffusion(
      process, lambda x_t, clean, i: apply({"params": params}, x_t, clean_BxL=clean, blocks_BxL=i), key, x0, t, ids)
  weight = -process.schedule.dalpha_dt(t[0, 0]) / (1.0 - process.schedule.alpha(t[0, 0]))
  # Row (n, b): x_0^{<n}, then the mask at position n, then anything (causal attention keeps it out of n).
  prefixes = jnp.concatenate([jnp.where(jnp.arange(length) == n, mask, x0) for n in range(length)])
  logits = jax.jit(causal.apply)({"params": params}, prefixes).reshape(length, batch, length, -1)
  logits_BxLxV = jnp.stack([logits[n, :, n] for n in range(length)], axis=1)
  log_p = jax.nn.log_softmax(logits_BxLxV.at[..., mask].set(-jnp.inf))
  nll = -np.asarray(jnp.take_along_axis(log_p, x0[..., None], axis=-1)[..., 0]).sum(axis=1)
  np.testing.assert_allclose(np.asarray(loss) / float(weight), nll, rtol=2e-6)


def test_packed_rows_keep_documents_apart():
  """In a packed row the blocks restart at each document, and a document's logits under block diffusion equal
  those of the document run alone (rotary scores depend only on offsets, so its place in the row does not
  matter): nothing crosses a document boundary."""
  exp, model, params = _model()
  process = state.build_process(exp.process, exp.model)
  segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)
  x0, x_t = _tokens(2, 2, 12, 0.5, process.mask_id)
  ids = blocks.block_ids(2, 12, 4, segments)
  apply = jax.jit(model.apply)
  packed = apply({"params": params}, x_t, clean_BxL=x0, blocks_BxL=ids, segments_BxL=segments)
  for row, start, end in [(0, 0, 5), (0, 5, 12), (1, 0, 9)]:
    alone_ids = jnp.asarray(np.arange(end - start) // 4)[None]
    alone = apply({"params": params}, x_t[row:row + 1, start:end], clean_BxL=x0[row:row + 1, start:end],
                        blocks_BxL=alone_ids)
    np.testing.assert_allclose(np.asarray(packed[row, start:end]), np.asarray(alone[0]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("process,model,match", [
    ({"block_size": 5}, {}, r"process.block_size=5 must divide data.seq_len=12; valid: \[1, 2, 3, 4, 6, 12\]"),
    ({"block_size": 4}, {"time_conditioning": True}, "set model.time_conditioning=False"),
    ({"block_size": 4, "name": "uniform", "loss": "ctmc"}, {}, "belong to masked diffusion"),
    ({"clip_low": 0.5, "clip_high": 0.4}, {}, r"0 <= process.clip_low < process.clip_high <= 1; got \(0.5, 0.4\)"),
    ({"block_size": -1}, {}, "process.block_size must be >= 0"),
])
def test_bad_block_settings_name_the_value_and_the_valid_choices(process, model, match):
  cfg = load_config("test")
  cfg.model.time_conditioning = False
  cfg.data.seq_len = 12
  cfg.process.update(**process)
  cfg.model.update(**model)
  with pytest.raises(ValueError, match=match):
    from_config(cfg, vocab_size=256)


def test_the_clipped_window_trains_inside_it_and_evaluation_integrates_over_all_of_it():
  """Times drawn on the window (0.3, 0.8) lie in it and are the unit draws mapped onto it; the training loss uses
  them, while evaluation's (evaluate=True) ignores the window: it equals the unclipped run's."""
  u = losses.block_times(jax.random.PRNGKey(0), 4, 3)
  t = losses.block_times(jax.random.PRNGKey(0), 4, 3, window=(0.3, 0.8))
  np.testing.assert_allclose(np.asarray(t), 0.3 + 0.5 * np.asarray(u), rtol=1e-6)
  assert float(u.min()) >= 0 and float(u.max()) < 1 and np.ptp(np.asarray(u)) > 0.8
  runs = {}
  for window in ((0.0, 1.0), (0.3, 0.8)):
    exp, model, params = _model(block_size=4, clip_low=window[0], clip_high=window[1])
    process = state.build_process(exp.process, exp.model)
    x0, _ = _tokens(1, 4, 12, 0.0, 256)
    terms = jax.jit(lambda p, x, e: state.loss_terms(exp, model, process, p, jax.random.PRNGKey(2), x, evaluate=e),
                    static_argnums=2)
    runs[window] = [terms(params, x0, e) for e in (False, True)]
  (train_full, eval_full), (train_clipped, eval_clipped) = runs[(0.0, 1.0)], runs[(0.3, 0.8)]
  np.testing.assert_array_equal(np.asarray(eval_full["nelbo"]), np.asarray(eval_clipped["nelbo"]))
  assert not np.allclose(np.asarray(train_full["loss"]), np.asarray(train_clipped["loss"]), rtol=1e-3)


@pytest.mark.parametrize("strategy,scan_layers", [("ancestral", False), ("confidence", False), ("ancestral", True)])
def test_cached_sampling_draws_the_same_tokens_as_uncached(strategy, scan_layers):
  """The KV-cached block sampler and the one that recomputes the whole prefix at every step draw the same tokens
  for the same key, with a prompt of one whole block and half of the next (layers looped or scanned)."""
  from d3pm_jax.models import block_decoding
  from d3pm_jax.sampling import SamplerConfig, block_sample
  exp, model, params = _model(block_size=4, scan_layers=scan_layers)
  process = state.build_process(exp.process, exp.model)
  batch, length, block_size = 3, 12, 4
  cfg = SamplerConfig(num_steps=5, strategy=strategy)
  given = jnp.zeros((batch, length), bool).at[:, :6].set(True)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, length)), jnp.int32)
  runs = {}
  for name in ("cached", "uncached"):
    if name == "cached":
      fns = block_decoding.cached(model, params, batch, block_size, block_decoding.window_for(model, length, 4))
    else:
      fns = block_decoding.uncached(model, params, batch, length, block_size, process.mask_id)
    runs[name] = np.asarray(jax.jit(lambda key: block_sample(process, *fns, key, batch, length, block_size, cfg,
                                                               given, prompt))(jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(runs["cached"], runs["uncached"])
  assert (runs["cached"][:, :6] == np.asarray(prompt)[:, :6]).all()
  assert (runs["cached"] < 256).all() and len(np.unique(runs["cached"][:, 6:])) > 4


def test_skipping_unchanged_blocks_draws_the_same_tokens_with_fewer_calls():
  """The block denoiser never sees t, so reusing the last prediction while a block is unchanged
  (``skip_unchanged``, which ``state.block_sample`` turns on) is exact: with 16 steps for blocks of 4 the tokens
  equal those of the sampler that calls the network at every step, for the same key and a prompt, and the network
  is called on fewer steps (16 a block without the skip)."""
  from d3pm_jax.models import block_decoding
  from d3pm_jax.sampling import SamplerConfig, block_sample
  exp, model, params = _model(block_size=4)
  process = state.build_process(exp.process, exp.model)
  batch, length, block_size = 2, 12, 4
  given = jnp.zeros((batch, length), bool).at[:, :6].set(True)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, length)), jnp.int32)
  denoise, commit, cache = block_decoding.cached(model, params, batch, block_size,
                                                 block_decoding.window_for(model, length, 4))
  calls = []

  def counted(state_, x_t, b):
    jax.debug.callback(lambda: calls.append(1))
    return denoise(state_, x_t, b)

  runs = {}
  for skip in (False, True):
    calls.clear()
    cfg = SamplerConfig(num_steps=16, skip_unchanged=skip)
    runs[skip] = np.asarray(jax.jit(lambda key: block_sample(process, counted, commit, cache, key, batch, length,
                                                             block_size, cfg, given, prompt))(jax.random.PRNGKey(3)))
    runs[skip, "calls"] = len(calls)
  np.testing.assert_array_equal(runs[True], runs[False])
  assert runs[False, "calls"] == 3 * 16 and runs[True, "calls"] < 3 * 16, runs
  # Turning the skip on must not hide why an approximate cache is refused (it once named skip_unchanged instead).
  with pytest.raises(ValueError, match="block diffusion samples with its own exact KV cache"):
    state.block_sample(exp, model, params, process, jax.random.PRNGKey(0), batch, length,
                       SamplerConfig(cache="dual"))


@pytest.mark.usefixtures("x64")
def test_the_block_sampler_with_the_exact_denoiser_draws_the_data_distribution():
  """Enumerable toy: 3 tokens + mask, L = 4, blocks of L' = 2, a random joint over the 81 sequences. The exact
  block denoiser p(x_0^n | x_t of the block, x_0 of the blocks before) is enumerated, and with 100 steps per block
  (one position unmasks at a time, almost always) the sampler's 4000 draws fit the joint (chi-square p > 1e-4) and
  reject the product of the two blocks' marginals (p < 1e-6): a sampler that lost the clean prefix fails."""
  from d3pm_jax import get_schedule, make_process
  from d3pm_jax.sampling import SamplerConfig, block_sample
  from test_sampler_knobs import chi_square_pvalue
  k, length, block_size, num = 3, 4, 2, 4000
  process = make_process("absorbing", k + 1, get_schedule("linear"))
  seqs = np.array(np.meshgrid(*[np.arange(k)] * length, indexing="ij")).reshape(length, -1).T  # [81, 4]
  joint = np.random.default_rng(0).dirichlet(np.full(len(seqs), 0.3))
  seqs_j, joint_j = jnp.asarray(seqs), jnp.asarray(joint)

  def denoise(prefix_BxL, x_t_BxLb, b):
    before = jnp.arange(length) < b * block_size
    match = jnp.all((seqs_j[None] == prefix_BxL[:, None]) | ~before, axis=-1)              # [B, 81]
    block = jax.lax.dynamic_slice_in_dim(seqs_j, b * block_size, block_size, axis=1)      # [81, L']
    fits = jnp.all((x_t_BxLb[:, None] == process.mask_id) | (x_t_BxLb[:, None] == block[None]), axis=-1)
    weight = joint_j[None] * match * fits
    marginal = jnp.einsum("bs,snk->bnk", weight, jax.nn.one_hot(block, k, dtype=weight.dtype))
    marginal = marginal / jnp.sum(marginal, axis=-1, keepdims=True)
    return jnp.log(jnp.concatenate([marginal, jnp.zeros(marginal.shape[:-1] + (1,))], axis=-1))

  def commit(prefix_BxL, x_BxLb, b):
    return jax.lax.dynamic_update_slice(prefix_BxL, x_BxLb, (0, b * block_size))

  cfg = SamplerConfig(num_steps=100, precision="float64")
  draws = jax.jit(lambda key: block_sample(process, denoise, commit, jnp.zeros((num, length), jnp.int32), key, num,
                                           length, block_size, cfg))(jax.random.PRNGKey(0))
  index = np.ravel_multi_index(np.asarray(draws).T, (k,) * length)
  counts = np.bincount(index, minlength=len(seqs)).astype(float)
  assert chi_square_pvalue(counts, joint) > 1e-4
  by_block = joint.reshape(k ** block_size, k ** block_size)
  independent = np.outer(by_block.sum(1), by_block.sum(0)).ravel()
  assert chi_square_pvalue(counts, independent) < 1e-6


KERNEL_CASES = [(12, 4, False), (21, 3, True), (16, 1, True), (24, 8, False), (9, 9, True)]  # (N, L', packed)


def _qkv_blocks(n, block_size, packed, dtype=jnp.float32, seed=0):
  batch = 2
  segments = _segments(seed + n, batch, n) if packed else np.ones((batch, n), np.int32)
  ids = blocks.block_ids(batch, n, block_size, jnp.asarray(segments) if packed else None)
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, 2 * n, 2, 16)), dtype) for _ in range(3))
  seg2 = jnp.tile(jnp.asarray(segments), (1, 2)) if packed else None
  return q, k, v, seg2, jnp.tile(ids, (1, 2))


@pytest.mark.parametrize("n,block_size,packed", KERNEL_CASES)
def test_pallas_attention_under_the_mask_equals_the_reference(n, block_size, packed):
  """The project's flash kernel (interpreted) under the block-diffusion mask, with tiles of 8 queries and 16 keys
  that straddle the x_t / x_0 boundary and the blocks: outputs and gradients equal the reference's."""
  q, k, v, seg2, ids2 = _qkv_blocks(n, block_size, packed)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  want, want_vjp = jax.vjp(lambda *a: kernels.attention_reference(*a, seg2, False, ids2), q, k, v)
  got, got_vjp = jax.vjp(lambda *a: kernels.flash_attention(*a, seg2, False, blocks_BxL=ids2, block_size=block_size,
                                                            block_q=8, block_k=16, interpret=True), q, k, v)
  for a, b in [(got, want)] + list(zip(got_vjp(cotangent), want_vjp(cotangent))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def _tiles_with_visible_pairs(mask, tile_q, tile_k):
  rows, cols = mask.shape
  return {(i, j) for i in range(-(-rows // tile_q)) for j in range(-(-cols // tile_k))
          if mask[i * tile_q:(i + 1) * tile_q, j * tile_k:(j + 1) * tile_k].any()}


@pytest.mark.parametrize("n,block_size", [(64, 4), (48, 16), (39, 3), (64, 1)])
@pytest.mark.parametrize("tiles", [(16, 16), (16, 32), (32, 8)])
def test_the_kernels_visit_every_tile_with_a_visible_pair_and_little_else(n, block_size, tiles):
  """The key tiles each query tile visits (forward and dq) and the query tiles each key tile visits (dk, dv)
  cover every tile holding a visible pair of the mask wherever the blocks start (a stream, and packed rows whose
  blocks restart at a document), and visit at most one tile per row of tiles more than those (for short blocks about a quarter of
  all 2L x 2L tiles: the structure's N^2, not 4 N^2)."""
  from pallas_kernels.attention import _Plan, _key_ranges, _query_ranges
  tile_q, tile_k = tiles
  plan = _Plan(length=2 * n, width=16, block_q=tile_q, block_k=tile_k, causal=False, interpret=True, half=n,
               block_size=block_size)
  # Every place a block can start: a stream, and a first document of s < L' tokens before the rest of the row.
  segments = np.array([[1] * s + [2] * (n - s) for s in range(block_size)], np.int32)
  masks = list(_brute_mask(segments, _brute_block_ids(segments, block_size)))
  needed = set().union(*(_tiles_with_visible_pairs(mask, tile_q, tile_k) for mask in masks))
  num_q, num_k = plan.padded_length // tile_q, plan.padded_length // tile_k
  by_query = {(i, j) for i in range(num_q) for lo, hi in _key_ranges(i, plan) for j in range(int(lo), int(hi))}
  by_key = {(i, j) for j in range(num_k) for lo, hi in _query_ranges(j, plan) for i in range(int(lo), int(hi))}
  for visited, lines in ((by_query, num_q), (by_key, num_k)):
    assert needed <= visited
    assert len(visited) <= len(needed) + lines


def test_splash_attention_under_the_stream_mask_equals_the_reference():
  """Splash (interpreted) with the static block-diffusion mask of a stream (2N = 256, its smallest block of 128,
  L' = 16): outputs and gradients equal the reference's; packed rows, whose blocks splash's static masks cannot
  follow, are refused."""
  q, k, v, _, ids2 = _qkv_blocks(128, 16, False)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  want, want_vjp = jax.vjp(lambda *a: kernels.attention_reference(*a, None, False, ids2), q, k, v)
  got, got_vjp = jax.vjp(lambda *a: kernels.splash_attention(*a, None, False, blocks_BxL=ids2, block_size=16,
                                                             interpret=True), q, k, v)
  for a, b in [(got, want)] + list(zip(got_vjp(cotangent), want_vjp(cotangent))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
  with pytest.raises(ValueError, match="static, and a packed row's blocks restart at each document"):
    kernels.splash_attention(q, k, v, jnp.ones(ids2.shape, jnp.int32), blocks_BxL=ids2, block_size=16,
                             interpret=True)


def test_the_model_gives_the_same_block_diffusion_logits_on_the_pallas_kernel():
  """The 2L pass through the model with model.attention_impl='pallas' (interpreted; block_size reaches the kernel)
  equals the XLA attention's, on packed rows."""
  exp, model, params = _model()
  kernel_model = Transformer(dataclasses.replace(exp.model, attention_impl="pallas", kernel_interpret=True))
  segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)
  x0, x_t = _tokens(4, 2, 12, 0.5, 256)
  ids = blocks.block_ids(2, 12, 4, segments)
  want = model.apply({"params": params}, x_t, clean_BxL=x0, blocks_BxL=ids, segments_BxL=segments)
  got = kernel_model.apply({"params": params}, x_t, clean_BxL=x0, blocks_BxL=ids, segments_BxL=segments,
                           block_size=4)
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.usefixtures("x64")
def test_the_variance_search_on_the_markov_oracle_picks_a_window_of_lower_variance():
  """With the exact block denoiser of a Markov chain (forward-backward on [x_0 of the earlier blocks, x_t of the
  block, masks after]), the window the search picks has a per-block loss variance below U[0, 1]'s (t near 0
  weighs the rare masked token by 1/t), and every window's variance is positive."""
  from d3pm_jax import get_schedule, make_process
  from d3pm_jax.data.synthetic import MarkovSource
  k, length, block_size, batch = 4, 8, 2, 64
  source = MarkovSource.random(seed=1, num_states=k, concentration=1.0)
  process = make_process("absorbing", k + 1, get_schedule("linear"))
  block_oracle = markov_block_oracle(source, process, length, block_size)
  x0 = source.sample(jax.random.PRNGKey(0), batch, length)
  variances = np.asarray(jax.jit(lambda key: losses.window_variances(process, block_oracle, key, x0, block_size,
                                                                     num_draws=16))(jax.random.PRNGKey(2)))
  chosen = losses.search_window(variances)
  assert losses.CLIP_WINDOWS[0] == (0.0, 1.0) and (variances > 0).all()
  assert chosen != (0.0, 1.0) and variances.min() < 0.8 * variances[0], variances


def test_a_clip_search_run_logs_its_window_trains_on_it_and_resumes_with_it(tmp_path):
  """configs/test.py:bd3lm with process.clip_search: each validation logs the chosen window (one of
  losses.CLIP_WINDOWS) to metrics.jsonl, and the checkpoint carries it, so a resumed run trains on it."""
  import json
  from d3pm_jax.training import checkpoints, train
  cfg = load_config("test", "bd3lm")
  cfg.process.clip_search = True
  cfg.train.update(steps=4, eval_every=2, checkpoint_every=2)
  exp = from_config(cfg, vocab_size=256)
  train.train_and_evaluate(exp, str(tmp_path), stop_after=2, quiet=True)
  train.train_and_evaluate(exp, str(tmp_path), quiet=True)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  windows = [(r["clip_low"], r["clip_high"]) for r in records if "clip_low" in r]
  assert len(windows) == 2 and all(w in losses.CLIP_WINDOWS for w in windows)
  progress = checkpoints.read_progress(str(tmp_path))
  assert tuple(progress["clip_window"]) == windows[-1]


def test_an_mdlm_checkpoint_fine_tunes_into_block_diffusion(tmp_path):
  """As BD3-LM does on OpenWebText: a masked-diffusion run without time conditioning (block_size 0) trained 2
  steps resumes with process.block_size=4 and a clipped window (the objective's fields, not the network's) and
  trains on to step 4; a change of the network (model.num_layers) is still refused."""
  from d3pm_jax.training import checkpoints, train
  cfg = load_config("test")
  cfg.model.time_conditioning = False
  cfg.train.update(steps=4, eval_every=4, checkpoint_every=2)
  train.train_and_evaluate(from_config(cfg, 256), str(tmp_path), stop_after=2, quiet=True)
  cfg.process.update(block_size=4, clip_low=0.3, clip_high=0.8)
  result = train.train_and_evaluate(from_config(cfg, 256), str(tmp_path), quiet=True)
  assert checkpoints.read_progress(str(tmp_path))["step"] == 4 and np.isfinite(result["validation"]["bits_per_token"])
  cfg.model.num_layers = 3
  with pytest.raises(ValueError, match="model.num_layers: checkpoint 2 vs config 3"):
    train.train_and_evaluate(from_config(cfg, 256), str(tmp_path), quiet=True)


def test_d3pm_eval_scores_a_block_diffusion_workdir_with_its_own_bound_and_prefix_completions(tmp_path,
                                                                                             monkeypatch):
  """evaluate_workdir on a configs/test.py:bd3lm run trained on the clipped window (0.3, 0.8): the bound is block
  diffusion's (its label names L') over all of t, every window's bits are finite and positive, and prefix
  completion keeps the prompt's whole blocks and reports each strategy; the table prints both. The block times
  the bound draws (recorded as they are drawn: 16 windows x 4 blocks x K = 2) fall below 0.1 and above 0.9 and
  put 5-15% in each tenth of [0, 1), as uniform draws do. Mutation: scoring on the training window (every time
  inside [0.3, 0.8))."""
  from d3pm_jax.data import pipeline
  from d3pm_jax.evaluation import eval_workdir
  from d3pm_jax.training import checkpoints, train
  cfg = load_config("test", "bd3lm")
  cfg.process.update(clip_low=0.3, clip_high=0.8)
  train.train_and_evaluate(from_config(cfg, vocab_size=256), str(tmp_path), quiet=True)
  drawn, block_times = [], losses.block_times

  def recorded(*args, **kwargs):
    t = block_times(*args, **kwargs)
    jax.debug.callback(lambda v: drawn.append(np.asarray(v)), t)
    return t

  monkeypatch.setattr(losses, "block_times", recorded)
  result = eval_workdir.evaluate_workdir(str(tmp_path), time_samples=2, batch=8, max_windows=16, infill_windows=4,
                                         infill_steps=2)
  monkeypatch.undo()
  t = np.concatenate([x.ravel() for x in drawn])
  assert t.size == 16 * 4 * 2 and t.min() < 0.1 and t.max() > 0.9, (t.size, t.min(), t.max())
  tenths = np.bincount((t * 10).astype(int), minlength=10) / t.size
  assert (tenths > 0.05).all() and (tenths < 0.15).all(), tenths
  assert result["bound"] == "block NELBO (L' = 4, K = 2)"
  nats = np.load(tmp_path / "eval_windows.npz")["nats"]
  assert len(nats) == 16 and np.isfinite(nats).all() and (nats > 0).all()
  completion = result["prefix_completion"]
  assert completion["prompt_tokens"] == 8 and set(completion["by_strategy"]) == {"ancestral", "confidence"}
  assert all(0 <= e["accuracy"] <= 1 and e["unigram_entropy"] > 0 for e in completion["by_strategy"].values())
  assert "infilling" not in result
  table = eval_workdir.format_table(result)
  assert "block NELBO (L' = 4, K = 2)" in table and "prefix completion of 4 windows after 8 prompt tokens" in table
  # One block of the whole window (L' = L, MD4's objective): the prompt is the first half, a partial block, and
  # the other half is completed (half a window rounded up to a whole block left nothing: NaN accuracy).
  config = checkpoints.load_experiment(str(tmp_path))
  whole = dataclasses.replace(config, process=dataclasses.replace(config.process, block_size=16))
  params, _ = checkpoints.restore_params(str(tmp_path), config)
  data = pipeline.build_data(config.data, 8, 0, str(tmp_path))
  process = state.build_process(whole.process, whole.model)
  one = eval_workdir.prefix_completion(whole, Transformer(config.model), params, process, data, num_steps=2,
                                       num_windows=4)
  assert one["prompt_tokens"] == 8
  assert all(0 <= e["accuracy"] <= 1 and e["unigram_entropy"] > 0 for e in one["by_strategy"].values()), one


def test_the_block_samplers_program_does_not_grow_with_blocks_or_steps():
  """The cached block sampler's lowered program (StableHLO text) is about the same size for 8 blocks of 3 steps
  and for 16 blocks of 64 steps (within 5%; unrolling either loop would multiply it): both loops are scans."""
  from d3pm_jax.models import block_decoding
  from d3pm_jax.sampling import SamplerConfig, block_sample
  exp, model, params = _model(block_size=4)
  process = state.build_process(exp.process, exp.model)

  def size(length, steps):
    fns = block_decoding.cached(model, params, 1, 4, block_decoding.window_for(model, length, 4))
    fn = lambda key: block_sample(process, *fns, key, 1, length, 4, SamplerConfig(num_steps=steps))
    return len(jax.jit(fn).lower(jax.random.PRNGKey(0)).as_text())

  small, large = size(32, 3), size(64, 64)  # both past max_len = 16: the same cache window of 12 positions
  # What grows is data, not code: the time grid (steps + 1 floats) and the blocks' keys, inlined as constants.
  assert abs(large - small) < 0.05 * small, (small, large)


def test_a_sample_stops_at_its_first_end_of_document_token():
  """With eos_id, every position after a sample's first end-of-document token is padding, whichever block it falls
  in; a sample without one is left whole. (A denoiser certain of a fixed text per row, so the draws are known.)"""
  from d3pm_jax import get_schedule, make_process
  from d3pm_jax.sampling import SamplerConfig, block_sample
  process = make_process("absorbing", 11, get_schedule("linear"))
  text = jnp.asarray([[1, 2, 3, 9, 4, 5, 9, 6], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)  # 9 is the EOS

  def denoise(state, x_t, b):
    return 50.0 * jax.nn.one_hot(jax.lax.dynamic_slice_in_dim(text, b * 2, 2, axis=1), 11)

  tokens = block_sample(process, denoise, lambda s, x, b: s, 0, jax.random.PRNGKey(0), 2, 8, 2,
                        SamplerConfig(num_steps=2), eos_id=9, pad_id=0)
  np.testing.assert_array_equal(np.asarray(tokens), [[1, 2, 3, 9, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_ignore_bos_gives_the_first_token_clean_and_scores_the_rest_as_before():
  """BD3-LM's ``ignore_bos`` (``data.ignore_bos``): every x_t the bound's network pass sees holds x_0 at each row's
  first position (the reconstruction's too), and the bound is the per-position sum of the plain run's terms less
  position 0's, draw for draw (the same times and masks elsewhere). The same holds in training, and a config that
  sets it without block diffusion is refused, naming the fix. (A given token is never masked, so the absorbing
  bound scores it 0 as is; that it counts no token either is the validation weights', tests/test_lm1b.py.)
  Mutations: the first token masked like the others; given in training only."""
  exp, model, params = _model(block_size=4)
  process = state.build_process(exp.process, exp.model)
  x0, _ = _tokens(5, 64, 12, 0.0, 256)
  apply = jax.jit(model.apply)
  seen = []

  def block_logits(x_t, clean, ids):
    seen.append(np.asarray(x_t))
    return apply({"params": params}, x_t, clean_BxL=clean, blocks_BxL=ids)

  key = jax.random.PRNGKey(7)
  given = jnp.zeros(x0.shape, bool).at[:, 0].set(True)
  plain = losses._block_position_terms(process, block_logits, key, x0, jnp.full(x0.shape, 0.9), blocks.block_ids(
      64, 12, 4))
  assert (seen[-1][:, 0] == process.mask_id).any()  # at t = 0.9 the first position is often masked
  kept = losses._block_position_terms(process, block_logits, key, x0, jnp.full(x0.shape, 0.9), blocks.block_ids(
      64, 12, 4), given)
  np.testing.assert_array_equal(seen[-1][:, 0], np.asarray(x0[:, 0]))
  masked_elsewhere = seen[-2][:, 1:] == seen[-1][:, 1:]
  assert masked_elsewhere.all()  # the same draws at every other position
  seen.clear()
  on = dataclasses.replace(exp, data=dataclasses.replace(exp.data, ignore_bos=True))
  for evaluate in (False, True):
    a = state.loss_terms(on, model, process, params, key, x0, evaluate=evaluate)
    assert all((x[:, 0] == np.asarray(x0[:, 0])).all() for x in seen)
    seen.clear()
    b = state.loss_terms(exp, model, process, params, key, x0, evaluate=evaluate,
                         weights_BxL=jnp.ones(x0.shape).at[:, 0].set(0.0))
    # The plain run scored without position 0 differs only where position 0 was masked (its context changed).
    assert float(jnp.mean(jnp.abs(a["nelbo"] - b["nelbo"]))) < 0.2 * float(jnp.mean(b["nelbo"]))
    assert float(jnp.all(a["nelbo"] > 0))
    if evaluate:  # at t = 0 both x_t are x_0 but for eps: the reconstruction scores position 0 in neither
      np.testing.assert_allclose(np.asarray(a["recon"]), np.asarray(b["recon"]), rtol=1e-2)
  np.testing.assert_array_equal(np.asarray(jnp.sum(kept, axis=1)),
                                np.asarray(jnp.sum(kept.at[:, 0].set(0.0), axis=1)))  # position 0 scores 0
  cfg = load_config("test")
  cfg.data.ignore_bos = True
  with pytest.raises(ValueError, match=r"data.ignore_bos .* set process.block_size"):
    from_config(cfg, vocab_size=256)
