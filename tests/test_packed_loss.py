"""Losses on packed rows (several documents per row, ``data/prepared.py``): the AR baseline scores a packed row as
its documents apart, each from the start token; a diffusion loss over one document's positions does not depend on
the other document; padding has no weight by default."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import state

from test_train import experiment


def setup(arg):
  config = experiment(arg)
  model = Transformer(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,)))["params"]
  # Random (not zero-initialised) adaLN and heads, so every block's attention reaches the output.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [leaf + 0.05 * jax.random.normal(k, leaf.shape)
                                               for leaf, k in zip(leaves, keys)])
  return config, model, state.build_process(config.process, config.model), params


A = jnp.array([5, 17, 99, 3, 44, 200])
B = jnp.array([7, 7, 120, 31, 8, 250, 66])


def row(*docs):
  tokens = jnp.concatenate(docs + (jnp.zeros(16 - sum(d.size for d in docs), jnp.int32),))[None]
  segments = jnp.concatenate([jnp.full(d.size, i + 1) for i, d in enumerate(docs)] +
                             [jnp.zeros(16 - sum(d.size for d in docs), jnp.int32)])[None]
  return tokens, segments


def test_ar_scores_a_packed_row_as_its_documents_apart():
  config, model, _, params = setup("autoregressive")
  key = jax.random.PRNGKey(0)
  nll = lambda tokens, segments: float(state.loss_terms(config, model, None, params, key, tokens,
                                                        segments_BxL=segments)["nelbo"][0])
  packed = nll(*row(A, B))
  apart = nll(*row(A)) + nll(*row(B))
  assert packed == pytest.approx(apart, abs=1e-3)
  # Without segment ids the same row is scored as one text: B's first token follows A's last.
  assert abs(nll(row(A, B)[0], None) - apart) > 0.1


@pytest.mark.parametrize("arg", [None, "absorbing_d3pm", "bd3lm"])
def test_diffusion_loss_of_one_document_ignores_the_other(arg):
  config, model, process, params = setup(arg)
  key = jax.random.PRNGKey(3)
  tokens, segments = row(A, B)
  only_a = (segments == 1).astype(jnp.float32)
  other_b = tokens.at[0, 6:13].set((B + 1) % 256)  # every token of B changed

  def loss(tokens, segments):  # over 8 draws of t and x_t, so that some draw leaves part of B visible
    return sum(float(state.loss_terms(config, model, process, params, jax.random.PRNGKey(k), tokens, evaluate=True,
                                      weights_BxL=only_a, segments_BxL=segments)["nelbo"][0]) for k in range(8))

  assert loss(tokens, segments) == pytest.approx(loss(other_b, segments), rel=1e-6)
  # Without segment ids B does reach A (under block diffusion only through the block they share: 5e-6 of it).
  assert loss(tokens, None) != pytest.approx(loss(other_b, None), rel=1e-6)
  # The default weights are the segments' real positions.
  default = state.loss_terms(config, model, process, params, key, tokens, evaluate=True, segments_BxL=segments)
  explicit = state.loss_terms(config, model, process, params, key, tokens, evaluate=True,
                              weights_BxL=(segments > 0).astype(jnp.float32), segments_BxL=segments)
  np.testing.assert_array_equal(default["nelbo"], explicit["nelbo"])


@pytest.mark.parametrize("arg,charged", [("uniform", True), (None, False)])
def test_training_minimises_the_bound_that_evaluation_reports(arg, charged):
  """The uniform process trains on its reconstruction term, which evaluation charges (a bound a run was scored on
  but never trained on made uniform and nearest-neighbour look ~0.08 and ~0.23 bits/byte worse); absorbing leaves
  it out, where it is eps x the masked cross-entropy. Mutation: ``with_recon=evaluate`` in ``state.loss_terms``."""
  config, model, process, params = setup(arg)
  tokens, segments = row(A, B)
  key = jax.random.PRNGKey(5)
  trained = state.loss_terms(config, model, process, params, key, tokens, segments_BxL=segments)
  scored = state.loss_terms(config, model, process, params, key, tokens, evaluate=True, segments_BxL=segments)
  assert ("recon" in trained) == charged
  if charged:
    assert float(trained["recon"][0]) > 0.01
    np.testing.assert_allclose(trained["loss"], scored["nelbo"], rtol=1e-6)
