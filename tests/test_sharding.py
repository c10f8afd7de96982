"""Sharding on 8 fake CPU devices (each check runs in a subprocess whose XLA_FLAGS are set before JAX starts)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from d3pm_jax.runtime.sharding import MeshConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

PRELUDE = textwrap.dedent("""
    import importlib.util, json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from d3pm_jax.config import from_config
    from d3pm_jax.data import pipeline
    from d3pm_jax.models.transformer import Transformer
    from d3pm_jax.training import train
    from d3pm_jax.training.state import build_process, init_state, make_optimizer
    spec = importlib.util.spec_from_file_location("cfg", "configs/test.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)

    def experiment(mesh, scan=False):
      cfg = module.get_config("uniform")  # V = 256 bytes: divisible by the tensor axis
      # The linear schedule's CTMC weight tau'(t) = -alpha'/alpha reaches 1e4 near t = 1, which amplifies the
      # reduction-order noise between meshes ~5x through Adam's first steps (3e-5 vs 6e-6); cosine's vanishes there.
      cfg.process.schedule = "cosine"
      cfg.model.scan_layers = scan
      cfg.train.update(batch_size=8, steps=3, ema_decay=0.9)
      cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
      return from_config(cfg, 256)

    # The train loop's pieces for `exp` on `devices`: the placed initial state, the compiled train step, the
    # placement and the data.
    def build(exp, devices=None):
      model = Transformer(exp.model)
      process = build_process(exp.process, exp.model)
      optimizer = make_optimizer(exp.train)
      placement = train.make_placement(exp, model, optimizer, devices)
      state = jax.jit(lambda: init_state(exp, model, optimizer), out_shardings=placement.state)()
      step, _ = train.compile_steps(exp, model, process, optimizer, placement)
      return state, step, placement, pipeline.build_data(exp.data, 8, 0)

    def run(mesh, devices, scan=False, exp=None):
      state, step, placement, data = build(exp or experiment(mesh, scan), devices)
      for i in range(3):
        state, _ = step(state, train.global_batch(placement.batch, data.train_batches[i]))
      return state
""")


def run_script(body: str, devices: int = 8) -> dict:
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_train_step_equals_single_device():
  """Same parameters after 3 steps on meshes (8,1,1), (2,2,2), (1,4,2) as on one device - data alone, all three
  axes, FSDP with tensor - and for the scanned-layers model on (1,4,2); tolerance atol 1e-5 (reductions are summed
  in a different order)."""
  result = run_script("""
      reference = run((1, 1, 1), jax.devices()[:1])
      errors = {}
      for mesh in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        state = run(mesh, jax.devices())
        diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                       (state.params, state.ema_params), (reference.params, reference.ema_params))
        errors[str(mesh)] = max(jax.tree_util.tree_leaves(diffs))
      # Layers scanned over stacked weights (model.scan_layers), FSDP + tensor against one device.
      scanned = [run(mesh, devices, scan=True) for mesh, devices in [((1, 1, 1), jax.devices()[:1]),
                                                                     ((1, 4, 2), jax.devices())]]
      errors["scanned (1, 4, 2)"] = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), scanned[0].params, scanned[1].params)))
      moved = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), reference.params,
          init_state(experiment((1, 1, 1)), Transformer(experiment((1, 1, 1)).model),
                           make_optimizer(experiment((1, 1, 1)).train)).params)))
      print(json.dumps({"errors": errors, "moved": moved}))
  """)
  assert result["moved"] > 1e-3  # training really changed the parameters
  for mesh, err in result["errors"].items():
    assert err < 1e-5, (mesh, err)


def test_fsdp_really_shards_parameters():
  result = run_script("""
      state = run((1, 8, 1), jax.devices())
      fractions = {}
      for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        if leaf.size >= 1024:
          shard = leaf.addressable_shards[0].data
          fractions[jax.tree_util.keystr(path)] = shard.size / leaf.size
      mu = state.opt_state[1][0].mu["block_0"]["mlp"]["wi_gate"]["kernel"]
      print(json.dumps({"fractions": fractions, "mu": mu.addressable_shards[0].data.size / mu.size}))
  """)
  assert result["fractions"] and all(f == 1 / 8 for f in result["fractions"].values()), result
  assert result["mu"] == 1 / 8  # the optimiser state follows its parameter


@pytest.mark.parametrize("sizes,devices,match", [
    ((3, 1, 1), 8, r"has 3 devices but 8 are available"),
    ((-1, -1, 1), 8, "at most one may be -1"),
    ((-1, 3, 1), 8, "8 devices do not divide by 3"),
])
def test_invalid_meshes_raise(sizes, devices, match):
  with pytest.raises(ValueError, match=match):
    MeshConfig(*sizes).shape(devices)


def test_indivisible_dimension_names_the_parameter():
  result = run_script("""
      try:
        run((1, 1, 8), jax.devices())  # 2 heads cannot split over 8 tensor devices
        print(json.dumps({"error": None}))
      except ValueError as e:
        print(json.dumps({"error": str(e)}))
  """)
  assert result["error"] and "does not divide over mesh axes ('tensor',)" in result["error"]


def test_sharded_train_step_lowers_for_tpu_and_cuda():
  result = run_script("""
      exp = experiment((2, 2, 2))
      model = Transformer(exp.model)
      process = build_process(exp.process, exp.model)
      optimizer = make_optimizer(exp.train)
      placement = train.make_placement(exp, model, optimizer)
      abstract = jax.eval_shape(lambda: init_state(exp, model, optimizer))
      abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract, placement.state)
      batch = jax.ShapeDtypeStruct((8, exp.data.seq_len), jnp.int32, sharding=placement.batch)
      step, _ = train.compile_steps(exp, model, process, optimizer, placement)
      sizes = {}
      for platform in ("tpu", "cuda"):
        text = step.trace(abstract, batch).lower(lowering_platforms=(platform,)).as_text()
        sizes[platform] = [len(text), text.count("sharding_constraint")]
      print(json.dumps(sizes))
  """)
  for platform in ("tpu", "cuda"):
    size, constraints = result[platform]
    assert size > 1000
    assert constraints >= 2 * 4  # the activation constraints reach the program: >= 4 per layer, 2 layers


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  """Train 2 steps on (8,1,1) and checkpoint; resume on (1,4,2) for 2 more. The result equals 4 steps straight
  on (8,1,1) (atol 1e-5) and the restored state lives on the new mesh."""
  result = run_script(f"""
      import dataclasses
      from d3pm_jax.runtime.sharding import MeshConfig
      def with_mesh(mesh, steps):
        exp = experiment(mesh)
        return dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=steps, checkpoint_every=2,
                                                                  eval_every=100))
      data = pipeline.build_data(with_mesh((1, 1, 1), 4).data, 8, 0)
      work = {str(tmp_path)!r}
      train.train_and_evaluate(with_mesh((8, 1, 1), 4), work + "/moved", data, stop_after=2, quiet=True)
      moved = train.train_and_evaluate(with_mesh((1, 4, 2), 4), work + "/moved", data, quiet=True)["state"]
      straight = train.train_and_evaluate(with_mesh((8, 1, 1), 4), work + "/straight", data, quiet=True)["state"]
      err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), moved.params, straight.params)))
      kernel = moved.params["block_0"]["mlp"]["wi_gate"]["kernel"]
      print(json.dumps({{"err": err, "mesh": dict(kernel.sharding.mesh.shape),
                         "fraction": kernel.addressable_shards[0].data.size / kernel.size}}))
  """)
  assert result["err"] < 1e-5, result
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and result["fraction"] == 1 / 8


def test_padded_vocabulary_shards_over_tensor():
  """The absorbing byte vocabulary (257 states) cannot split over tensor=2; padded to a multiple of 128 it does,
  and the sharded model trains like the single-device one (atol 1e-5)."""
  result = run_script("""
      import dataclasses
      def padded(mesh, multiple):
        exp = experiment(mesh)
        exp = dataclasses.replace(exp, process=dataclasses.replace(exp.process, name="absorbing", loss="masked"))
        return dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=257,
                                                                  vocab_pad_multiple=multiple))
      try:
        run(None, jax.devices(), exp=padded((1, 4, 2), 1))
        error = None
      except ValueError as e:
        error = str(e)
      sharded = run(None, jax.devices(), exp=padded((1, 4, 2), 128))
      single = run(None, jax.devices()[:1], exp=padded((1, 1, 1), 128))
      table = sharded.params["embed"]["embedding"]
      err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), sharded.params, single.params)))
      print(json.dumps({"error": error, "shape": table.shape, "fraction": table.addressable_shards[0].data.size /
                        table.size, "err": err}))
  """)
  assert "dimension 257 does not divide" in result["error"] and "vocab_pad_multiple" in result["error"]
  assert result["shape"] == [384, 32] and result["fraction"] == 1 / 8
  assert result["err"] < 1e-5


def test_scale_configs_place_on_their_meshes():
  """configs/md4_small.py and configs/diffusion_1b.py (32k vocabulary) place on 8 devices with their own mesh
  and with FSDP + tensor; for the ~1B model, FSDP over 8 devices holds at most 1/7 of the replicated per-device
  train state (the figure benchmarks/scaling.py prints), from the shardings the train loop uses (no compile); its
  train step, at a small batch, lowers for TPU and CUDA, and with the fused output head it does without the
  [B x L, V] logits."""
  result = run_script("""
      import dataclasses
      from d3pm_jax.models.transformer import count_params
      out = {}
      for name in ("md4_small", "diffusion_1b"):
        spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        base = from_config(mod.get_config(), 32000)
        model, optimizer = Transformer(base.model), make_optimizer(base.train)
        abstract = jax.eval_shape(lambda: init_state(base, model, optimizer))
        per_device = {}
        for mesh in ("config", (8, 1, 1), (1, 8, 1), (1, 4, 2)):
          exp = base if mesh == "config" else dataclasses.replace(base, mesh=dataclasses.replace(
              base.mesh, data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
          placement = train.make_placement(exp, model, optimizer)
          per_device[str(mesh)] = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(
              jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(placement.state)))
        out[name] = {"params": count_params(abstract.params), "bytes": per_device}
      # The real ~1B step (bf16, remat, scanned layers, FSDP + tensor) lowers for TPU and GPU.
      state_in = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract, placement.state)
      batch_in = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=placement.batch)
      step, _ = train.compile_steps(exp, model, build_process(exp.process, exp.model), optimizer, placement)
      texts = {p: step.trace(state_in, batch_in).lower(lowering_platforms=(p,)).as_text() for p in ("tpu", "cuda")}
      logits_type = re.compile(f"tensor<(?:8x128|1024)x{exp.model.padded_vocab_size}xf32>")
      out["lowered"] = {p: [len(text), bool(logits_type.search(text))] for p, text in texts.items()}
      # ... and with the fused, tiled output head (pallas_kernels/fused_ce.py): no [B, L, V] logits.
      fused = dataclasses.replace(exp, model=dataclasses.replace(exp.model, head_impl="tiled"))
      step, _ = train.compile_steps(fused, Transformer(fused.model), build_process(fused.process, fused.model),
                                    optimizer, placement)
      texts = {p: step.trace(state_in, batch_in).lower(lowering_platforms=(p,)).as_text() for p in ("tpu", "cuda")}
      out["lowered_fused"] = {p: [len(text), bool(logits_type.search(text))] for p, text in texts.items()}
      print(json.dumps(out))
  """)
  assert 1.0e9 < result["diffusion_1b"]["params"] < 1.2e9
  assert 1.2e8 < result["md4_small"]["params"] < 1.6e8
  big = result["diffusion_1b"]["bytes"]
  assert big["(1, 8, 1)"] <= big["(8, 1, 1)"] / 7 and big["(1, 4, 2)"] <= big["(8, 1, 1)"] / 7
  assert big["config"] == big["(1, 8, 1)"]  # its default mesh is FSDP over every device
  assert result["md4_small"]["bytes"]["config"] == result["md4_small"]["bytes"]["(8, 1, 1)"]
  for platform in ("tpu", "cuda"):  # the [B x L, V] float32 logits exist in the plain step, not in the fused one
    assert result["lowered"][platform][0] > 10_000 and result["lowered"][platform][1]
    assert result["lowered_fused"][platform][0] > 10_000 and not result["lowered_fused"][platform][1]
