"""The optimiser and the EMA against independent computations: AdamW with gradient clipping and the warm-up +
cosine learning rate written out in numpy, and the EMA as the closed-form weighted average of the iterates."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax.config import TrainConfig
from d3pm_jax.training import train
from d3pm_jax.training.state import init_state, make_optimizer

from test_train import experiment, parts


def reference_lr(cfg: TrainConfig, k: int) -> float:
  """Linear warm-up from 0 over warmup_steps updates, then a half cosine from the peak down to
  min_lr_ratio x peak at train.steps."""
  peak, end, warm = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.warmup_steps
  if k < warm:
    return peak * k / warm
  if cfg.lr_schedule == "inverse_sqrt":  # D3PM's: the peak at the end of warm-up, then 1 / sqrt(step)
    return peak / math.sqrt(k / warm)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (k - warm) / (cfg.steps - warm)))


def reference_adamw(cfg: TrainConfig, params, grads_per_step):
  """The parameters after each update: clip the gradient's global norm to grad_clip (0: never), then AdamW with
  bias correction and decoupled weight decay, all in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for k, grads in enumerate(grads_per_step):
    g = {name: np.asarray(x, np.float64) for name, x in grads.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    if cfg.grad_clip > 0 and norm > cfg.grad_clip:
      g = {name: x * cfg.grad_clip / norm for name, x in g.items()}
    lr, t = reference_lr(cfg, k), k + 1
    for name in p:
      m[name] = cfg.b1 * m[name] + (1 - cfg.b1) * g[name]
      v[name] = cfg.b2 * v[name] + (1 - cfg.b2) * g[name] ** 2
      m_hat, v_hat = m[name] / (1 - cfg.b1 ** t), v[name] / (1 - cfg.b2 ** t)
      p[name] = p[name] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + cfg.weight_decay * p[name])
    out.append({name: x.copy() for name, x in p.items()})
  return out


@pytest.mark.parametrize("grad_clip,lr_schedule", [(1.0, "cosine"), (0.0, "cosine"), (1.0, "inverse_sqrt")])
def test_make_optimizer_is_clipped_adamw_on_a_warmup_cosine_schedule(grad_clip, lr_schedule):
  """Eight updates whose gradient norms range over 0.05..20, so clipping to 1 changes some and not others; the
  learning rate visits warm-up, the peak and the decay (the cosine's end at step 8 is never used by an update;
  the inverse square root falls to sqrt(3/7) of the peak by the last)."""
  cfg = TrainConfig(steps=8, warmup_steps=3, learning_rate=0.1, min_lr_ratio=0.1, weight_decay=0.03, b1=0.9,
                    b2=0.99, grad_clip=grad_clip, lr_schedule=lr_schedule)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
  scales = [0.05, 20.0, 0.3, 5.0, 1.0, 0.1, 12.0, 0.7]
  grads = []
  for s in scales:
    g = {k: rng.normal(size=x.shape) for k, x in params.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    grads.append({k: (x * s / norm).astype(np.float32) for k, x in g.items()})
  optimizer = make_optimizer(cfg)
  state = optimizer.init(params)
  current = params
  for k, (g, expected) in enumerate(zip(grads, reference_adamw(cfg, params, grads))):
    updates, state = optimizer.update(g, state, current)
    current = jax.tree_util.tree_map(lambda p, u: p + u, current, updates)
    for name in params:
      np.testing.assert_allclose(current[name], expected[name], rtol=2e-6, atol=2e-7, err_msg=f"update {k}")


def test_warmup_may_take_every_step():
  cfg = TrainConfig(steps=2, warmup_steps=5, learning_rate=0.1)
  params = {"w": np.ones(3, np.float32)}
  optimizer = make_optimizer(cfg)
  state = optimizer.init(params)
  updates, _ = optimizer.update({"w": np.ones(3, np.float32)}, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)  # the first update's learning rate is 0


def test_ema_is_the_weighted_average_of_the_iterates():
  """With decay d, after n steps the EMA is d^n p_0 + (1 - d) sum_k d^(n-k) p_k over the parameters p_k after
  step k — checked for d = 0.5 over three real train steps."""
  exp = experiment(ema_decay=0.5, learning_rate=0.05)
  model, process, optimizer = parts(exp)
  state = init_state(exp, model, optimizer)
  step = jax.jit(train.make_train_step(exp, model, process, optimizer))
  batch = jax.random.randint(jax.random.PRNGKey(3), (exp.train.batch_size, exp.data.seq_len), 0, 255)
  iterates = [state.params]
  for _ in range(3):
    state, _ = step(state, batch)
    iterates.append(state.params)
  d, n = 0.5, 3
  weights = [d ** n] + [(1 - d) * d ** (n - k) for k in range(1, n + 1)]
  expected = jax.tree_util.tree_map(lambda *ps: sum(w * np.asarray(p, np.float64) for w, p in zip(weights, ps)),
                                    *iterates)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), iterates[-1], iterates[0])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-2
  jax.tree_util.tree_map(lambda e, got: np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-6), expected,
                         state.ema_params)
