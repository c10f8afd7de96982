"""Processes: closed forms against dense expm references, Bayes by brute force, sampling frequencies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from d3pm_jax import get_schedule, make_process
from d3pm_jax.processes import AbsorbingProcess, NearestNeighborProcess, UniformProcess, knn_graph

pytestmark = pytest.mark.usefixtures("x64")

V = 6
TIMES = [(0.1, 0.4), (0.35, 0.36), (0.5, 0.95)]


def nn_embeddings(num=V, dim=3, seed=0):
  return np.random.default_rng(seed).normal(size=(num, dim))


def build(name, schedule="cosine", **kwargs):
  if name == "nearest_neighbor":
    kwargs = dict(embeddings=nn_embeddings(), k=2, rate_scale=4.0, **kwargs)
  return make_process(name, V, get_schedule(schedule), **kwargs)


PROCESS_NAMES = ["absorbing", "uniform", "nearest_neighbor"]


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_dense_matrices_are_stochastic_and_chapman_kolmogorov(name):
  proc = build(name)
  np.testing.assert_allclose(proc.rate_matrix().sum(axis=1), 0.0, atol=1e-12)
  for s, t in TIMES:
    q_s, q_t, q_st = proc.dense_marginal(s), proc.dense_marginal(t), proc.dense_transition(s, t)
    for mat in (q_s, q_t, q_st):
      np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)
      assert float(mat.min()) >= -1e-12
    np.testing.assert_allclose(q_s @ q_st, q_t, atol=1e-12)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_identity_at_time_zero(name):
  nn_kwargs = dict(embeddings=nn_embeddings(), k=2) if name == "nearest_neighbor" else {}
  # Uniformisation needs a finite total rate tau(1) = -log eps, so nearest-neighbour refuses eps = 0 and is
  # checked at eps = 1e-15, which is the identity to ~1e-15 at t = 0.
  if name == "nearest_neighbor":
    with pytest.raises(ValueError, match="needs a schedule with eps > 0"):
      make_process(name, V, get_schedule("cosine", eps=0.0), **nn_kwargs)
  exact = make_process(name, V, get_schedule("cosine", eps=1e-15 if nn_kwargs else 0.0), **nn_kwargs)
  np.testing.assert_allclose(exact.dense_marginal(0.0), np.eye(V), atol=1e-12)
  np.testing.assert_allclose(exact.marginal(jnp.eye(V), 0.0), np.eye(V), atol=1e-12)
  # With the default eps the process starts near the identity: it has left each state with probability at most
  # tau(0) times that state's exit rate.
  proc = build(name)
  exit_rate = -np.diag(np.asarray(proc.rate_matrix())).min()
  bound = float(proc.schedule.tau(0.0)) * exit_rate
  assert 0 < np.abs(np.asarray(proc.dense_marginal(0.0)) - np.eye(V)).max() <= bound * (1 + 1e-9)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_matrix_free_equals_dense(name):
  proc = build(name)
  probs_NxV = jax.random.dirichlet(jax.random.PRNGKey(0), jnp.ones(V), (4,))
  states = jnp.arange(V)
  for s, t in TIMES:
    q_t, q_st = proc.dense_marginal(t), proc.dense_transition(s, t)
    np.testing.assert_allclose(proc.marginal(jnp.eye(V), t), q_t, atol=1e-12)
    np.testing.assert_allclose(proc.marginal(probs_NxV, t), probs_NxV @ q_t, atol=1e-12)
    np.testing.assert_allclose(proc.marginal_column(states, t), q_t.T, atol=1e-12)
    np.testing.assert_allclose(proc.transition_column(states, s, t), q_st.T, atol=1e-12)
  np.testing.assert_allclose(proc.rate_column(states), proc.rate_matrix().T, atol=1e-15)
  # Per-position times broadcast against the leading dims: t_B against x_BxL.
  t_B = jnp.array([0.2, 0.7])
  x_BxL = jnp.array([[0, 1, 2], [3, 4, 5]])
  cols = proc.marginal_column(x_BxL, t_B)
  for b in range(2):
    np.testing.assert_allclose(cols[b], proc.dense_marginal(t_B[b])[:, x_BxL[b]].T, atol=1e-12)


def brute_force_posterior(proc, x0_probs_V, x_t, s, t):
  """sum_{x_0} p(x_0) q(x_s | x_t, x_0) by Bayes' rule on the dense matrices; impossible x_0 dropped."""
  q_s, q_t, q_st = map(np.asarray, (proc.dense_marginal(s), proc.dense_marginal(t), proc.dense_transition(s, t)))
  out = np.zeros(V)
  weight = 0.0
  for x0 in range(V):
    if x0_probs_V[x0] == 0 or q_t[x0, x_t] == 0:
      continue
    out += x0_probs_V[x0] * q_s[x0, :] * q_st[:, x_t] / q_t[x0, x_t]
    weight += x0_probs_V[x0]
  return out / weight if weight > 0 else np.full(V, np.nan)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_posterior_equals_bayes_rule(name):
  proc = build(name)
  rng = np.random.default_rng(1)
  data_states = proc.num_data_states
  for s, t in TIMES:
    for x_t in range(V):
      soft = np.zeros(V)
      soft[:data_states] = rng.dirichlet(np.ones(data_states))
      for x0_probs in [np.eye(V)[x] for x in range(data_states)] + [soft]:
        expected = brute_force_posterior(proc, x0_probs, x_t, s, t)
        if not np.isfinite(expected).all():  # x_t impossible under this one-hot x_0
          continue
        got = np.exp(proc.posterior_logits(jnp.asarray(x0_probs), jnp.asarray(x_t), s, t))
        np.testing.assert_allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_sample_marginal_frequencies_match_marginal(name):
  proc = build(name)
  num = 20000
  for x0, t in [(0, 0.3), (2, 0.8)]:
    samples = proc.sample_marginal(jax.random.PRNGKey(x0), jnp.full((num,), x0), t)
    counts = np.bincount(np.asarray(samples), minlength=V)
    expected = np.asarray(proc.marginal(jax.nn.one_hot(x0, V), t)) * num
    keep = expected > 5
    assert counts[~keep].sum() <= max(10, 3 * expected[~keep].sum())
    stat = scipy.stats.chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum())
    assert stat.pvalue > 1e-3, (name, x0, t, counts, expected)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_stationary_is_fixed_by_the_rates(name):
  proc = build(name)
  np.testing.assert_allclose(proc.stationary() @ proc.rate_matrix(), 0.0, atol=1e-12)
  np.testing.assert_allclose(proc.stationary() @ proc.dense_marginal(0.7), proc.stationary(), atol=1e-12)
  assert float(proc.stationary().sum()) == pytest.approx(1.0)


def test_absorbing_and_uniform_closed_forms_by_hand():
  sched = get_schedule("linear")
  alpha = float(sched.alpha(0.25))
  absorbing = AbsorbingProcess(vocab_size=4, schedule=sched)
  np.testing.assert_allclose(absorbing.marginal(jax.nn.one_hot(1, 4), 0.25), [0, alpha, 0, 1 - alpha], atol=1e-15)
  uniform = UniformProcess(vocab_size=4, schedule=sched)
  np.testing.assert_allclose(uniform.marginal(jax.nn.one_hot(1, 4), 0.25),
                             np.full(4, (1 - alpha) / 4) + alpha * np.eye(4)[1], atol=1e-15)


@pytest.mark.parametrize("cls", [AbsorbingProcess, UniformProcess])
def test_large_vocab_sampling_never_builds_a_vocab_axis(cls):
  vocab = 50257
  proc = cls(vocab_size=vocab, schedule=get_schedule("linear"))
  x0 = jnp.zeros((4, 128), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda k, x, t: proc.sample_marginal(k, x, t))(jax.random.PRNGKey(0), x0, jnp.ones(4) / 2)
  shapes = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars]
  assert shapes and not any(vocab in shape for shape in shapes), shapes
  # marginal / columns build [..., V] but never [..., V, V].
  jaxpr = jax.make_jaxpr(lambda x, t: proc.marginal_column(x, t))(x0, jnp.ones(4) / 2)
  assert not any(shape.count(vocab) > 1 for eqn in jaxpr.eqns for shape in [v.aval.shape for v in eqn.outvars])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_absorbing_prior_kl_is_the_dense_kl_without_a_vocab_axis(schedule):
  """The absorbing process's closed-form prior KL (alpha(1) log K) equals the generic one computed from the dense
  ``[..., V]`` marginals for every data token, and at GPT-2's vocabulary it builds no vocabulary axis (it is in
  every masked train step). Mutation: log V for log K, or the KL of the uniform prior."""
  proc = build("absorbing", schedule)
  x0 = jnp.arange(V - 1)[None, :].repeat(3, axis=0)
  generic = super(AbsorbingProcess, proc).prior_kl(x0)
  np.testing.assert_allclose(proc.prior_kl(x0), generic, rtol=1e-12, atol=1e-15)
  large = AbsorbingProcess(vocab_size=50258, schedule=get_schedule(schedule))
  jaxpr = jax.make_jaxpr(large.prior_kl)(jnp.zeros((4, 128), jnp.int32))
  assert not any(50258 in v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars)


# ---------------------------------------------------------------- nearest neighbour

def test_nn_neighbours_are_the_true_k_nearest():
  # Points on a line at known positions: neighbours can be read off by hand.
  pos = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 10.5])[:, None]
  np.testing.assert_array_equal(knn_graph(pos, 1), [[1], [0], [1], [2], [5], [4]])
  np.testing.assert_array_equal(knn_graph(pos, 2), [[1, 2], [0, 2], [1, 0], [2, 4], [5, 3], [4, 3]])
  # Cosine metric ignores the norm: directions at 0, 10, 20 and 90 degrees.
  angles = np.deg2rad([0.0, 10.0, 20.0, 90.0])
  dirs = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1.0], [5.0], [0.1], [3.0]])
  np.testing.assert_array_equal(knn_graph(dirs, 1, "cosine")[:, 0], [1, 0, 1, 2])


def test_nn_rates_symmetric_zero_rows_uniform_stationary():
  proc = NearestNeighborProcess.from_embeddings(nn_embeddings(10, 4, seed=3), 3, get_schedule("linear"),
                                                rate_scale=5.0)
  rates = np.asarray(proc.rate_matrix())
  np.testing.assert_allclose(rates, rates.T, atol=0)
  np.testing.assert_allclose(rates.sum(axis=1), 0, atol=1e-14)
  off_diagonal = rates - np.diag(np.diag(rates))
  assert off_diagonal.min() >= 0
  neighbours = knn_graph(nn_embeddings(10, 4, seed=3), 3)
  for i in range(10):  # rates are positive exactly on the symmetrised k-NN edges
    linked = set(neighbours[i]) | {j for j in range(10) if i in neighbours[j]}
    assert set(np.flatnonzero(off_diagonal[i])) == linked
  np.testing.assert_allclose(proc.stationary(), np.full(10, 0.1))
  np.testing.assert_allclose(np.ones(10) / 10 @ np.asarray(proc.dense_marginal(0.6)), np.full(10, 0.1), atol=1e-12)
  assert proc.num_components == 1 and proc.spectral_gap > 0


def test_nn_disconnected_graph_is_refused_unless_uniform_rate():
  clusters = np.array([[0.0], [0.1], [5.0], [5.1]])  # k = 1 links only within each pair
  with pytest.raises(ValueError, match="2 connected components.*uniform_rate"):
    NearestNeighborProcess.from_embeddings(clusters, 1, get_schedule("linear"))
  with pytest.warns(UserWarning, match="mixes poorly"):
    mixed = NearestNeighborProcess.from_embeddings(clusters, 1, get_schedule("linear"), uniform_rate=0.01)
  assert mixed.num_components == 2 and mixed.spectral_gap > 0
  q1 = np.asarray(mixed.dense_marginal(1.0))
  assert q1[0, 2] > 0  # the uniform rate carries mass across components
  # The prior term reports how far q(x_1 | x_0) stays from the prior.
  assert float(mixed.prior_kl(jnp.array(0))) > 0.01


def test_nn_at_a_large_vocabulary_is_refused_before_any_work(monkeypatch):
  """D3PM's LM1B vocabulary (V = 8192, rate scale 4, eps 1e-4) would need ~46 GB of powers: refused at once (a
  table of zeros: the check runs before the k-NN search), naming V, the size and the settings that shrink it. The
  size is the one the construction builds: at V = 48 under a limit just below its stack it is refused, just above
  it built. Mutation: estimating the terms from a smaller rate than the construction uses."""
  from d3pm_jax.processes import nearest_neighbor
  schedule = get_schedule("linear", eps=1e-4)
  with pytest.raises(ValueError, match=r"V=8192 tokens would store \d+ dense V x V powers .*4[0-9]\.\d GiB.*"
                                       r"nn_rate_scale, now 4.0.*process.eps, now 0.0001"):
    NearestNeighborProcess.from_embeddings(np.zeros((8192, 2)), 8, schedule, rate_scale=4.0, uniform_rate=0.1)
  table = np.random.default_rng(0).normal(size=(48, 3))
  built = NearestNeighborProcess.from_embeddings(table, 4, schedule, rate_scale=4.0, uniform_rate=0.1)
  size = built.powers_KxVxV.size * 8
  monkeypatch.setattr(nearest_neighbor, "MAX_POWERS_BYTES", size - 1)
  with pytest.raises(ValueError, match="V=48 tokens would store"):
    NearestNeighborProcess.from_embeddings(table, 4, schedule, rate_scale=4.0, uniform_rate=0.1)
  monkeypatch.setattr(nearest_neighbor, "MAX_POWERS_BYTES", size)
  NearestNeighborProcess.from_embeddings(table, 4, schedule, rate_scale=4.0, uniform_rate=0.1)


def test_nn_from_npy_path(tmp_path):
  path = tmp_path / "emb.npy"
  np.save(path, nn_embeddings())
  from_path = make_process("nearest_neighbor", V, "linear", embeddings=str(path), k=2, rate_scale=4.0)
  from_array = build("nearest_neighbor", schedule="linear")
  np.testing.assert_allclose(from_path.rate_matrix(), from_array.rate_matrix())


def test_nn_is_a_pytree_usable_under_jit():
  proc = build("nearest_neighbor")
  f = jax.jit(lambda p, x: p.marginal_column(x, 0.5))
  np.testing.assert_allclose(f(proc, jnp.arange(V)), proc.dense_marginal(0.5).T, atol=1e-12)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,match", [
    (lambda: make_process("gaussian", 8), "unknown process 'gaussian'; valid: \\['absorbing'"),
    (lambda: make_process("uniform", 8, "nope"), "unknown schedule 'nope'"),
    (lambda: make_process("uniform", 8, foo=1), "takes no options"),
    (lambda: make_process("nearest_neighbor", 8), "needs \\['embeddings', 'k'\\]"),
    (lambda: make_process("nearest_neighbor", 6, embeddings=nn_embeddings(), k=6), "1 <= k < V = 6; got k=6"),
    (lambda: make_process("nearest_neighbor", 7, embeddings=nn_embeddings(), k=2, rate_scale=4.0),
     "6 rows but vocab_size is 7"),
    (lambda: make_process("nearest_neighbor", 6, embeddings="/nonexistent.npy", k=2), "does not exist"),
    (lambda: knn_graph(nn_embeddings(), 2, "manhattan"), "unknown metric 'manhattan'"),
    (lambda: build("uniform").marginal(jnp.eye(V), 1.2), r"t must lie in \[0, 1\]"),
    (lambda: build("uniform").sample_marginal(jax.random.PRNGKey(0), jnp.array([0, 6]), 0.5),
     r"\[6\] outside the valid range \[0, 6\)"),
    (lambda: build("absorbing").sample_marginal(jax.random.PRNGKey(0), jnp.array([5]), 0.5),
     r"\[5\] outside the valid range \[0, 5\)"),
    (lambda: build("absorbing").marginal_column(jnp.array([-1]), 0.5), "outside the valid range"),
    (lambda: build("absorbing").prior_kl(jnp.array([1.5])), "integer data token ids"),
])
def test_bad_input_raises_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
