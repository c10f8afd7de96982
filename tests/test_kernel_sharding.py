"""The fused heads and the attention kernels under a mesh, on 8 fake CPU devices: per shard through shard_map, with
rows over (data, fsdp) and the vocabulary (or heads) over tensor, equal to one device - the loss and every
gradient, and the sampler's draws for the same seed - and the compiled program gathers no [N, D] activations and
no [N, V] tensor (its only all-gathers are of the head's weights, as FSDP does)."""
import pytest

from test_sharding import run_script

pytestmark = pytest.mark.slow

SCRIPT = r"""
    import functools, re
    from jax.sharding import NamedSharding, PartitionSpec as P
    from d3pm_jax.runtime import sharding
    from pallas_kernels import attention, fused_ce, fused_sample

    n, d, v, num_classes, exclude = 64, 16, 256, 255, 3
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)
    targets = jnp.where(targets == exclude, exclude + 1, targets)
    weights = jnp.asarray(rng.random(n) * (rng.random(n) < 0.6), jnp.float32)
    cotangent = jnp.asarray(rng.random(n) + 0.5, jnp.float32)  # positive: the summed loss has no cancellation
    heads = {"tiled": functools.partial(fused_ce.weighted_ce_tiled, tile_v=64),
             "pallas": functools.partial(fused_ce.weighted_ce_pallas, interpret=True, block_n=8, tile_v=32,
                                         chunk_d=8, splits=2, chunk_rows=16)}
    draws = {"tiled": functools.partial(fused_sample.sample_tiled, tile_v=64),
             "pallas": functools.partial(fused_sample.sample_pallas, interpret=True, block_n=8, tile_v=32,
                                         chunk_d=8, splits=2)}

    def loss_fn(ce):
      def loss(h, w):
        return jnp.sum(cotangent * ce(h, w, targets, weights, num_classes=num_classes, exclude=exclude))
      return jax.value_and_grad(loss, argnums=(0, 1))

    def draw_fn(draw):
      return lambda h, w: draw(h, w, 1234, num_classes=num_classes, exclude=exclude, temperature=0.8)

    q, k, vv = (jnp.asarray(rng.normal(size=(8, 32, 4, 16)), jnp.float32) for _ in range(3))
    segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 9 + [0] * 3], 8, axis=0), jnp.int32)

    def attention_fn(q, k, vv, segments):
      out, vjp = jax.vjp(lambda q, k, vv: attention.flash_attention(q, k, vv, segments, True, block_q=16, block_k=16,
                                                                    interpret=True), q, k, vv)
      return (out,) + vjp(jnp.cos(out))

    single = {name: jax.jit(loss_fn(ce))(h, w) for name, ce in heads.items()}
    single_draws = {name: jax.jit(draw_fn(draw))(h, w) for name, draw in draws.items()}
    single_attention = jax.jit(attention_fn)(q, k, vv, segments)
    result = {}
    for sizes in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
      mesh = sharding.make_mesh(sharding.MeshConfig(*sizes))
      rows = NamedSharding(mesh, P(("data", "fsdp"), None))
      row = NamedSharding(mesh, P(("data", "fsdp")))
      head = NamedSharding(mesh, P("fsdp", "tensor"))  # the head's kernel as the model's rules shard it
      qkv = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
      errors, gathers = {}, set()

      def under(fn):
        def traced(*args):
          with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
        return traced

      for name, ce in heads.items():
        step = jax.jit(under(loss_fn(ce)), in_shardings=(rows, head))
        compiled = step.lower(h, w).compile()
        for line in compiled.as_text().splitlines():
          if "all-gather(" in line:
            gathers.add(re.search(r"= (\S+\[[0-9,]*\])", line).group(1))
        (value, (dh, dw)), (want, (want_dh, want_dw)) = compiled(h, w), single[name]
        errors[name] = [float(abs(value - want) / abs(want)),
                        float(jnp.abs(dh - want_dh).max() / jnp.abs(want_dh).max()),
                        float(jnp.abs(dw - want_dw).max() / jnp.abs(want_dw).max())]
      for name, draw in draws.items():
        ids, prob = jax.jit(under(draw_fn(draw)), in_shardings=(rows, head))(h, w)
        errors[name + " draws"] = [float((ids != single_draws[name][0]).mean()),
                                   float(jnp.abs(prob / single_draws[name][1] - 1).max())]
      compiled = jax.jit(under(attention_fn), in_shardings=(qkv, qkv, qkv, NamedSharding(mesh, P(("data", "fsdp"),
                                                                                           None)))).lower(
          q, k, vv, segments).compile()
      for line in compiled.as_text().splitlines():
        if "all-gather(" in line:
          gathers.add(re.search(r"= (\S+\[[0-9,]*\])", line).group(1))
      got = compiled(q, k, vv, segments)
      errors["attention"] = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(got, single_attention)]
      result[str(sizes)] = {"errors": errors, "gathers": sorted(gathers)}
    print(json.dumps(result))
"""


def test_kernels_under_a_mesh_equal_one_device_and_gather_no_activations():
  result = run_script(SCRIPT)
  for mesh, report in result.items():
    for name, errors in report["errors"].items():
      # float32: the sharded sums differ from one device's only in order (a few ulps); draws are identical
      assert max(errors) <= 1e-5, (mesh, name, errors)
    # Only the head's weights may be gathered (FSDP): f32[16,256] or its tensor shard; never the 64 rows of h or of
    # an [N, V] tensor, nor the batch of 8 of q, k, v.
    for shape in report["gathers"]:
      dims = shape.split("[")[1]
      assert not dims.startswith(("64,", "8,")), (mesh, report["gathers"])


STEP_SCRIPT = r"""
    import re
    cfg = module.get_config()  # absorbing, the masked ELBO: the fused head applies
    cfg.model.update(head_impl="tiled", head_tile=64, attention_impl="pallas", kernel_interpret=True,
                     vocab_pad_multiple=2)  # 256 bytes + the mask: 258 columns over 2 tensor shards
    cfg.train.update(batch_size=8)
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    state, step, placement, data = build(from_config(cfg, 256))
    batch = train.global_batch(placement.batch, data.train_batches[0])
    text = step.lower(state, batch).compile().as_text()
    gathers = sorted({re.search(r"= (\S+\[[0-9,]*\])", line).group(1) for line in text.splitlines()
                      if "all-gather(" in line})
    state, metrics = step(state, batch)
    print(json.dumps({"gathers": gathers, "loss": float(metrics["loss"])}))
"""


def test_the_sharded_train_step_with_kernels_gathers_no_activations():
  """The train step on mesh (2, 2, 2) with the fused tiled head and the Pallas attention (interpreted): it runs,
  and among its all-gathers (FSDP's weights) none has the batch of 8 rows or the 8 x 16 tokens in front - no
  [B, L, D] or [B x L, D] activation, no [N, V] logits, no q, k or v."""
  result = run_script(STEP_SCRIPT)
  assert result["loss"] > 0
  for shape in result["gathers"]:
    dims = shape.split("[")[1].rstrip("]").split(",")
    assert not (len(dims) >= 2 and dims[0] in ("8", "128")), result["gathers"]
