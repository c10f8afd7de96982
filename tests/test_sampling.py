"""Samplers: clamped conditioning, the oracle reproduces the chain's statistics, skipping is exact, scan size."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax import get_schedule, make_process
from d3pm_jax.data.synthetic import MarkovSource
from d3pm_jax.sampling import SamplerConfig, sample

V = 6


def build(name):
  kwargs = {}
  if name == "nearest_neighbor":
    kwargs = dict(embeddings=np.random.default_rng(0).normal(size=(V, 3)), k=2, rate_scale=4.0)
  return make_process(name, V, get_schedule("cosine"), **kwargs)


def random_logits_fn(x_t, t_B):  # time-independent, depends on x_t: a stand-in network
  table = jax.random.normal(jax.random.PRNGKey(0), (V, V))
  return table[x_t] + jnp.roll(table[x_t], 1, axis=1) * 0.5


CASES = [("absorbing", "ancestral"), ("absorbing", "confidence"), ("uniform", "ancestral"),
         ("nearest_neighbor", "ancestral")]


@pytest.mark.parametrize("name,strategy", CASES)
def test_given_tokens_never_change_and_no_mask_remains(name, strategy):
  proc = build(name)
  batch, length = 8, 12
  prompt = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0, proc.num_data_states)
  prefix = jnp.broadcast_to(jnp.arange(length) < 4, (batch, length))
  infill = jax.random.bernoulli(jax.random.PRNGKey(2), 0.4, (batch, length))
  for given in (prefix, infill):
    cfg = SamplerConfig(num_steps=10, strategy=strategy, return_trajectory=True)
    x0, traj = sample(proc, random_logits_fn, jax.random.PRNGKey(3), batch, length, cfg, given, prompt)
    assert traj.shape == (10, batch, length)
    for x in list(traj) + [x0]:
      np.testing.assert_array_equal(np.asarray(x)[np.asarray(given)], np.asarray(prompt)[np.asarray(given)])
    assert int(x0.max()) < proc.num_data_states  # no mask token after the last step
    assert bool(jnp.any(x0[~given] != prompt[~given]))  # free positions really were generated


def test_confidence_sampler_unmasks_on_schedule():
  proc = build("absorbing")
  cfg = SamplerConfig(num_steps=8, strategy="confidence", return_trajectory=True, time_grid="uniform")
  _, traj = sample(proc, random_logits_fn, jax.random.PRNGKey(0), 4, 40, cfg)
  masked = np.asarray((traj == proc.mask_id).sum(axis=2))  # [steps, B]
  assert np.all(np.diff(masked, axis=0) <= 0) and np.all(masked[-1] == 0)
  alpha = proc.schedule.alpha
  for i, s in enumerate(np.arange(7, -1, -1) / 8):  # after step i the time is s
    expected = 0 if s == 0 else int(np.floor((1 - float(alpha(s))) / (1 - float(alpha(1.0))) * 40))
    assert np.all(masked[i] == expected), (i, masked[i], expected)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_oracle_ancestral_sampling_reproduces_the_chain(name):
  """With the exact denoiser and 100 steps, the bigram counts of 4000 samples at every pair of neighbouring
  positions fit the chain's exact joint (chi-square p > 1e-4), and reject the product of its marginals (p < 1e-6):
  a sampler that dropped the dependence between positions fails, which an absolute tolerance of 0.03 on the
  frequencies let through (it misses them by only 0.04-0.06)."""
  from test_sampler_knobs import chi_square_pvalue
  k, length, num = 4, 6, 4000
  src = MarkovSource.random(seed=0, num_states=k, concentration=2.0)
  proc = make_process(name, k + (name == "absorbing"), get_schedule("linear"),
                      **(dict(embeddings=np.random.default_rng(0).normal(size=(k, 2)), k=2, rate_scale=3.0)
                         if name == "nearest_neighbor" else {}))
  cfg = SamplerConfig(num_steps=100, precision="float64")
  x0, _ = jax.jit(lambda key: sample(proc, src.oracle_logits_fn(proc), key, num, length, cfg))(jax.random.PRNGKey(7))
  x0 = np.asarray(x0)
  init, trans = np.asarray(src.initial_K), np.asarray(src.transition_KxK)
  marginal = init
  for n in range(length - 1):
    joint = marginal[:, None] * trans
    counts = np.zeros((k, k))
    np.add.at(counts, (x0[:, n], x0[:, n + 1]), 1.0)
    assert chi_square_pvalue(counts.ravel(), joint.ravel()) > 1e-4, (n, counts / num, joint)
    independent = np.outer(marginal, marginal @ trans)
    assert chi_square_pvalue(counts.ravel(), independent.ravel()) < 1e-6, n
    marginal = marginal @ trans


@pytest.mark.parametrize("name,strategy", CASES)
def test_skipping_unchanged_steps_gives_exactly_the_same_samples(name, strategy):
  proc = build(name)
  calls = []

  def counted(x_t, t_B):
    jax.debug.callback(lambda: calls.append(1))
    return random_logits_fn(x_t, t_B)

  base = SamplerConfig(num_steps=48, strategy=strategy)  # more steps than positions: many steps change nothing
  plain, _ = sample(proc, random_logits_fn, jax.random.PRNGKey(5), 2, 8, base)
  skipping = dataclasses.replace(base, skip_unchanged=True)
  skipped, _ = sample(proc, counted, jax.random.PRNGKey(5), 2, 8, skipping, time_conditioned=False)
  np.testing.assert_array_equal(plain, skipped)
  if name == "absorbing":
    assert len(calls) < 48, len(calls)  # the network really was skipped


def test_skipping_is_refused_for_a_time_conditioned_model_unless_approximation_is_asked():
  proc = build("absorbing")
  skipping = SamplerConfig(num_steps=48, skip_unchanged=True)
  with pytest.raises(ValueError, match="time-conditioned.*approximate_skip=True"):
    sample(proc, random_logits_fn, jax.random.PRNGKey(5), 2, 8, skipping)  # time_conditioned defaults to True
  calls = []

  def timed_fn(x_t, t_B):  # does look at t
    jax.debug.callback(lambda: calls.append(1))
    return random_logits_fn(x_t, t_B) + t_B[:, None, None]

  approx, _ = sample(proc, timed_fn, jax.random.PRNGKey(5), 2, 8,
                     dataclasses.replace(skipping, approximate_skip=True))
  assert 8 <= len(calls) < 48 and int(approx.max()) < proc.mask_id


def test_compiled_program_does_not_grow_with_steps():
  proc = build("absorbing")

  def hlo_size(steps):
    fn = lambda key: sample(proc, random_logits_fn, key, 2, 8, SamplerConfig(num_steps=steps))[0]
    return len(jax.jit(fn).lower(jax.random.PRNGKey(0)).compile().as_text())

  small, large = hlo_size(16), hlo_size(1024)
  assert large < 1.2 * small, (small, large)


def test_top_p_keeps_only_the_nucleus():
  from d3pm_jax.sampling import categorical
  log_probs = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: categorical(k, log_probs, SamplerConfig(top_p=0.8)))(
      jax.random.split(jax.random.PRNGKey(0), 2000))
  counts = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
  assert counts[2] == 0 and counts[3] == 0
  np.testing.assert_allclose(counts[:2], [0.625, 0.375], atol=0.04)


@pytest.mark.parametrize("call,match", [
    (lambda: SamplerConfig(strategy="greedy"), "unknown sampling strategy 'greedy'; valid"),
    (lambda: SamplerConfig(time_grid="log"), "unknown time grid 'log'"),
    (lambda: SamplerConfig(top_p=0.0), "top_p must lie in"),
    (lambda: SamplerConfig(precision="float16"), "unknown sampling precision .float16."),
    (lambda: sample(build("uniform"), random_logits_fn, jax.random.PRNGKey(0), 1, 4,
                    SamplerConfig(strategy="confidence")), "needs the absorbing process"),
    (lambda: sample(build("uniform"), random_logits_fn, jax.random.PRNGKey(0), 1, 4,
                    SamplerConfig(precision="float64")), "needs 64-bit JAX"),
    (lambda: sample(build("uniform"), random_logits_fn, jax.random.PRNGKey(0), 1, 4,
                    given_BxL=jnp.ones((1, 4), bool)), "pass given_BxL and prompt_BxL together"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_one_position_per_block_decodes_greedily_left_to_right(strategy):
  """With as many blocks as positions and greedy predictions, the semi-autoregressive sampler is left-to-right
  decoding: position b takes the argmax (over data tokens) of the denoiser's prediction for b given positions < b
  decoded and positions >= b masked — a loop written out here, using none of the sampler's code."""
  proc = build("absorbing")
  batch, length = 3, 6
  cfg = SamplerConfig(num_steps=3, strategy=strategy, num_blocks=length, greedy=True)
  got, _ = sample(proc, random_logits_fn, jax.random.PRNGKey(5), batch, length, cfg)
  x = np.full((batch, length), proc.mask_id)
  for b in range(length):
    logits = np.asarray(random_logits_fn(jnp.asarray(x), jnp.zeros((batch,))))
    x[:, b] = np.argmax(logits[:, b, :proc.num_data_states], axis=-1)
  np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_semi_autoregressive_blocks_finish_left_to_right(strategy):
  proc = build("absorbing")
  cfg = SamplerConfig(num_steps=5, strategy=strategy, num_blocks=3, return_trajectory=True)
  prompt = jnp.zeros((2, 12), jnp.int32).at[:, 0].set(3)
  given = jnp.zeros((2, 12), bool).at[:, 0].set(True)
  x0, traj = sample(proc, random_logits_fn, jax.random.PRNGKey(1), 2, 12, cfg, given, prompt)
  traj = np.asarray(traj)
  assert traj.shape[0] == 15 and int(x0.max()) < proc.mask_id
  for b in range(3):
    during = traj[b * 5:(b + 1) * 5]
    assert np.all(during[:, :, (b + 1) * 4:] == proc.mask_id)  # later blocks untouched
    assert np.all(during[-1, :, : (b + 1) * 4] != proc.mask_id)  # this block done at its end
    assert np.all(during[:, :, 0] == 3)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_equals_full_recomputation(scan_layers):
  from d3pm_jax.models.transformer import ModelConfig, Transformer
  from d3pm_jax.sampling import autoregressive_sample
  cfg = ModelConfig(vocab_size=12, max_len=16, num_layers=2, d_model=32, num_heads=2, mlp_dim=48, causal=True,
                    scan_layers=scan_layers)
  model = Transformer(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32))["params"]
  bos, batch, length = 11, 3, 10
  prompt = jnp.zeros((batch, length), jnp.int32).at[:, :2].set(jnp.array([[4, 5], [6, 7], [8, 9]]))
  given = jnp.zeros((batch, length), bool).at[:, :2].set(True)
  cached = autoregressive_sample(model, params, jax.random.PRNGKey(1), batch, length, bos,
                                 SamplerConfig(greedy=True), given, prompt)
  tokens = prompt
  for pos in range(2, length):  # greedy decoding, recomputing the whole prefix every step
    inputs = jnp.concatenate([jnp.full((batch, 1), bos), tokens[:, :-1]], axis=1)
    tokens = tokens.at[:, pos].set(jnp.argmax(model.apply({"params": params}, inputs)[:, pos, :bos], axis=-1))
  np.testing.assert_array_equal(cached, tokens)
  assert len(set(np.asarray(cached[:, 2:]).ravel().tolist())) > 1
  # The bidirectional denoiser's cache is block diffusion's (tests/test_block_diffusion.py): no slot filled yet.
  block_cache = Transformer(ModelConfig(vocab_size=12, max_len=16, num_layers=1, d_model=32, num_heads=2,
                                        mlp_dim=48)).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                                                          decode=True)["cache"]
  assert (np.asarray(block_cache["block_0"]["attention"]["slot_positions"]) == -1).all()


def test_unigram_entropy():
  from d3pm_jax.sampling import unigram_entropy
  assert unigram_entropy(np.arange(8), 8) == pytest.approx(3.0)
  assert unigram_entropy(np.zeros(10, int), 8) == 0.0
  assert unigram_entropy(np.array([0, 0, 1, 1]), 8) == pytest.approx(1.0)


def test_time_grids():
  from d3pm_jax.sampling import time_grid
  u = np.arange(9) / 8
  np.testing.assert_allclose(time_grid("uniform", 8), u, atol=1e-7)
  np.testing.assert_allclose(time_grid("md4_cosine", 8), np.cos(np.pi / 2 * (1 - u)), atol=1e-7)
  md4 = np.diff(np.asarray(time_grid("md4_cosine", 8)))
  assert np.all(md4 > 0) and md4[-1] < md4[0] / 5  # dense near t = 1
  both = np.diff(np.asarray(time_grid("cosine", 8)))
  assert both[0] == pytest.approx(both[-1], rel=1e-5) and both[0] < both[4] / 4  # dense near both ends


def test_semi_autoregressive_network_sees_the_time_of_its_masked_fraction():
  """Linear schedule: alpha(t) = eps + (1 - 2 eps)(1 - t), so a sequence with a fraction f masked matches
  t = (f - eps) / (1 - 2 eps) (clipped to [0, 1]). Each block reruns its own schedule, but the network must be
  told that time, not the block's."""
  proc = make_process("absorbing", V, get_schedule("linear"))
  eps = proc.schedule.eps
  seen = []

  def recording_fn(x_t, t_B):
    jax.debug.callback(lambda x, t: seen.append((np.asarray(x), np.asarray(t))), x_t, t_B)
    return random_logits_fn(x_t, t_B) + t_B[:, None, None]

  cfg = SamplerConfig(num_steps=4, num_blocks=3)
  sample(proc, recording_fn, jax.random.PRNGKey(0), 2, 12, cfg)
  assert len(seen) == 12
  block_times = set()
  for x_t, t_B in seen:
    frac = (x_t == proc.mask_id).mean(axis=1)
    np.testing.assert_allclose(t_B, np.clip((frac - eps) / (1 - 2 * eps), 0, 1), atol=1e-6)
    block_times.add(round(float(t_B[0]), 6))
  assert len(block_times) > 4
  with pytest.raises(ValueError, match="length 10 must be divisible by num_blocks=3"):
    sample(proc, recording_fn, jax.random.PRNGKey(0), 2, 10, cfg)


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_the_sampler_steps_through_the_chosen_time_grid(grid):
  """SamplerConfig(time_grid=...) reaches the sampler: the denoiser is called at t = 1 and then at each earlier
  point of the grid, u = k / 8 mapped through (1 - cos(pi u)) / 2 for the cosine grid."""
  proc = build("absorbing")
  seen = []

  def recording_fn(x_t, t_B):
    jax.debug.callback(lambda t: seen.append(float(np.asarray(t)[0])), t_B)
    return random_logits_fn(x_t, t_B)

  cfg = SamplerConfig(num_steps=8, time_grid=grid)
  jax.block_until_ready(sample(proc, recording_fn, jax.random.PRNGKey(0), 2, 5, cfg)[0])
  u = np.arange(8, 0, -1) / 8
  expected = u if grid == "uniform" else (1 - np.cos(np.pi * u)) / 2
  np.testing.assert_allclose(seen, expected, atol=1e-6)
