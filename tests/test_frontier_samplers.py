"""The frontier samplers: predictor-corrector remasking, first-hitting and threshold decoding, against exact oracles.

The enumerable toy: 3 tokens, L = 4, a random joint over the 81 sequences, and its exact denoiser (each position's
posterior p(x_0^n | x_t), enumerated for any process)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax import get_schedule, make_process
from d3pm_jax.sampling import SamplerConfig, sample, sample_with_nfe
from test_sampler_knobs import chi_square_pvalue
from test_sampling import build, random_logits_fn

K, L = 3, 4
SEQS = np.array(np.meshgrid(*[np.arange(K)] * L, indexing="ij")).reshape(L, -1).T  # [81, 4]
JOINT = np.random.default_rng(0).dirichlet(np.full(len(SEQS), 0.3))


def exact_denoiser(process):
  """log p(x_0^n | x_t) of the toy's joint for every position: the sequences weighted by q(x_t | x_0)."""
  seqs, joint = jnp.asarray(SEQS), jnp.asarray(JOINT)

  def logits_fn(x_t_BxL, t_B):
    column_BxLxV = process.marginal_column(x_t_BxL, t_B)  # q(x_t^n | x_0^n = j)
    likelihood_BxS = jnp.prod(jnp.take_along_axis(column_BxLxV[:, None], seqs[None, :, :, None], axis=-1)[..., 0],
                              axis=-1)
    weight_BxS = joint[None] * likelihood_BxS
    marginal = jnp.einsum("bs,snv->bnv", weight_BxS, jax.nn.one_hot(seqs, process.num_states, dtype=weight_BxS.dtype))
    return jnp.log(marginal / jnp.sum(marginal, axis=-1, keepdims=True))
  return logits_fn


def fit(draws_BxL):
  """(total variation to the joint, chi-square p-value against it, p-value against the product of the two
  halves' marginals)."""
  counts = np.bincount(np.ravel_multi_index(np.asarray(draws_BxL).T, (K,) * L), minlength=len(SEQS)).astype(float)
  halves = JOINT.reshape(K ** 2, K ** 2)
  independent = np.outer(halves.sum(1), halves.sum(0)).ravel()
  return (0.5 * np.abs(counts / counts.sum() - JOINT).sum(), chi_square_pvalue(counts, JOINT),
          chi_square_pvalue(counts, independent))


def toy(name):
  return make_process(name, K + (name == "absorbing"), get_schedule("linear"))


# ---- predictor-corrector ----

@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_kappa_one_is_the_ancestral_sampler_bit_for_bit(name):
  """remask='psi' with kappa = 1 goes through the corrector's arithmetic (ReMDM's unmasking probability with
  sigma = 0 for absorbing, the log-space mixture for the others) and draws exactly today's ancestral tokens, with a
  prompt; kappa = 0.5 draws others."""
  proc = build(name)
  batch, length = 16, 12
  prompt = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0, proc.num_data_states)
  given = jnp.broadcast_to(jnp.arange(length) < 3, (batch, length))
  run = lambda **kw: np.asarray(sample(proc, random_logits_fn, jax.random.PRNGKey(5), batch, length,
                                       SamplerConfig(num_steps=16, **kw), given, prompt)[0])
  plain = run()
  np.testing.assert_array_equal(run(remask="psi", kappa=1.0), plain)
  assert (run(remask="psi", kappa=0.5) != plain).any()


@pytest.mark.slow
@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,knobs", [("absorbing", dict(remask="cap", eta=0.01)),
                                        ("uniform", dict(remask="psi", kappa=0.9))])
def test_the_corrector_with_the_exact_denoiser_draws_the_joint(name, knobs):
  """With the exact denoiser and 200 steps, 4000 corrected samples fit the toy's joint (chi-square p > 1e-4) and
  reject the product of its halves' marginals (p < 1e-6). The total variation with kappa = 0.5 (a strong
  corrector) does not grow from 25 to 200 steps: a corrector that broke the forward marginals would add error
  at every step (measured: 0.079 -> 0.043 absorbing, 0.074 -> 0.041 uniform; sampling noise ~0.04)."""
  proc = toy(name)
  draw = lambda steps, **kw: jax.jit(lambda key: sample(proc, exact_denoiser(proc), key, 4000, L, SamplerConfig(
      num_steps=steps, precision="float64", **kw))[0])(jax.random.PRNGKey(steps))
  _, p_joint, p_independent = fit(draw(200, **knobs))
  assert p_joint > 1e-4 and p_independent < 1e-6, (p_joint, p_independent)
  few, many = (fit(draw(steps, remask="psi", kappa=0.5))[0] for steps in (25, 200))
  assert many <= few + 0.01, (few, many)


def test_remasking_happens_only_inside_the_window_and_keeps_the_masking_schedule():
  """Under the corrector decoded tokens are masked again, on steps whose t lies in [remask_off, remask_on] and on
  no other; the last step leaves nothing masked. ReMDM's step keeps the forward marginals, so the fraction still
  masked after each step stays within 0.03 of 1 - alpha(s), as without remasking (2048 positions a step)."""
  proc = build("absorbing")
  times = np.arange(20, 0, -1) / 20  # step i goes from t = times[i] to times[i] - 1/20
  alpha = np.asarray(proc.schedule.alpha(jnp.asarray(times - 0.05)))
  for on, off in ((1.0, 0.0), (0.6, 0.3)):
    cfg = SamplerConfig(num_steps=20, remask="rescale", eta=0.8, remask_on=on, remask_off=off,
                        return_trajectory=True)
    _, traj = sample(proc, random_logits_fn, jax.random.PRNGKey(0), 128, 16, cfg)
    masked = np.asarray(traj == proc.mask_id)  # [steps, B, L], after each step
    before = np.concatenate([np.ones_like(masked[:1]), masked[:-1]])
    remasked = (~before & masked).sum(axis=(1, 2))
    inside = (times >= off - 1e-9) & (times <= on + 1e-9)
    assert remasked[inside].sum() > 20 and remasked[~inside].sum() == 0, (on, off, remasked)
    assert masked[-1].sum() == 0
    np.testing.assert_allclose(masked.mean(axis=(1, 2))[:-1], 1 - alpha[:-1], atol=0.03)


def test_confidence_weighted_remasking_shares_sigma_by_softmax_of_minus_confidence():
  """ReMDM-conf: a row's decoded tokens are remasked with probabilities sigma exp(-psi) / sum exp(-psi), psi the
  token's p_theta when it was decoded. A denoiser certain of token 0 on positions 0-7 (psi ~ 1) and uniform over
  the 8 tokens on 8-15 (psi = 1/8), cap eta = 0.05 (sigma = 0.05 on every step but the last): the remaskings on
  each half, 2048 rows x 20 steps, match the sum of those probabilities over the states before each step within
  4 sd. Uniform shares would remask the certain half 2.4x as often as they should; unnormalised ones, ~5x."""
  proc = make_process("absorbing", 9, get_schedule("linear"))

  def certain_then_uncertain(x_t, t_B):
    logits = jnp.zeros(x_t.shape + (9,))
    return logits.at[:, :8, 0].set(12.0)

  cfg = SamplerConfig(num_steps=20, remask="cap", eta=0.05, remask_confidence=True, return_trajectory=True)
  x0, traj = sample(proc, certain_then_uncertain, jax.random.PRNGKey(0), 2048, 16, cfg)
  masked = np.asarray(traj == proc.mask_id)  # [steps, B, L] after each step
  before = np.concatenate([np.ones_like(masked[:1]), masked[:-1]])[:-1]  # the last step (s = 0) remasks nothing
  remasked = (~before & masked[:-1])
  certain_p = np.exp(12.0) / (np.exp(12.0) + 7)
  share = np.where(~before, np.exp(-np.where(np.arange(16) < 8, certain_p, 1 / 8)), 0.0)
  expected = 0.05 * share / np.maximum(share.sum(axis=2, keepdims=True), 1e-30)
  for half in (slice(0, 8), slice(8, 16)):
    want, got = expected[..., half].sum(), remasked[..., half].sum()
    assert abs(got - want) < 4 * np.sqrt(want), (half, got, want)
  assert not masked[-1].any() and (np.asarray(x0)[:, :8] == 0).mean() > 0.99


def test_the_cap_binds_where_eta_exceeds_sigma_max_and_the_masking_schedule_holds():
  """remask='cap' with eta = 0.5 under the linear schedule: sigma_max = min(1, (1 - alpha(s)) / alpha(t)), the
  largest remasking that the forward marginals allow, falls below eta on the steps from t <= 0.35 (20 steps), so
  the cap binds there. On every step the share of decoded tokens masked again is min(eta, sigma_max) (within 4 sd
  of its binomial noise, 1024 rows of 16), and after every step the masked fraction is 1 - alpha(s) within 0.02.
  Mutation: sigma = eta without the cap (remasks half the decoded tokens where sigma_max is 0.1, and every masked
  token unmasks since its probability passes 1: the masked fraction reaches ~0.45 where 0.05 is due)."""
  proc = make_process("absorbing", 9, get_schedule("linear"))
  steps, eta = 20, 0.5
  cfg = SamplerConfig(num_steps=steps, remask="cap", eta=eta, return_trajectory=True)
  _, traj = jax.jit(lambda key: sample(proc, random_logits_fn_v9, key, 1024, 16, cfg))(jax.random.PRNGKey(0))
  t = np.arange(steps, 0, -1) / steps  # step i goes from t[i] to s[i]
  s = t - 1.0 / steps
  alpha_t, alpha_s = (np.asarray(proc.schedule.alpha(jnp.asarray(x)), np.float64) for x in (t, s))
  sigma_max = np.minimum(1.0, (1.0 - alpha_s) / alpha_t)
  binds = sigma_max < eta
  assert binds[:-1].sum() >= 5 and (~binds[:-1]).sum() >= 5, sigma_max
  masked = np.asarray(traj == proc.mask_id)  # [steps, B, L] after each step
  before = np.concatenate([np.ones_like(masked[:1]), masked[:-1]])
  decoded = (~before).sum(axis=(1, 2))[:-1]  # the last step (s = 0) remasks nothing
  remasked = (~before & masked).sum(axis=(1, 2))[:-1]
  sigma = np.minimum(eta, sigma_max)[:-1]
  usable = decoded > 0
  noise = np.sqrt(decoded * sigma * (1 - sigma))[usable]
  np.testing.assert_array_less(np.abs(remasked - decoded * sigma)[usable], 4 * noise + 1, err_msg=str(
      np.round(remasked[usable] / decoded[usable], 3)))
  np.testing.assert_allclose(masked.mean(axis=(1, 2)), 1 - alpha_s, atol=0.02)


def random_logits_fn_v9(x_t, t_B):
  table = jax.random.normal(jax.random.PRNGKey(0), (9, 9)) * 2.0
  return table[x_t] + jnp.roll(table[x_t], 1, axis=1) * 0.5


@pytest.mark.usefixtures("x64")
def test_the_loop_holds_alpha_inside_the_window_and_draws_the_joint():
  """ReMDM-loop: decoded to alpha_on = 0.5 by t_on = 0.6, alpha is held while t lies in [0.2, 0.6], where the
  corrector alone moves tokens, and the rest is decoded after. (a) With the exact denoiser, 200 steps: 4000 draws
  lie within total variation 0.065 of the toy's joint (measured 0.037-0.045; sampling noise alone ~0.04) and
  reject the product of its halves. Not a chi-square fit: a held step that unmasks two tokens draws them
  independently, at a rate per step that more steps do not shrink, so the loop is biased at finite eta
  (p-values 1e-5 to 0.4 over seeds at 400 steps). (b) 40 steps on the
  random stand-in: after each held step the masked fraction stays within 0.03 of 1 - alpha_on (without holding,
  it would fall from 0.55 to 0.15), tokens are remasked there, and the network is told a time with
  alpha = alpha_on on every held step."""
  proc = toy("absorbing")
  cfg = dict(remask="cap", eta=0.1, alpha_on=0.5, remask_on=0.6, remask_off=0.2)
  draw = jax.jit(lambda key: sample(proc, exact_denoiser(proc), key, 4000, L, SamplerConfig(
      num_steps=200, precision="float64", **cfg))[0])
  tv, _, p_independent = fit(draw(jax.random.PRNGKey(3)))
  assert tv < 0.065 and p_independent < 1e-6, (tv, p_independent)

  proc = build("absorbing")
  told = []

  def recording(x_t, t_B):
    jax.debug.callback(lambda t: told.append(float(t[0])), t_B)
    return random_logits_fn(x_t, t_B)

  _, traj = sample(proc, recording, jax.random.PRNGKey(0), 128, 16,
                   SamplerConfig(num_steps=40, return_trajectory=True, **cfg))
  times = np.arange(40, 0, -1) / 40  # step i goes from times[i] to times[i] - 1/40
  held = (times <= 0.6 + 1e-9) & (times - 1 / 40 >= 0.2 - 1e-9)
  masked = np.asarray(traj == proc.mask_id)
  np.testing.assert_allclose(masked.mean(axis=(1, 2))[held], 0.5, atol=0.03)
  before = np.concatenate([np.ones_like(masked[:1]), masked[:-1]])
  assert (~before & masked)[held].sum() > 50 and not masked[-1].any()
  np.testing.assert_allclose(np.asarray(proc.schedule.alpha(jnp.asarray(told)))[held], 0.5, atol=1e-6)


# ---- first-hitting ----

@pytest.mark.usefixtures("x64")
def test_first_hitting_draws_the_exact_joint_with_one_call_per_position():
  """One position unmasks per network call, so with the exact denoiser the sampler is exact: 8000 draws fit the
  joint (chi-square p > 1e-4), reject the product of the halves' marginals, and every sample cost L calls. With a
  prompt of 1-3 positions per sample, each sample is charged its own free positions, and the network is called
  only while some sample still has one."""
  proc = toy("absorbing")
  calls = []
  denoiser = exact_denoiser(proc)

  def counted(x_t, t_B):
    jax.debug.callback(lambda: calls.append(1))
    return denoiser(x_t, t_B)

  cfg = SamplerConfig(strategy="first_hitting", precision="float64")
  x0, nfe = jax.jit(lambda key: sample_with_nfe(proc, counted, key, 8000, L, cfg))(jax.random.PRNGKey(0))
  _, p_joint, p_independent = fit(x0)
  assert p_joint > 1e-4 and p_independent < 1e-6, (p_joint, p_independent)
  assert (np.asarray(nfe) == L).all() and len(calls) == L
  calls.clear()
  given = jnp.asarray([[True, False, False, False], [True, True, False, False], [True, True, True, False]] * 4)
  prompt = jnp.zeros((12, L), jnp.int32)
  x0, nfe = sample_with_nfe(proc, counted, jax.random.PRNGKey(1), 12, L, cfg, given, prompt)
  np.testing.assert_array_equal(np.asarray(nfe), L - np.asarray(given).sum(1))
  assert len(calls) == 3 and (np.asarray(x0)[np.asarray(given)] == 0).all() and int(x0.max()) < K


def test_first_hitting_calls_the_network_at_the_order_statistics_of_the_masking_times():
  """Under the linear schedule each position's masking time is U(0, 1), so the k-th unmasking (counting from
  t = 1) happens at the (L + 1 - k)-th of L uniform order statistics, whose mean is (L + 1 - k) / (L + 1). The
  times the network is given, over 4000 samples of L = 8, have those means (standard errors ~0.002)."""
  length, batch = 8, 4000
  proc = make_process("absorbing", 5, get_schedule("linear"))
  seen = []

  def recording(x_t, t_B):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), t_B)
    return jnp.zeros(x_t.shape + (5,))

  sample(proc, recording, jax.random.PRNGKey(0), batch, length, SamplerConfig(strategy="first_hitting"))
  means = np.asarray(seen).mean(axis=1)
  np.testing.assert_allclose(means, (length - np.arange(length)) / (length + 1), atol=0.01)


def test_first_hitting_unmasks_a_position_uniform_among_the_masked_ones():
  """An exact time-agnostic denoiser gives the exact joint in any order, so the joint alone cannot tell which
  position is decoded. ``count_logits_fn`` (greedy) writes at each position the number decoded before it, so the
  tokens spell the order: over 4000 samples of L = 8 the first position decoded and the last one are each uniform
  over the row (chi-square p > 1e-3; binomial sd of each cell's share ~0.5%), and position 0 comes before
  position L - 1 in half of them (within 4 sd). Mutation: unmasking the leftmost masked position (the first is
  position 0 in every sample: p ~ 0)."""
  length, batch = 8, 4000
  proc = make_process("absorbing", length + 2, get_schedule("linear"))  # tokens 0..L, mask L + 1
  cfg = SamplerConfig(strategy="first_hitting", greedy=True)
  x0 = np.asarray(jax.jit(lambda key: sample(proc, count_logits_fn, key, batch, length, cfg)[0])(
      jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(np.sort(x0, axis=1), np.broadcast_to(np.arange(length), (batch, length)))
  for which in (np.argmin, np.argmax):  # the position decoded first, and last
    counts = np.bincount(which(x0, axis=1), minlength=length).astype(float)
    assert chi_square_pvalue(counts, np.full(length, 1.0 / length)) > 1e-3, (which.__name__, counts)
  before = np.mean(x0[:, 0] < x0[:, -1])
  assert abs(before - 0.5) < 4 * np.sqrt(0.25 / batch), before


# ---- threshold decoding ----

@pytest.mark.parametrize("blocks", [1, 2])
def test_threshold_above_every_confidence_is_confidence_decoding_one_token_a_step(blocks):
  """tau = 1.5 (above every probability) unmasks only the most confident proposal per step: the tokens equal the
  confidence strategy's at one step per position (one token a step under the linear schedule) for the same key,
  also in semi-autoregressive blocks, and each sample costs one call per position."""
  proc = make_process("absorbing", 7, get_schedule("linear"))
  batch, length = 8, 16
  want, _ = sample(proc, random_logits_fn_v7, jax.random.PRNGKey(2), batch, length,
                   SamplerConfig(num_steps=length // blocks, strategy="confidence", num_blocks=blocks))
  got, nfe = sample_with_nfe(proc, random_logits_fn_v7, jax.random.PRNGKey(2), batch, length,
                             SamplerConfig(strategy="threshold", threshold=1.5, num_blocks=blocks))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.asarray(nfe) == length).all()


def random_logits_fn_v7(x_t, t_B):
  table = jax.random.normal(jax.random.PRNGKey(0), (7, 7)) * 2.0
  return table[x_t] + jnp.roll(table[x_t], 1, axis=1) * 0.5 + jnp.arange(x_t.shape[-1])[:, None] * 0.1


def test_threshold_zero_decodes_everything_in_one_call_and_a_middle_one_in_between():
  """tau = 0 decodes every free position on the first call (per block); tau = 0.5 takes between one call and one
  per position, keeps the prompt, and leaves no mask."""
  proc = make_process("absorbing", 7, get_schedule("linear"))
  batch, length = 8, 16
  prompt = jnp.full((batch, length), 3, jnp.int32)
  given = jnp.broadcast_to(jnp.arange(length) < 4, (batch, length))
  for blocks in (1, 2):
    x0, nfe = sample_with_nfe(proc, random_logits_fn_v7, jax.random.PRNGKey(0), batch, length,
                              SamplerConfig(strategy="threshold", threshold=0.0, num_blocks=blocks), given, prompt)
    assert (np.asarray(nfe) == blocks).all() and int(x0.max()) < 6
  x0, nfe = sample_with_nfe(proc, random_logits_fn_v7, jax.random.PRNGKey(0), batch, length,
                            SamplerConfig(strategy="threshold", threshold=0.5), given, prompt)
  nfe = np.asarray(nfe)
  assert (nfe >= 1).all() and (nfe < length - 4).all() and nfe.max() > 1, nfe
  assert int(x0.max()) < 6 and (np.asarray(x0)[:, :4] == 3).all()


def count_logits_fn(x_t, t_B):
  """Every position proposes the number of positions decoded so far (greedy), more surely the further right it
  stands: the decoded tokens spell the order of decoding, and pure confidence order is right to left."""
  length = x_t.shape[1]
  decoded_B = jnp.sum(x_t != length + 1, axis=1)
  one_hot = jax.nn.one_hot(decoded_B, length + 2)[:, None, :]
  return one_hot * (1.0 + jnp.arange(length))[None, :, None]


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_rank_noise_moves_the_decoding_order_from_confidence_to_uniform(strategy):
  """One token a step (tau above every confidence; the confidence strategy at one step per position) with greedy
  proposals from ``count_logits_fn``: without rank noise the order is right to left in every sample; with noise
  far above the log-confidence gaps, the first position decoded is uniform over the row (chi-square), and every
  sample still decodes one position per step."""
  length, batch = 8, 4000
  proc = make_process("absorbing", length + 2, get_schedule("linear"))  # tokens 0..L, mask L + 1
  cfg = SamplerConfig(strategy=strategy, threshold=1.5, num_steps=length, greedy=True)
  x0, _ = sample(proc, count_logits_fn, jax.random.PRNGKey(0), 16, length, cfg)
  np.testing.assert_array_equal(np.asarray(x0), np.broadcast_to(np.arange(length)[::-1], (16, length)))
  noisy = dataclasses.replace(cfg, rank_noise=1e3)
  x0 = np.asarray(sample(proc, count_logits_fn, jax.random.PRNGKey(1), batch, length, noisy)[0])
  np.testing.assert_array_equal(np.sort(x0, axis=1), np.broadcast_to(np.arange(length), (batch, length)))
  first = np.bincount(np.argmin(x0, axis=1), minlength=length).astype(float)
  assert chi_square_pvalue(first, np.full(length, 1.0 / length)) > 1e-3, first


def test_rank_noise_leaves_the_threshold_on_the_clean_confidence():
  """Positions 0..k-1 are sure (p 0.99 > tau), the rest are not: the first step decodes all k and the one the
  noisy ranking picks, then one a step, so NFE is L - k + 1 when the pick was a sure one and L - k otherwise. Noise
  in the threshold test itself would leave sure positions masked and cost more calls."""
  length, sure, batch = 12, 5, 256
  proc = make_process("absorbing", 10, get_schedule("linear"))
  peak = jnp.log(99.0 * 8)  # p = 0.99 on token 0 against 8 others sharing 0.01 (the mask is excluded)

  def logits_fn(x_t, t_B):
    logits = jnp.zeros((length, 10)).at[:sure, 0].set(peak)
    return jnp.broadcast_to(logits, x_t.shape + (10,))

  counts = {}
  for noise in (0.0, 1e3):
    _, nfe = sample_with_nfe(proc, logits_fn, jax.random.PRNGKey(3), batch, length,
                             SamplerConfig(strategy="threshold", threshold=0.9, greedy=True, rank_noise=noise))
    counts[noise] = np.bincount(np.asarray(nfe), minlength=length + 1)
  assert counts[0.0][length - sure + 1] == batch, counts  # the surest is a sure one: it costs a step of its own
  assert counts[1e3][length - sure:].sum() == batch, counts[1e3]
  assert counts[1e3][length - sure] > batch // 3, counts[1e3]  # P(pick unsure) = 7/12


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank_noise=-1.0, strategy="threshold"), "rank_noise must be >= 0"),
    (dict(rank_noise=float("inf"), strategy="confidence"), "rank_noise must be >= 0 and finite"),
    (dict(rank_noise=0.5), "perturbs the confidence ranking.*strategy='ancestral'"),
    (dict(threshold=-0.1), "threshold must be >= 0"),
    (dict(kappa=1.5, remask="psi"), r"kappa must lie in \[0, 1\]"),
    (dict(eta=2.0, remask="cap"), r"eta must lie in \[0, 1\]"),
    (dict(remask="sometimes"), r"remasking 'sometimes'.*\['cap', 'none', 'psi', 'rescale'\]"),
    (dict(remask_on=0.2, remask_off=0.5, remask="psi"), "remask_off < remask_on"),
    (dict(remask="psi", strategy="confidence"), "corrects ancestral steps"),
    (dict(strategy="first_hitting", return_trajectory=True), "no fixed grid"),
    (dict(remask_confidence=True), "shape a corrector's remasking"),
    (dict(alpha_on=0.5, remask="cap"), "needs remask_on < 1"),
    (dict(alpha_on=1.0, remask="cap", remask_on=0.5), r"alpha_on must lie in \[0, 1\)"),
])
def test_bad_sampler_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplerConfig(**kwargs)


@pytest.mark.parametrize("knobs", [dict(strategy="first_hitting"), dict(strategy="threshold"),
                                   dict(remask="cap", eta=0.1),
                                   dict(remask="psi", kappa=0.5, remask_confidence=True),
                                   dict(remask="psi", kappa=0.5, alpha_on=0.5, remask_on=0.5)])
def test_absorbing_only_samplers_refuse_other_processes(knobs):
  with pytest.raises(ValueError, match="absorbing process; got UniformProcess"):
    sample(build("uniform"), random_logits_fn, jax.random.PRNGKey(0), 2, 4, SamplerConfig(**knobs))
