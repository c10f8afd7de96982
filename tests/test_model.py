"""The transformer: attention against JAX's reference, causality, rotary relativity, logical axes, adaLN-zero."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax.models.transformer import (ModelConfig, Transformer, attention, dropout, forward_flops_per_token,
                                        rotary)


def tiny(**kw):
  base = dict(vocab_size=11, max_len=16, num_layers=2, d_model=32, num_heads=2, mlp_dim=48, cond_dim=16)
  base.update(kw)
  return ModelConfig(**base)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_jax_reference(causal):
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 9, 3, 8)) for i in range(3))
  np.testing.assert_allclose(attention(q, k, v, causal), jax.nn.dot_product_attention(q, k, v, is_causal=causal),
                             atol=1e-5)
  grad = lambda f: jax.grad(lambda q: jnp.sum(jnp.sin(f(q))))(q)
  np.testing.assert_allclose(grad(lambda q: attention(q, k, v, causal)),
                             grad(lambda q: jax.nn.dot_product_attention(q, k, v, is_causal=causal)), atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  q = jnp.tile(jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8)), (1, 12, 1, 1))
  k = jnp.tile(jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8)), (1, 12, 1, 1))
  scores = jnp.einsum("blhk,bmhk->lm", rotary(q, 100.0), rotary(k, 100.0))
  for offset in (1, 3):
    np.testing.assert_allclose(jnp.diagonal(scores, offset)[:-1], jnp.diagonal(scores, offset)[1:], rtol=1e-5)
  assert not np.allclose(scores[0, 1], scores[0, 4])


def test_causal_model_never_looks_ahead():
  model = Transformer(tiny(causal=True))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 10), 0, 11)
  params = model.init(jax.random.PRNGKey(1), tokens)
  base = model.apply(params, tokens)
  changed = model.apply(params, tokens.at[0, 6].set((tokens[0, 6] + 1) % 11))
  np.testing.assert_allclose(base[:, :6], changed[:, :6], atol=1e-6)
  assert not np.allclose(base[:, 6:], changed[:, 6:])
  bidirectional = Transformer(tiny())
  p2 = bidirectional.init(jax.random.PRNGKey(1), tokens)
  assert not np.allclose(bidirectional.apply(p2, tokens)[:, :6],
                         bidirectional.apply(p2, tokens.at[0, 6].set((tokens[0, 6] + 1) % 11))[:, :6])


def test_every_parameter_has_logical_axis_names():
  model = Transformer(tiny(time_conditioning=True))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1,)))
  leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_adaln_zero_starts_as_the_unconditioned_network_and_then_uses_time():
  model = Transformer(tiny(time_conditioning=True))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 11)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), tokens, jnp.zeros((2,)))["params"])
  out = lambda p, t: model.apply({"params": p}, tokens, jnp.full((2,), t))
  np.testing.assert_allclose(out(params, 0.1), out(params, 0.9), atol=1e-6)  # zero-initialised modulation
  nudged = jax.tree_util.tree_map(lambda x: x + 0.05, params)
  assert not np.allclose(out(nudged, 0.1), out(nudged, 0.9), atol=1e-4)
  with pytest.raises(ValueError, match="pass t_B"):
    model.apply({"params": params}, tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_compute_keeps_float32_logits_and_params(seed):
  """Random tokens, so every position attends differently: the bfloat16 model's float32 logits follow the
  float32 model's to 2^-6 of their scale (measured 0.6-0.9%: a dozen bfloat16 roundings of 2^-8 in a row), while
  logits that lost the attention pattern (the same sequence, its tokens rotated) differ by over 10%. The two are
  not identical: the matmuls really ran in bfloat16."""
  model = Transformer(tiny(dtype="bfloat16"))
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (2, 16), 0, 11)
  variables = model.init(jax.random.PRNGKey(seed), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(variables)))
  out = model.apply(variables, tokens)
  assert out.dtype == jnp.float32
  full = Transformer(tiny()).apply(variables, tokens)
  scale = float(jnp.abs(full).max())
  error = float(jnp.abs(out - full).max())
  assert 0 < error < 2.0 ** -6 * scale
  rotated = Transformer(tiny()).apply(variables, jnp.roll(tokens, 1, axis=1))
  assert float(jnp.abs(jnp.roll(rotated, -1, axis=1) - full).max()) > 0.1 * scale


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general the program runs (a scan's body counted once per iteration): a tally
  of the traced computation, not of the formula."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          total += repeat * _dot_flops(inner)
  return total


@pytest.mark.parametrize("scan_layers", [False, True])
def test_flop_count_matches_the_traced_matmuls(scan_layers):
  """forward_flops_per_token against the dot_generals of the traced forward pass. Per-sequence work (the time
  MLP, adaLN projections) is not per token, so it cancels in the difference between two lengths."""
  cfg = tiny(scan_layers=scan_layers, max_len=32)
  model = Transformer(cfg)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1,)))

  def traced(length):
    return _dot_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x, jnp.zeros((1,))))(
        variables, jnp.zeros((1, length), jnp.int32)).jaxpr)

  assert traced(32) - traced(8) == 32 * forward_flops_per_token(cfg, 32) - 8 * forward_flops_per_token(cfg, 8)


def test_layer_norm_centres_and_rms_norm_does_not():
  """norm="layer" subtracts each row's mean before scaling (so adding a constant to a row changes nothing);
  "rms" only scales. Both give rows of unit root-mean-square."""
  from d3pm_jax.models.transformer import Norm
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32)) * 3.0 + 1.5
  layer, rms = Norm("layer", learned_scale=False), Norm("rms", learned_scale=False)
  y_layer, y_rms = layer.apply({}, x), rms.apply({}, x)
  np.testing.assert_allclose(jnp.mean(y_layer, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y_layer ** 2, axis=-1)), 1.0, rtol=1e-4)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y_rms ** 2, axis=-1)), 1.0, rtol=1e-4)
  np.testing.assert_allclose(layer.apply({}, x + 7.0), y_layer, atol=1e-5)
  assert float(jnp.abs(jnp.mean(y_rms, axis=-1)).min()) > 0.1
  model = Transformer(tiny(norm="layer"))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 11)
  variables = model.init(jax.random.PRNGKey(0), tokens, jnp.zeros((2,)))
  out = model.apply(variables, tokens, jnp.full((2,), 0.5))
  assert out.shape == (2, 16, 11) and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(out - Transformer(tiny()).apply(variables, tokens, jnp.full((2,), 0.5))).max()) > 1e-3


def test_a_sequence_longer_than_max_len_is_refused():
  model = Transformer(tiny(max_len=16))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="sequence length 17 exceeds model.max_len=16"):
    model.apply(variables, jnp.zeros((1, 17), jnp.int32), jnp.zeros((1,)))


@pytest.mark.parametrize("kw,match", [
    (dict(norm="batch"), "unknown norm 'batch'"),
    (dict(dtype="float16"), "unknown dtype 'float16'"),
    (dict(d_model=30, num_heads=4), "even width"),
    (dict(num_layers=0), "model.num_layers must be a positive integer"),
])
def test_bad_model_config(kw, match):
  with pytest.raises(ValueError, match=match):
    tiny(**kw)


def test_padded_vocabulary_is_the_unpadded_model_on_the_first_rows():
  """vocab_pad_multiple adds embedding rows and head columns that no token reaches and no logit shows: the
  padded model equals the unpadded one whose embedding and head are the padded model's first V rows/columns."""
  padded = Transformer(tiny(vocab_pad_multiple=8, time_conditioning=True))
  plain = Transformer(tiny(time_conditioning=True))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 11)
  t = jnp.array([0.3, 0.8])
  params = nn.unbox(padded.init(jax.random.PRNGKey(1), tokens, t)["params"])
  assert params["embed"]["embedding"].shape == (16, 32) and params["head"]["kernel"].shape == (32, 16)
  cut = dict(params, embed={"embedding": params["embed"]["embedding"][:11]},
             head={"kernel": params["head"]["kernel"][:, :11]})
  logits = padded.apply({"params": params}, tokens, t)
  assert logits.shape == (2, 8, 11)
  np.testing.assert_allclose(logits, plain.apply({"params": cut}, tokens, t), atol=1e-6)


def test_scanned_layers_are_the_python_loop_over_the_same_weights():
  """scan_layers stacks the blocks' parameters on a leading 'layers' axis; with each slice given to the unrolled
  model's block_i, logits and gradients agree (weights perturbed off the adaLN-zero start, so every block acts)."""
  kw = dict(num_layers=3, time_conditioning=True)
  plain, scanned = Transformer(tiny(**kw)), Transformer(tiny(scan_layers=True, **kw))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 11)
  t = jnp.array([0.3, 0.8])
  boxed = scanned.init(jax.random.PRNGKey(1), tokens, t)["params"]
  kernel = boxed["blocks"]["mlp"]["wi_gate"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape == (3, 32, 48)
  leaves, tree = jax.tree_util.tree_flatten(nn.unbox(boxed))
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  stacked = tree.unflatten([x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

  def unstack(p):
    out = {k: v for k, v in p.items() if k != "blocks"}
    out.update({f"block_{i}": jax.tree_util.tree_map(lambda x: x[i], p["blocks"]) for i in range(3)})
    return out

  loss = lambda model, p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens, t)))
  np.testing.assert_allclose(loss(scanned, stacked), loss(plain, unstack(stacked)), rtol=1e-5)
  assert abs(float(loss(scanned, stacked)) - float(loss(scanned, nn.unbox(boxed)))) > 1e-3
  # float32 sums in a different order: errors relative to each gradient's largest entry.
  errors = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
                                  unstack(jax.grad(lambda p: loss(scanned, p))(stacked)),
                                  jax.grad(lambda p: loss(plain, p))(unstack(stacked)))
  assert max(jax.tree_util.tree_leaves(errors)) < 1e-5


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_documents_do_not_see_each_other(scan_layers):
  """A row packing document A (positions 0-5) and document B (6-12), then 3 padding positions: A's logits equal
  A's alone (B replaced by padding), B's equal B's alone at the start of a row (rotary scores are relative), and
  changing B or the padding leaves A's logits unchanged."""
  model = Transformer(tiny(scan_layers=scan_layers))
  a = jax.random.randint(jax.random.PRNGKey(0), (1, 6), 0, 11)
  b = jax.random.randint(jax.random.PRNGKey(1), (1, 7), 0, 11)
  row = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3])
  params = model.init(jax.random.PRNGKey(2), row)
  packed = model.apply(params, row, segments_BxL=segments)
  a_alone = model.apply(params, jnp.concatenate([a, jnp.zeros((1, 10), jnp.int32)], axis=1),
                        segments_BxL=jnp.array([[1] * 6 + [0] * 10]))
  b_alone = model.apply(params, jnp.concatenate([b, jnp.zeros((1, 9), jnp.int32)], axis=1),
                        segments_BxL=jnp.array([[1] * 7 + [0] * 9]))
  np.testing.assert_allclose(packed[:, :6], a_alone[:, :6], atol=1e-5)
  np.testing.assert_allclose(packed[:, 6:13], b_alone[:, :7], atol=1e-4)
  changed = model.apply(params, row.at[0, 8].set((row[0, 8] + 1) % 11).at[0, 14].set(5), segments_BxL=segments)
  np.testing.assert_array_equal(packed[:, :6], changed[:, :6])
  assert not np.allclose(packed[:, 6:13], changed[:, 6:13])
  # Without segment ids the same row mixes the documents.
  assert not np.allclose(model.apply(params, row)[:, :6], a_alone[:, :6], atol=1e-3)


# ---------------------------------------------------------------- what the papers' networks add

def test_dropout_keeps_each_activation_in_expectation():
  """Inverted dropout: over 4000 masks each element's mean is x (within 4 standard errors of the 1/(1-p)-scaled
  Bernoulli) and the dropped fraction is the rate; rate 0 is x itself. Mutation: no 1/(1-p) scaling (means fall
  to 0.7 x, ~40 standard errors off), or keeping with probability ``rate``."""
  x = jnp.linspace(-2.0, 3.0, 16)
  rate, n = 0.3, 4000
  draws = jax.vmap(lambda k: dropout(x, rate, k))(jax.random.split(jax.random.PRNGKey(0), n))
  se = np.abs(np.asarray(x)) * np.sqrt(rate / (1 - rate) / n)
  assert np.all(np.abs(np.mean(draws, axis=0) - x) < 4 * se + 1e-7)
  assert abs(float(jnp.mean(draws == 0)) - rate) < 0.01
  assert dropout(x, 0.0, jax.random.PRNGKey(1)) is x


def test_attention_dropout_keeps_the_output_in_expectation():
  """Attention is linear in its weights, so dropping them (after the softmax normalisation) leaves the output's
  mean over masks unchanged: the mean over 3000 masks is the dropout-free attention to within its standard
  error. Mutation: renormalising after the drop (``total`` summed over the kept weights) moves it up to 30 standard
  errors."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 6, 1, 4)) for i in range(3))
  exact = attention(q, k, v, causal=False)
  draws = jax.vmap(lambda key: attention(q, k, v, causal=False, dropout_rate=0.4, dropout_key=key))(
      jax.random.split(jax.random.PRNGKey(5), 3000))
  mean, se = np.mean(draws, axis=0), np.std(draws, axis=0) / np.sqrt(3000)
  assert np.all(np.abs(mean - exact) < 4.5 * se + 1e-6)
  assert float(np.max(np.std(draws, axis=0))) > 0.05  # the masks really vary the output


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_is_training_only_and_rate_zero_changes_nothing(scan_layers):
  """The loss's network calls (``state.network``): without a key, or at rate 0 with one, they are the plain
  ``apply`` bit for bit; a model with dropout evaluates exactly as the same weights without it, and trains on
  outputs that differ from that and from mask to mask. Mutations: dropout left on at evaluation, never on in
  training, or the same mask for every layer of a scanned stack."""
  from d3pm_jax.training import state
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 11)
  t = jnp.array([0.3, 0.8])
  plain = Transformer(tiny(scan_layers=scan_layers, time_conditioning=True))
  dropped = Transformer(tiny(scan_layers=scan_layers, time_conditioning=True, dropout=0.3, attention_dropout=0.2))
  params = nn.unbox(plain.init(jax.random.PRNGKey(1), tokens, t)["params"])
  reference = plain.apply({"params": params}, tokens, t)
  key = jax.random.PRNGKey(2)
  np.testing.assert_array_equal(state.network(plain, params, key)(tokens, t), reference)
  np.testing.assert_array_equal(state.network(dropped, params)(tokens, t), reference)
  train_a = state.network(dropped, params, key)(tokens, t)
  train_b = state.network(dropped, params, jax.random.PRNGKey(3))(tokens, t)
  assert float(jnp.max(jnp.abs(train_a - reference))) > 1e-2
  assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-2
  np.testing.assert_array_equal(train_a, state.network(dropped, params, key)(tokens, t))  # a key fixes the masks


def test_glu_activation_is_the_named_gate():
  """The MLP is act(x W_gate) * (x W_up) W_o with act computed here in numpy float64 for each choice (GELU in its
  tanh form). Mutation: a choice mapped to another nonlinearity."""
  from d3pm_jax.models.transformer import GluMlp
  gates = {"silu": lambda z: z / (1 + np.exp(-z)), "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
           "gelu": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))}
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  outputs = {}
  for name, gate in gates.items():
    mlp = GluMlp(tiny(mlp_activation=name))
    p = nn.unbox(mlp.init(jax.random.PRNGKey(1), x)["params"])
    x64 = np.asarray(x, np.float64)
    w = {k: np.asarray(p[k]["kernel"], np.float64) for k in ("wi_gate", "wi_up", "wo")}
    want = (gate(x64 @ w["wi_gate"]) * (x64 @ w["wi_up"])) @ w["wo"]
    outputs[name] = np.asarray(mlp.apply({"params": p}, x))
    np.testing.assert_allclose(outputs[name], want, rtol=2e-4, atol=2e-5)
  assert not np.allclose(outputs["silu"], outputs["gelu"], atol=1e-3)


def test_depth_scaled_init_divides_the_residual_projections_variance_by_twice_the_depth():
  """With ``depth_scaled_init`` the attention output and GLU ``wo`` kernels start with variance 1 / (fan_in * 2
  * num_layers) and every other kernel keeps LeCun's 1 / fan_in (truncated normal rescaled to that variance).
  Measured over 4 layers x 8192 draws the ratio is within 5% of 1 (sampling error ~1%); without the scaling it
  is 8. Mutation: scaling the standard deviation, not the variance (ratio sqrt(8))."""
  layers = 4
  model = Transformer(tiny(num_layers=layers, d_model=64, num_heads=2, mlp_dim=128, depth_scaled_init=True))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  blocks = [params[f"block_{i}"] for i in range(layers)]
  def ratio(kernels, fan_in, scale):
    values = np.concatenate([np.asarray(k, np.float64).ravel() for k in kernels])
    return np.mean(values ** 2) * fan_in / scale
  assert abs(ratio([b["mlp"]["wo"]["kernel"] for b in blocks], 128, 1 / (2 * layers)) - 1) < 0.05
  assert abs(ratio([b["attention"]["out"]["kernel"] for b in blocks], 64, 1 / (2 * layers)) - 1) < 0.05
  assert abs(ratio([b["mlp"]["wi_gate"]["kernel"] for b in blocks], 64, 1.0) - 1) < 0.05
  assert abs(ratio([b["attention"]["query"]["kernel"] for b in blocks], 64, 1.0) - 1) < 0.05


@pytest.mark.parametrize("kw,match", [
    (dict(mlp_activation="relu"), r"unknown model.mlp_activation 'relu'.*gelu.*sigmoid.*silu"),
    (dict(dropout=1.0), r"model.dropout is a rate in \[0, 1\); got 1.0"),
    (dict(attention_dropout=0.1, attention_impl="cudnn"), "attention_dropout=0.1 needs model.attention_impl='xla'"),
])
def test_bad_regularisation_config(kw, match):
  with pytest.raises(ValueError, match=match):
    tiny(**kw)


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
def test_bfloat16_model_makes_its_weight_gradients_in_the_stated_dtype(grad_dtype):
  """In a bfloat16 model, every weight gradient (projections and the embedding's scatter-add) comes out of its
  product in ``weight_gradients_in``'s dtype: in float32 (the train step's default) it matches a float64 computation
  from the same bfloat16 activations to float32 accuracy, where the plain transpose of ``x.astype(bf16) @
  w.astype(bf16)`` rounds it to bfloat16 first (relative error about 2^-9; the float32 case fails by ~100x if the
  product's output dtype is the compute dtype); in bfloat16 it carries bfloat16's rounding (and fails if
  the stated dtype is ignored). Input gradients and the forward pass are the plain ones."""
  from d3pm_jax.models.transformer import Linear, _lookup, weight_gradients_in
  x_NxD = jax.random.normal(jax.random.PRNGKey(0), (64, 96), jnp.float32)
  layer = Linear((48,), ("embed", "mlp"), jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.PRNGKey(1), x_NxD))
  dy_NxO = jax.random.normal(jax.random.PRNGKey(2), (64, 48), jnp.float32)
  loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) * dy_NxO)
  with weight_gradients_in(grad_dtype):
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x_NxD)
  plain = lambda p, x: jnp.sum((x.astype(jnp.bfloat16) @ p["params"]["kernel"].astype(jnp.bfloat16))
                               .astype(jnp.float32) * dy_NxO)
  p_params, p_x = jax.grad(plain, argnums=(0, 1))(params, x_NxD)
  np.testing.assert_array_equal(g_x, p_x)
  np.testing.assert_array_equal(layer.apply(params, x_NxD), x_NxD.astype(jnp.bfloat16)
                                @ params["params"]["kernel"].astype(jnp.bfloat16))
  x64 = np.asarray(x_NxD.astype(jnp.bfloat16), np.float64)
  dy64 = np.asarray(dy_NxO.astype(jnp.bfloat16), np.float64)
  exact_dw = x64.T @ dy64
  rel = lambda g, exact: np.max(np.abs(np.asarray(g, np.float64) - exact)) / np.max(np.abs(exact))
  in_stated_dtype = lambda error: error < 1e-5 if grad_dtype == "float32" else 1e-4 < error < 5e-2
  dw = g_params["params"]["kernel"]
  assert dw.dtype == jnp.float32 and in_stated_dtype(rel(dw, exact_dw)), rel(dw, exact_dw)
  assert rel(p_params["params"]["kernel"], exact_dw) > 1e-4  # the plain transpose's bfloat16 rounding, which this avoids
  # The embedding's gradient: every token's rows summed (a repeated token many times) in the stated dtype.
  table_VxD = jax.random.normal(jax.random.PRNGKey(3), (5, 8))
  tokens_BxL = jnp.array([[1] * 300 + [3] * 20])
  dy_BxLxD = jax.random.normal(jax.random.PRNGKey(4), (1, 320, 8)).astype(jnp.bfloat16)
  lookup = lambda t: jnp.sum((_lookup(t, tokens_BxL, ("bfloat16", grad_dtype, "float32")) * dy_BxLxD)
                             .astype(jnp.float32))
  with weight_gradients_in(grad_dtype):
    d_table = jax.grad(lookup)(table_VxD)
  exact = np.zeros((5, 8))
  np.add.at(exact, np.asarray(tokens_BxL[0]), np.asarray(dy_BxLxD[0], np.float64))
  assert d_table.dtype == jnp.float32 and in_stated_dtype(rel(d_table, exact)), rel(d_table, exact)
  np.testing.assert_array_equal(np.asarray(d_table)[[0, 2, 4]], 0.0)
