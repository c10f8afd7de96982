"""The fused output head + weighted cross-entropy (pallas_kernels/fused_ce.py): the tiled twin and the Pallas
kernels (interpreted on the CPU) against the naive reference, inside the model's masked ELBO and AR loss against
the unfused head, skipping zero-weight rows, and lowering for CUDA.

Tolerances. float32: the three differ only in the order of the O(V)-term sums of the log-sum-exp and of the
gradients' matmuls, so they agree to a few float32 ulps of the largest value (measured <= 3e-7 relative); 1e-5
relative catches any wrong term (a missed tile, a wrong column mask or target) by orders of magnitude. bfloat16
inputs are upcast to float32 inside every implementation, so values agree as in float32; the gradients are
rounded back to bfloat16, where two float32 values a few ulps apart can round one bfloat16 ulp (2^-8) apart:
2^-7 of the largest gradient.

The interpreter fills a kernel's outputs with NaN before the kernel runs (``test_the_interpreter_poisons_outputs``
checks it), so an element a kernel fails to write shows as NaN here.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from d3pm_jax.config import from_config
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import checkpoints, state
from pallas_kernels import fused_ce

from test_train import experiment, load_config

CASES = [  # (N, D, V, num_classes, exclude): sizes that are and are not multiples of the blocks
    (70, 48, 300, 295, 7),
    (37, 8, 5, 5, None),
    (64, 32, 256, 256, 255),
    (1, 20, 130, 129, 0),
]


def _inputs(seed, n, d, v, num_classes, dtype):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 3.0, dtype)
  targets = jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)
  weights = jnp.asarray(rng.random(n) * (rng.random(n) < 0.7), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=n), jnp.float32)
  return h, w, targets, weights, cotangent


def _impl(name):
  if name == "tiled":
    return functools.partial(fused_ce.weighted_ce_tiled, tile_v=64)
  # Two vocabulary splits and backward chunks of 32 rows: the splits' partial log-sum-exps are combined, and
  # several chunks accumulate dW.
  return functools.partial(fused_ce.weighted_ce_pallas, interpret=True, block_n=16, tile_v=64, chunk_d=16,
                           splits=2, chunk_rows=32)


def _targets_avoid(targets, exclude, num_classes):
  return targets if exclude is None else jnp.where(targets == exclude, (exclude + 1) % num_classes, targets)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["tiled", "pallas"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_values_and_gradients_equal_the_reference(impl, dtype, case):
  n, d, v, num_classes, exclude = CASES[case]
  h, w, targets, weights, cotangent = _inputs(1000 * case + (impl == "pallas") * 7 + (dtype == jnp.bfloat16),
                                              n, d, v, num_classes, dtype)
  targets = _targets_avoid(targets, exclude, num_classes)
  kwargs = dict(num_classes=num_classes, exclude=exclude)

  def run(f):
    value, vjp = jax.vjp(lambda h, w: f(h, w, targets, weights, **kwargs), h, w)
    return value, vjp(cotangent)

  ref_value, (ref_dh, ref_dw) = run(fused_ce.weighted_ce_reference)
  value, (dh, dw) = run(_impl(impl))
  assert np.isfinite(np.asarray(value)).all() and dh.dtype == h.dtype and dw.dtype == w.dtype
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_value).max()))
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  for got, want in ((dh, ref_dh), (dw, ref_dw)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_a_vocabulary_split_without_tiles_changes_nothing():
  """5 tiles over 4 splits: 2, 2, 1 and 0 tiles. The empty split's partial sums (max -1e30, sum 0) and its draw
  (best -inf) must vanish when combined; loss, gradients and draws equal the reference."""
  from pallas_kernels import fused_sample
  n, d, v, num_classes, exclude = CASES[0]
  h, w, targets, weights, cotangent = _inputs(41, n, d, v, num_classes, jnp.float32)
  targets = _targets_avoid(targets, exclude, num_classes)
  kwargs = dict(num_classes=num_classes, exclude=exclude)
  blocks = dict(interpret=True, block_n=16, tile_v=64, chunk_d=16, splits=4)
  value, vjp = jax.vjp(lambda h, w: fused_ce.weighted_ce_pallas(h, w, targets, weights, **blocks, **kwargs), h, w)
  want, want_vjp = jax.vjp(lambda h, w: fused_ce.weighted_ce_reference(h, w, targets, weights, **kwargs), h, w)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  for got, ref in zip(vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))
  ids, p = fused_sample.sample_pallas(h, w, 5, **blocks, **kwargs)
  want_ids, want_p = fused_sample.sample_reference(h, w, 5, **kwargs)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(p, want_p, rtol=1e-5)


@pytest.mark.parametrize("dot_dtype", [jnp.float32, jnp.bfloat16])
def test_the_shipped_block_shapes_equal_the_reference(dot_dtype):
  """The kernels with their default plan (64-row blocks, tiles of 128 or 64, width chunks of 64, the splits and
  warps chosen from the shapes), interpreted: 3 row blocks, a width of 3 chunks (not a power of two, like 768)
  and a vocabulary that is not a multiple of the tile; against the reference from the same (rounded) inputs."""
  n, d, v, num_classes, exclude = 150, 192, 700, 699, 698
  h, w, targets, weights, cotangent = _inputs(31, n, d, v, num_classes, jnp.float32)
  targets = _targets_avoid(targets, exclude, num_classes)
  kwargs = dict(num_classes=num_classes, exclude=exclude)
  value, vjp = jax.vjp(lambda h, w: fused_ce.weighted_ce_pallas(h, w, targets, weights, interpret=True,
                                                               dot_dtype=dot_dtype, **kwargs), h, w)
  rounded = [x.astype(dot_dtype).astype(jnp.float32) for x in (h, w)]
  want, want_vjp = jax.vjp(lambda h, w: fused_ce.weighted_ce_reference(h, w, targets, weights, **kwargs), *rounded)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # float32: ulps of the sums; bfloat16: dlogits rounded to bfloat16 before the products (2^-8 relative).
  tol = 1e-5 if dot_dtype == jnp.float32 else 2.0 ** -7
  for got, ref in zip(vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("impl", ["tiled", "pallas"])
def test_bfloat16_products_are_within_the_rounding_of_their_inputs(impl):
  """With ``dot_dtype=bfloat16`` the products see h and W rounded to bfloat16; each product of two bfloat16
  numbers is exact in float32, so against a float64 computation from the same rounded inputs the only errors are
  float32 accumulation (at most D * 2^-24 of sum |h||w| per logit, which moves the log-sum-exp and the target
  logit by as much) and, in the backward pass, the rounding of dlogits to bfloat16 (2^-8 relative) before the
  two products: |error| <= (2^-8 + V * 2^-24) * (|dlogits| @ |W|^T) elementwise for dh, likewise for dW. A kernel
  that kept float32 inputs misses the forward bound by ~100x; TF32 or bfloat16 accumulation misses both."""
  n, d, v, num_classes, exclude = 70, 48, 300, 295, 7
  h, w, targets, weights, cotangent = _inputs(21, n, d, v, num_classes, jnp.float32)
  targets = _targets_avoid(targets, exclude, num_classes)
  f = functools.partial(_impl(impl), num_classes=num_classes, exclude=exclude, dot_dtype=jnp.bfloat16)
  value, vjp = jax.vjp(lambda h, w: f(h, w, targets, weights), h, w)
  dh, dw = (np.asarray(g, np.float64) for g in vjp(cotangent))

  hb, wb = (np.asarray(x.astype(jnp.bfloat16), np.float64) for x in (h, w))
  logits = hb @ wb
  valid = (np.arange(v) < num_classes) & (np.arange(v) != exclude)
  logits = np.where(valid, logits, -np.inf)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  rows = np.arange(n)
  want = np.asarray(weights, np.float64) * (lse - logits[rows, np.asarray(targets)])
  accumulation = d * 2.0 ** -24 * (np.abs(hb) @ np.abs(wb))
  bound = np.asarray(weights) * (2 * accumulation.max(1) + 8 * 2.0 ** -24 * (np.abs(lse) + 1))
  assert (np.abs(np.asarray(value, np.float64) - want) <= bound).all()

  coef = np.asarray(cotangent, np.float64) * np.asarray(weights, np.float64)
  p = np.exp(logits - lse[:, None])
  onehot = np.zeros((n, v))
  onehot[rows, np.asarray(targets)] = 1
  dlogits = coef[:, None] * (p - onehot)
  factor = 2.0 ** -8 + v * 2.0 ** -24 + 2.0 ** -16  # the last: float32 rounding of the softmax itself
  assert (np.abs(dh - dlogits @ wb.T) <= factor * (np.abs(dlogits) @ np.abs(wb).T) + 1e-30).all()
  assert (np.abs(dw - hb.T @ dlogits) <= factor * (np.abs(hb).T @ np.abs(dlogits)) + 1e-30).all()


def test_the_reference_is_the_cross_entropy_of_the_softmax():
  """The definition, position by position from an explicit softmax over the allowed classes."""
  n, d, v, num_classes, exclude = 9, 6, 12, 11, 3
  h, w, targets, weights, _ = _inputs(5, n, d, v, num_classes, jnp.float32)
  targets = _targets_avoid(targets, exclude, num_classes)
  logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  expected = []
  for i in range(n):
    allowed = [c for c in range(num_classes) if c != exclude]
    p = np.exp(logits[i, allowed] - logits[i, allowed].max())
    p /= p.sum()
    expected.append(-float(weights[i]) * np.log(p[allowed.index(int(targets[i]))]))
  got = fused_ce.weighted_ce_reference(h, w, targets, weights, num_classes=num_classes, exclude=exclude)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_zero_weight_rows_are_skipped():
  """Rows of weight 0, wherever they are, are gathered into whole blocks that are never read: NaN hidden states
  there leave the loss and the gradients finite and equal to the reference over the other rows (a kernel that
  computed them would give NaN, even multiplied by 0). 32 of 64 rows live, at random: two blocks of 16."""
  n, d, v = 64, 16, 200
  h, w, targets, weights, cotangent = _inputs(11, n, d, v, v, jnp.float32)
  live = np.zeros(n, bool)
  live[np.random.default_rng(12).choice(n, 32, replace=False)] = True
  weights = jnp.where(live, weights + 0.1, 0.0)
  poisoned = jnp.where(live[:, None], h, jnp.nan)
  f = functools.partial(_impl("pallas"), num_classes=v)
  value, vjp = jax.vjp(lambda h, w: f(h, w, targets, weights), poisoned, w)
  dh, dw = vjp(cotangent)
  ref = functools.partial(fused_ce.weighted_ce_reference, num_classes=v)
  ref_value, ref_vjp = jax.vjp(lambda h, w: ref(h[live], w, targets[live], weights[live]), h, w)
  ref_dh, ref_dw = ref_vjp(cotangent[live])
  np.testing.assert_allclose(value[live], ref_value, rtol=1e-5)
  assert (np.asarray(value)[~live] == 0).all() and (np.asarray(dh)[~live] == 0).all()
  np.testing.assert_allclose(dh[live], ref_dh[live], atol=1e-5 * float(jnp.abs(ref_dh).max()))
  np.testing.assert_allclose(dw, ref_dw, atol=1e-5 * float(jnp.abs(ref_dw).max()))


def test_the_interpreter_poisons_outputs():
  def writes_nothing(x_ref, o_ref):
    del x_ref, o_ref

  out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)(
      jnp.zeros(8))
  assert np.isnan(np.asarray(out)).all()


def _loss_and_grads(exp, params, key, x0, segments=None):
  model = Transformer(exp.model)
  process = state.build_process(exp.process, exp.model)

  def loss(params):
    return state.loss_terms(exp, model, process, params, key, x0, segments_BxL=segments)["loss"].sum()
  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("arg", [None, "autoregressive"])
@pytest.mark.parametrize("impl", ["tiled", "pallas"])
def test_the_fused_head_gives_the_models_loss_and_gradients(impl, arg):
  """The masked ELBO (absorbing, SUBS: the mask class excluded) and the AR loss (no mask; the start token is not
  a class), on packed rows with padding, with the fused head equal the same model's unfused loss and gradients
  for the same draws."""
  base = experiment(arg)
  fused = dataclasses.replace(base, model=dataclasses.replace(base.model, head_impl=impl, head_tile=64,
                                                              kernel_interpret=True))
  params = state.init_state(base, Transformer(base.model), state.make_optimizer(base.train)).params
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.integers(0, 256, (4, 16)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], 4, axis=0), jnp.int32)
  key = jax.random.PRNGKey(4)
  want_loss, want_grads = _loss_and_grads(base, params, key, x0, segments)
  got_loss, got_grads = _loss_and_grads(fused, params, key, x0, segments)
  assert float(want_loss) > 0
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree_util.tree_leaves(got_grads)):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-4 * scale + 1e-9, err_msg=jax.tree_util.keystr(path))


def test_impossible_head_choices_say_what_to_use():
  cfg = load_config("test", "uniform")
  cfg.model.head_impl = "tiled"
  with pytest.raises(ValueError, match=r"process.loss='ctmc' needs the full distribution: use model.head_impl='xla'"):
    from_config(cfg, 256)
  cfg = load_config("test")
  cfg.model.head_impl = "flash"
  with pytest.raises(ValueError, match=r"unknown model.head_impl 'flash'; valid: \['auto', 'pallas', 'tiled', 'xla'\]"):
    from_config(cfg, 256)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=r"on GPUs and Mosaic kernels on TPUs; this backend is 'cpu': use 'tiled'.*"
                                         r"kernel_interpret"):
      fused_ce.select("pallas")
  with pytest.raises(ValueError, match="must be a power of two"):
    fused_ce.weighted_ce_pallas(jnp.zeros((4, 8)), jnp.zeros((8, 8)), jnp.zeros(4, jnp.int32), jnp.zeros(4),
                                num_classes=8, tile_v=48, interpret=True)


def test_a_checkpoint_resumes_under_any_head_or_dropout_and_from_before_a_field_existed():
  base = experiment()
  other = dataclasses.replace(base, model=dataclasses.replace(base.model, head_impl="tiled", head_tile=64))
  assert checkpoints.fingerprint(base) == checkpoints.fingerprint(other)
  wider = dataclasses.replace(base, model=dataclasses.replace(base.model, d_model=64))
  assert checkpoints.fingerprint(base) != checkpoints.fingerprint(wider)
  # Dropout rates are training knobs; a checkpoint from before a field existed had its default.
  dropped = dataclasses.replace(base, model=dataclasses.replace(base.model, dropout=0.1, attention_dropout=0.1))
  assert checkpoints.fingerprint(base) == checkpoints.fingerprint(dropped)
  older = checkpoints.fingerprint(base)
  del older["model"]["mlp_activation"], older["model"]["depth_scaled_init"]
  checkpoints.check_compatible(older, checkpoints.fingerprint(base))
  sigmoid = dataclasses.replace(base, model=dataclasses.replace(base.model, mlp_activation="sigmoid"))
  with pytest.raises(ValueError, match="model.mlp_activation: checkpoint 'silu' vs config 'sigmoid'"):
    checkpoints.check_compatible(older, checkpoints.fingerprint(sigmoid))


def test_the_pallas_head_lowers_for_cuda():
  h, w = jnp.ones((70, 48), jnp.bfloat16), jnp.ones((48, 300), jnp.float32)
  targets, weights = jnp.zeros((70,), jnp.int32), jnp.ones((70,), jnp.float32)

  def loss(h, w):
    return fused_ce.weighted_ce_pallas(h, w, targets, weights, num_classes=295, exclude=7).sum()

  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(h, w).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 2  # the forward and the dlogits kernels (test_target_kernels.py compiles them)


def _tpu_impl(h, w, targets, weights, **kwargs):
  """The Mosaic kernels; call under ``pltpu.force_tpu_interpret_mode()`` (forward and backward both)."""
  return fused_ce.weighted_ce_pallas_tpu(h, w, targets, weights, block_n=16, tile_v=128, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", [0, 1])
def test_the_tpu_kernels_equal_the_reference(case, dtype):
  """The Mosaic kernels in TPU interpret mode, with the tolerances above."""
  n, d, v, num_classes, exclude = CASES[case]
  h, w, targets, weights, cotangent = _inputs(500 + case, n, d, v, num_classes, dtype)
  targets = _targets_avoid(targets, exclude, num_classes)
  kwargs = dict(num_classes=num_classes, exclude=exclude)
  want, want_vjp = jax.vjp(lambda h, w: fused_ce.weighted_ce_reference(h, w, targets, weights, **kwargs), h, w)
  with pltpu.force_tpu_interpret_mode():
    got, got_vjp = jax.vjp(lambda h, w: _tpu_impl(h, w, targets, weights, **kwargs), h, w)
    got_grads = got_vjp(cotangent)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  for a, b in zip(got_grads, want_vjp(cotangent)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


def test_the_tpu_kernels_skip_weight_zero_rows_and_lower_for_tpu():
  n, d, v = 64, 16, 200
  h, w, targets, weights, cotangent = _inputs(13, n, d, v, v, jnp.float32)
  live = np.zeros(n, bool)
  live[np.random.default_rng(14).choice(n, 32, replace=False)] = True
  weights = jnp.where(live, weights + 0.1, 0.0)
  with pltpu.force_tpu_interpret_mode():
    value, vjp = jax.vjp(lambda h, w: _tpu_impl(h, w, targets, weights, num_classes=v),
                         jnp.where(live[:, None], h, jnp.nan), w)
    dh, dw = vjp(cotangent)
  assert np.isfinite(np.asarray(value)).all() and np.isfinite(np.asarray(dw)).all()
  assert (np.asarray(dh)[~live] == 0).all() and np.isfinite(np.asarray(dh)).all()
  want = fused_ce.weighted_ce_reference(h[live], w, targets[live], weights[live], num_classes=v)
  np.testing.assert_allclose(value[live], want, rtol=1e-5)
  text = jax.jit(jax.value_and_grad(lambda h, w: fused_ce.weighted_ce_pallas_tpu(
      h, w, targets, weights, num_classes=v, block_n=16, tile_v=128).sum(), argnums=(0, 1))).trace(h, w).lower(
          lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") >= 3  # forward, dh and dW
