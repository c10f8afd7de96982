"""The fused sampling head (pallas_kernels/fused_sample.py): the tiled twin and the Pallas kernel (interpreted)
draw exactly the naive Gumbel-max's ids for the same noise, with the same probabilities; the draws follow the
tempered softmax (chi-square at fixed seeds, with the power to reject a wrong temperature); the hashed noise is
uniform and refined near 0; the kernel lowers for CUDA."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from pallas_kernels import fused_sample

CASES = [(70, 48, 300, 295, 7, 0.7), (37, 8, 5, 5, None, 1.0), (1, 20, 130, 129, 0, 2.0), (64, 32, 256, 256, 255, 1.0)]


def _inputs(seed, n, d, v, dtype):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, d)), dtype),
          jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 2.0, dtype))


def _impl(name):
  if name == "tiled":
    return functools.partial(fused_sample.sample_tiled, tile_v=64)
  return functools.partial(fused_sample.sample_pallas, interpret=True, block_n=16, tile_v=64, chunk_d=16, splits=2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("impl", ["tiled", "pallas"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_draws_equal_the_naive_gumbel_max_for_the_same_noise(impl, dtype, case):
  n, d, v, num_classes, exclude, temperature = CASES[case]
  with jax.enable_x64(dtype == "float64"):
    h, w = _inputs(case + 10 * (impl == "pallas"), n, d, v, dtype)
    kwargs = dict(num_classes=num_classes, exclude=exclude, temperature=temperature, dtype=jnp.dtype(dtype))
    seed = 1000 + case
    want_ids, want_p = fused_sample.sample_reference(h, w, seed, **kwargs)
    ids, p = _impl(impl)(h, w, seed, **kwargs)
    np.testing.assert_array_equal(ids, want_ids)
    assert exclude is None or not (np.asarray(ids) == exclude).any()
    assert (np.asarray(ids) < num_classes).all()
    # float32: a few ulps of the softmax's sums; float64 likewise at its precision.
    np.testing.assert_allclose(p, want_p, rtol=1e-5 if dtype == "float32" else 1e-12)
    other, _ = _impl(impl)(h, w, seed + 1, **kwargs)
    assert n < 30 or (np.asarray(other) != np.asarray(ids)).any()  # the seed matters


@pytest.mark.parametrize("impl", ["tiled", "pallas"])
def test_bfloat16_products_draw_as_the_reference_from_the_rounded_inputs(impl):
  """``dot_dtype=bfloat16`` rounds h and W to bfloat16 and multiplies exactly (products of bfloat16 numbers are
  exact in float32): the draws equal the float32 reference's from the same rounded inputs, and the probabilities
  agree to float32 accumulation (1e-5 relative), while the unrounded inputs' probabilities differ at the 1e-3
  level (so a kernel that ignored dot_dtype fails)."""
  n, d, v, num_classes, exclude, temperature = CASES[0]
  h, w = _inputs(77, n, d, v, "float32")
  kwargs = dict(num_classes=num_classes, exclude=exclude, temperature=temperature)
  rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (h, w)]
  want_ids, want_p = fused_sample.sample_reference(*rounded, 99, **kwargs)
  ids, p = _impl(impl)(h, w, 99, dot_dtype=jnp.bfloat16, **kwargs)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(p, want_p, rtol=1e-5)
  _, unrounded_p = fused_sample.sample_reference(h, w, 99, **kwargs)
  assert np.abs(np.asarray(unrounded_p) / np.asarray(want_p) - 1).max() > 1e-4


@pytest.mark.parametrize("impl", ["reference", "tiled", "pallas"])
def test_draws_follow_the_tempered_softmax(impl):
  """20,000 rows with the same hidden state: the counts of the 5 allowed classes fit softmax(logits / T) (the
  mask class, 2, never drawn), and reject the untempered softmax; the probability returned with each draw is the
  drawn class's under the untempered softmax (what confidence ranks by), not the tempered one."""
  rows, temperature = 20000, 0.5
  h = jnp.ones((rows, 2), jnp.float32)
  w = jnp.asarray([[0.3, -0.2, 2.0, 0.1, -0.4, 0.0], [0.1, 0.2, 0.5, -0.3, 0.0, 0.05]], jnp.float32)
  sample = {"reference": fused_sample.sample_reference, "tiled": _impl("tiled"),
            "pallas": functools.partial(fused_sample.sample_pallas, interpret=True, block_n=512, tile_v=8,
                                        chunk_d=2)}[impl]
  ids, p = sample(h, w, 77, num_classes=6, exclude=2, temperature=temperature)
  counts = np.bincount(np.asarray(ids), minlength=6)
  assert counts[2] == 0
  logits = np.asarray(h[0] @ w, np.float64)
  allowed = np.array([0, 1, 3, 4, 5])

  def expected(t):
    q = np.exp(logits[allowed] / t - (logits[allowed] / t).max())
    return q / q.sum()

  assert scipy.stats.chisquare(counts[allowed], rows * expected(temperature)).pvalue > 1e-4
  assert scipy.stats.chisquare(counts[allowed], rows * expected(1.0)).pvalue < 1e-6
  np.testing.assert_allclose(np.asarray(p), expected(1.0)[np.searchsorted(allowed, np.asarray(ids))], rtol=1e-5)


def test_the_hashed_noise_is_uniform_and_refined_near_zero():
  """2^22 cells: the coarse uniforms are uniform (KS); about 2^-12 of the cells fall in the lowest cell and are
  refined, and those refined values are themselves uniform over it (so the Gumbel tail goes on past 16.6)."""
  rows, cols = jnp.arange(2 ** 11)[:, None], jnp.arange(2 ** 11)[None, :]
  coarse = np.asarray(fused_sample._uniform(5, rows, cols, 0, jnp.float32)).ravel()
  assert scipy.stats.kstest(coarse, "uniform").pvalue > 1e-4
  fine = np.asarray(fused_sample.fine_uniform(5, rows, cols)).ravel()
  low = fine[fine < 2.0 ** -12]
  lo, hi = scipy.stats.binom.interval(1 - 1e-6, fine.size, 2.0 ** -12)
  assert lo <= low.size <= hi
  assert scipy.stats.kstest(low / 2.0 ** -12, "uniform").pvalue > 1e-4
  # Finer than the 2^-24 grid of one float32 draw, on which every unrefined value would lie.
  assert np.mean(np.mod(low.astype(np.float64) / 2.0 ** -24, 1.0) != 0) > 0.9
  assert np.isfinite(np.asarray(fused_sample.gumbel(5, rows, cols))).all()


def test_bad_arguments_name_the_value():
  h, w = jnp.zeros((4, 8)), jnp.zeros((8, 10))
  with pytest.raises(ValueError, match="temperature must be > 0; got 0"):
    fused_sample.sample_reference(h, w, 0, num_classes=10, temperature=0)
  with pytest.raises(ValueError, match=r"exclude must be a class in \[0, 10\) or None; got 10"):
    fused_sample.sample_tiled(h, w, 0, num_classes=10, exclude=10)
  with pytest.raises(ValueError, match="tile_v must be a power of two"):
    fused_sample.sample_pallas(h, w, 0, num_classes=10, tile_v=12, interpret=True)


def test_the_sampling_kernel_lowers_for_cuda():
  h, w = jnp.ones((70, 48), jnp.bfloat16), jnp.ones((48, 300), jnp.float32)
  lowered = jax.jit(lambda h, w: fused_sample.sample_pallas(h, w, 3, num_classes=295, exclude=7)).trace(h, w).lower(
      lowering_platforms=("cuda",))
  assert "triton" in lowered.as_text()


# ---------------------------------------------------------------- the sampler with a fused head

def _logits_as_head(logits_fn, num_states):
  """A denoiser given as (h, W) whose head h @ W reproduces ``logits_fn`` exactly (W the identity)."""
  eye = jnp.eye(num_states, dtype=jnp.float32)
  return lambda x_t, t_B: (logits_fn(x_t, t_B), eye)


@pytest.mark.parametrize("impl", ["tiled", "pallas"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_the_sampler_with_a_fused_head_draws_the_exact_reverse_chain(impl, temperature):
  """The enumerated reverse chain of tests/test_sampler_knobs.py (absorbing, V = 3 + mask, L = 2, 3 steps, a
  network depending on both positions and t): 20,000 samples drawn through the fused sampling head fit it."""
  from d3pm_jax.sampling import SampleHead, SamplerConfig, sample
  from test_sampler_knobs import (LENGTH, SAMPLES, STEPS, V_DATA, build, chi_square_pvalue, exact_distribution,
                                  make_logits_fn, network_tables)
  proc = build("absorbing")
  tables = network_tables(proc.num_states)
  logits_fn = make_logits_fn(tables)
  draw = (functools.partial(fused_sample.sample_pallas, interpret=True, block_n=1024, tile_v=4, chunk_d=4)
          if impl == "pallas" else fused_sample.select("tiled", tile_v=4))
  head = SampleHead(hidden_fn=_logits_as_head(logits_fn, proc.num_states), draw=draw)
  cfg = SamplerConfig(num_steps=STEPS, temperature=temperature)
  x0, _ = jax.jit(lambda key: sample(proc, logits_fn, key, SAMPLES, LENGTH, cfg, head=head))(jax.random.PRNGKey(9))
  x0 = np.asarray(x0)
  counts = np.bincount(x0[:, 0] * V_DATA + x0[:, 1], minlength=V_DATA ** LENGTH)
  exact = exact_distribution(proc, tables, dict(temperature=temperature))
  assert chi_square_pvalue(counts, exact) > 1e-4, (counts / SAMPLES, exact)
  if temperature != 1.0:  # and has the power to see a temperature that is not applied
    assert chi_square_pvalue(counts, exact_distribution(proc, tables, {})) < 1e-6


def _exact_confidence_paths(proc, tables, temperature, rank_tempered=False):
  """P(first unmasked position, x_0) of the confidence sampler on the chain of tests/test_sampler_knobs.py
  (L = 2), enumerated: each masked position proposes a token from its tempered prediction, and the
  floor(frac(s) x L) proposals of lowest untempered probability p_theta(y | x_t) stay masked. With
  ``rank_tempered`` the ranking reads the tempered probability instead (the bug this guards against). Cells:
  ``first * V_DATA ** 2 + x0[0] * V_DATA + x0[1]``, with first = 2 when both unmask on one step."""
  from d3pm_jax.sampling import time_grid
  from test_sampler_knobs import EPS, LENGTH, STEPS, V_DATA, np_logits, np_shape
  assert LENGTH == 2
  mask = proc.mask_id
  times = np.asarray(time_grid("uniform", STEPS), np.float64)
  alpha = lambda t: EPS + (1.0 - 2.0 * EPS) * (1.0 - t)
  dist = {((mask, mask), -1): 1.0}  # (state, first position unmasked: -1 none yet)
  for i in range(STEPS, 0, -1):
    t, s = times[i], times[i - 1]
    keep = 0 if i == 1 else int(np.floor((1.0 - alpha(s)) / (1.0 - alpha(1.0)) * LENGTH))
    new = {}
    for (x_t, first), prob in dist.items():
      logits = np_logits(tables, np.array(x_t), t)
      masked = [n for n in range(LENGTH) if x_t[n] == mask]
      p0 = [np.exp(z - z.max()) / np.exp(z - z.max()).sum() for z in (logits[n][:V_DATA] for n in range(LENGTH))]
      tilde = [np_shape(p, {"temperature": temperature}) for p in p0]
      for ys in itertools.product(range(V_DATA), repeat=len(masked)):
        w = prob * np.prod([tilde[n][y] for n, y in zip(masked, ys)])
        conf = [(tilde if rank_tempered else p0)[n][y] for n, y in zip(masked, ys)]
        order = np.argsort(conf, kind="stable")  # least confident first; exact ties have probability 0 here
        stays = {masked[k] for k in order[:keep]}
        x_s = list(x_t)
        for n, y in zip(masked, ys):
          if n not in stays:
            x_s[n] = y
        newly = [n for n in masked if n not in stays]
        f = first if first >= 0 or not newly else (newly[0] if len(newly) == 1 else 2)
        new[(tuple(x_s), f)] = new.get((tuple(x_s), f), 0.0) + w
    dist = new
  out = np.zeros(3 * V_DATA ** LENGTH)
  for (x, first), prob in dist.items():
    out[first * V_DATA ** 2 + x[0] * V_DATA + x[1]] += prob
  return out / out.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_and_xla_confidence_samplers_rank_by_the_untempered_probability(temperature):
  """Confidence sampling ranks by the model's own probability, the knobs shaping only the proposals: on the
  enumerated chain (absorbing, V = 3 + mask, L = 2, 3 steps), 20,000 samples of (which position unmasks first,
  x_0) fit the enumeration through the XLA path and through the fused head alike (chi-square p > 1e-4), and at
  temperatures 0.5 and 2 they reject the chain that ranks by the tempered probability (p < 1e-6). Mutation: the
  fused head returning the tempered probability (the bug: position 0 first in 24% of rows where 3% is tempered
  ranking's share at temperature 2, 64% at temperature 0.5)."""
  from d3pm_jax.sampling import SampleHead, SamplerConfig, sample
  from test_sampler_knobs import LENGTH, SAMPLES, V_DATA, build, chi_square_pvalue, make_logits_fn, network_tables
  proc = build("absorbing")
  own, other, timed = network_tables(proc.num_states)
  # At t = 1 (both masked) the positions predict these: position 0's token 2 is the more probable, but position
  # 1's is at temperature 0.5, and position 0's token 0 beats position 1's token 1 only at temperature 2.
  timed = timed.copy()
  for n, p in enumerate([(0.40, 0.06, 0.54), (0.002, 0.448, 0.55)]):
    timed[n, :V_DATA] = np.log(p) - own[proc.mask_id, :V_DATA] - other[proc.mask_id, :V_DATA]
  tables = (own, other, timed)
  logits_fn = make_logits_fn(tables)
  head = SampleHead(hidden_fn=_logits_as_head(logits_fn, proc.num_states), draw=fused_sample.select("tiled", tile_v=4))
  cfg = SamplerConfig(num_steps=3, strategy="confidence", temperature=temperature, return_trajectory=True)
  exact = _exact_confidence_paths(proc, tables, temperature)
  tempered = _exact_confidence_paths(proc, tables, temperature, rank_tempered=True)
  for fused in (None, head):
    x0, traj = jax.jit(lambda key: sample(proc, logits_fn, key, SAMPLES, LENGTH, cfg, head=fused))(
        jax.random.PRNGKey(11))
    first_step = np.asarray(traj[0]) != proc.mask_id
    first = np.where(first_step.all(axis=1), 2, np.argmax(first_step, axis=1))
    x0 = np.asarray(x0)
    counts = np.bincount(first * V_DATA ** 2 + x0[:, 0] * V_DATA + x0[:, 1], minlength=3 * V_DATA ** LENGTH)
    assert chi_square_pvalue(counts, exact) > 1e-4, (fused is not None, counts / SAMPLES, exact)
    if temperature != 1.0:
      assert 0.5 * np.abs(tempered - exact).sum() > 0.2  # the two rankings differ here
      assert counts[tempered == 0].sum() > 0 or chi_square_pvalue(counts, tempered) < 1e-6


def test_the_confidence_sampler_with_a_fused_head_unmasks_its_schedule_by_probability():
  """Confidence ordering through the fused head: after each step exactly floor(frac x L) positions stay masked,
  and the positions unmasked first are the ones whose drawn token was most probable (a near-deterministic
  network makes the order visible)."""
  from d3pm_jax import get_schedule, make_process
  from d3pm_jax.sampling import SampleHead, SamplerConfig, sample
  vocab, batch, length, steps = 11, 8, 32, 8
  proc = make_process("absorbing", vocab + 1, get_schedule("linear"))
  sharpness = jnp.linspace(0.0, 12.0, length)  # position n predicts token n % vocab with confidence rising in n
  logits_fn = lambda x_t, t_B: jnp.broadcast_to(
      sharpness[:, None] * jax.nn.one_hot(jnp.arange(length) % vocab, vocab + 1), x_t.shape + (vocab + 1,))
  head = SampleHead(hidden_fn=_logits_as_head(logits_fn, vocab + 1), draw=fused_sample.select("tiled", tile_v=8))
  cfg = SamplerConfig(num_steps=steps, strategy="confidence", return_trajectory=True)
  x0, traj = sample(proc, logits_fn, jax.random.PRNGKey(2), batch, length, cfg, head=head)
  masked = np.asarray(traj == proc.mask_id)
  times = np.arange(steps - 1, -1, -1) / steps
  for i, s in enumerate(times):
    frac = (1.0 - proc.schedule.alpha(s)) / (1.0 - proc.schedule.alpha(1.0))
    assert (masked[i].sum(axis=1) == (0 if s == 0 else np.floor(frac * length))).all()
  # After step one 28 of 32 stay masked: the 4 unmasked are the most confident, the last 4 positions, in every row.
  np.testing.assert_array_equal(masked[0], np.broadcast_to(np.arange(length) < 28, masked[0].shape))
  assert int(np.asarray(x0).max()) < vocab


def test_impossible_fused_sampling_is_refused():
  from d3pm_jax import get_schedule, make_process
  from d3pm_jax.sampling import SampleHead, SamplerConfig, sample
  head = SampleHead(hidden_fn=None, draw=None)
  uniform = make_process("uniform", 5, get_schedule("linear"))
  with pytest.raises(ValueError, match="cannot serve UniformProcess"):
    sample(uniform, None, jax.random.PRNGKey(0), 2, 4, SamplerConfig(), head=head)
  absorbing = make_process("absorbing", 6, get_schedule("linear"))
  with pytest.raises(ValueError, match="top_p=0.9"):
    sample(absorbing, None, jax.random.PRNGKey(0), 2, 4, SamplerConfig(top_p=0.9), head=head)


def test_the_train_loop_runs_on_the_fused_head(tmp_path):
  """model.head_impl=tiled end to end: the masked ELBO trains and evaluates through the fused loss head, and the
  samples at the end come through the fused sampling head."""
  import dataclasses
  import io

  from d3pm_jax.training import train
  from test_train import experiment
  base = experiment(steps=2, eval_every=2)
  config = dataclasses.replace(base, model=dataclasses.replace(base.model, head_impl="tiled", head_tile=64))
  result = train.train_and_evaluate(config, str(tmp_path), quiet=True)
  assert np.isfinite(result["validation"]["bits_per_token"])
  texts = train.print_samples(config, result, writer_out=io.StringIO())
  assert len(texts) == config.train.num_samples


def test_the_train_loop_builds_fused_heads_only_where_they_apply():
  import dataclasses

  from d3pm_jax.models.transformer import Transformer
  from d3pm_jax.sampling import SamplerConfig
  from d3pm_jax.training import state
  from test_train import experiment
  base = experiment()
  tiled = dataclasses.replace(base, model=dataclasses.replace(base.model, head_impl="tiled"))
  process = state.build_process(base.process, base.model)
  assert state.fused_head(Transformer(base.model), {}) is None
  assert state.fused_head(Transformer(tiled.model), {}) is not None
  assert state.sample_head(Transformer(base.model), {}, process, SamplerConfig()) is None
  assert state.sample_head(Transformer(tiled.model), {}, process, SamplerConfig()) is not None
  assert state.sample_head(Transformer(tiled.model), {}, process, SamplerConfig(top_p=0.5)) is None  # logits


@pytest.mark.parametrize("case", [0, 1, 2])
def test_the_tpu_kernel_draws_the_same_ids(case):
  """The Mosaic kernel in TPU interpret mode: the naive Gumbel-max's ids for the same noise; it lowers for TPU."""
  from jax.experimental.pallas import tpu as pltpu
  n, d, v, num_classes, exclude, temperature = CASES[case]
  h, w = _inputs(50 + case, n, d, v, "float32")
  kwargs = dict(num_classes=num_classes, exclude=exclude, temperature=temperature)
  want_ids, want_p = fused_sample.sample_reference(h, w, 31 + case, **kwargs)
  with pltpu.force_tpu_interpret_mode():
    ids, p = fused_sample.sample_pallas_tpu(h, w, 31 + case, block_n=16, tile_v=128, **kwargs)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(p, want_p, rtol=1e-5)
  lowered = jax.jit(lambda h, w: fused_sample.sample_pallas_tpu(h, w, 3, block_n=16, tile_v=128, **kwargs)).trace(
      h, w).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()
  with pytest.raises(ValueError, match="draws in float32"):
    fused_sample.sample_pallas_tpu(h, w, 3, dtype=jnp.float64, **kwargs)
