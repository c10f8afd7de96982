"""The collectives of the real compiled train step, read from the optimised HLO that XLA:TPU and XLA:GPU produce for
slices that are not here (``runtime.targets``): gradient accumulation adds no communication per micro-batch, and
gradients cross devices in float32 (or ``train.grad_reduce_dtype``) whatever the model's compute dtype. The
compiles run in one subprocess, whose JAX starts with the compilers' environment (``targets.prepare_environment``).
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from d3pm_jax.config import from_config
from d3pm_jax.runtime import hlo

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCUMS = (1, 2, 4)
BATCH = 32  # rows: 8 devices x 4 micro-batches of one row each

COMPILE = textwrap.dedent("""
    import dataclasses, importlib.util, json, sys
    from d3pm_jax.runtime import hlo, targets
    targets.prepare_environment()
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from d3pm_jax.config import from_config
    from d3pm_jax.models.transformer import Transformer
    from d3pm_jax.training import state as st, train

    spec = importlib.util.spec_from_file_location("cfg", "configs/test.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)

    def step_hlo(devices, accum, fsdp, reduce_dtype="float32"):
      cfg = module.get_config()
      cfg.model.update(d_model=64, mlp_dim=128, dtype="bfloat16")
      cfg.train.update(batch_size=BATCH, grad_accum=accum, grad_reduce_dtype=reduce_dtype)
      cfg.mesh.update(data=-1, fsdp=fsdp, tensor=1)
      config = from_config(cfg, vocab_size=256)
      model, optimizer = Transformer(config.model), st.make_optimizer(config.train)
      placement = train.make_placement(config, model, optimizer, devices=devices)
      abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        jax.eval_shape(lambda: st.init_state(config, model, optimizer)),
                                        placement.state)
      step, _ = train.compile_steps(config, model, st.process_for(config), optimizer, placement)
      batch = jax.ShapeDtypeStruct((BATCH, config.data.seq_len), jnp.int32, sharding=placement.batch)
      return step.lower(abstract, batch).compile().as_text()

    def listed(text):
      return [dataclasses.asdict(c) for c in hlo.collectives(text)]

    tpu = targets.devices(targets.parse_target("tpu:v5e-8"))
    mesh = jax.make_mesh((8,), ("x",), devices=tpu)
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))

    def looped(x_8x128):
      body = lambda i, a: jax.lax.psum(a * 2.0, "x")
      return jax.lax.fori_loop(0, 3, body, x_8x128)

    tiny = {
        "psum": jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "x"), mesh=mesh, in_specs=P("x"), out_specs=P())),
        "gather": jax.jit(jax.shard_map(lambda a: jax.lax.all_gather(a, "x", tiled=True), mesh=mesh,
                                        in_specs=P("x"), out_specs=P(), check_vma=False)),
        "looped": jax.jit(jax.shard_map(looped, mesh=mesh, in_specs=P("x"), out_specs=P(), check_vma=False)),
    }
    out = {"tiny": {name: listed(fn.lower(x).compile().as_text()) for name, fn in tiny.items()}}
    out["tpu"] = {f"{fsdp} {accum}": listed(step_hlo(tpu, accum, fsdp)) for fsdp in (1, 2) for accum in ACCUMS}
    out["tpu_bf16"] = {str(fsdp): listed(step_hlo(tpu, 2, fsdp, "bfloat16")) for fsdp in (1, 2)}
    gpu = targets.devices(targets.parse_target("gpu:h100x8"))
    out["gpu"] = {str(accum): listed(step_hlo(gpu, accum, 1)) for accum in (1, 4)}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled():
  """Every program's collectives (as dicts of ``hlo.Collective``): the train step on tpu:v5e-8 ('tpu', keyed
  'fsdp accum'; 'tpu_bf16' at grad_reduce_dtype='bfloat16', keyed by fsdp) and gpu:h100x8 ('gpu', keyed by
  accum), and three tiny shard_map programs ('tiny')."""
  prelude = f"BATCH, ACCUMS = {BATCH}, {ACCUMS}\n"
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # another process on this machine may hold libtpu
  out = subprocess.run([sys.executable, "-c", prelude + COMPILE], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  return {section: {key: [hlo.Collective(**{**c, "shapes": tuple(c["shapes"])}) for c in found]
                    for key, found in programs.items()}
          for section, programs in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def per_step_bytes(found, accum):
  """Bytes a step's collectives move per device: a collective in the accumulation loop runs ``accum`` times."""
  return sum(c.bytes * (accum if c.in_loop else 1) for c in found)


def reductions(found):
  return [c for c in found if c.kind in ("all-reduce", "reduce-scatter")]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [1, 2])
def test_accumulation_adds_no_communication_per_micro_batch(compiled, fsdp):
  """At one global batch, 4 micro-batches move what 2 do, to 5% (only the loss's scalars are summed per
  micro-batch), with as many collectives of each kind; data parallel, they also move what no accumulation does. Before
  micro-batches were each device's own rows, every micro-batch all-reduced the whole gradient and moved tokens
  between devices; under FSDP it gathered every parameter. (FSDP without accumulation reduce-scatters in the model's
  bfloat16, half the bytes: ``train.replica_axes``.)"""
  programs = {accum: compiled["tpu"][f"{fsdp} {accum}"] for accum in ACCUMS}
  for accum in ACCUMS[1:]:
    assert not [c for c in programs[accum] if c.in_loop and c.bytes > 64], hlo.summary(programs[accum])
  assert per_step_bytes(programs[4], 4) <= 1.05 * per_step_bytes(programs[2], 2), hlo.summary(programs[4])
  counts = lambda found: {kind: row["count"] for kind, row in hlo.summary(found).items()}
  assert counts(programs[2]) == counts(programs[4])
  if fsdp == 1:
    assert per_step_bytes(programs[4], 4) <= 1.05 * per_step_bytes(programs[1], 1), hlo.summary(programs[4])
    gpu = compiled["gpu"]
    assert per_step_bytes(gpu["4"], 4) <= 1.05 * per_step_bytes(gpu["1"], 1), hlo.summary(gpu["4"])


@pytest.mark.slow
def test_gradients_cross_devices_in_the_stated_dtype(compiled):
  """With a bfloat16 model, every all-reduce and reduce-scatter is float32 by default (data parallel, and FSDP
  with accumulation; TPU and GPU); with train.grad_reduce_dtype='bfloat16' the gradients' reductions, the bulk of
  their bytes, are bfloat16."""
  programs = [found for key, found in compiled["tpu"].items() if key != "2 1"] + list(compiled["gpu"].values())
  for found in programs:
    assert reductions(found) and {c.dtype for c in reductions(found)} == {"f32"}, hlo.summary(found)
  for fsdp, found in compiled["tpu_bf16"].items():
    moved = {}
    for c in reductions(found):
      moved[c.dtype] = moved.get(c.dtype, 0) + c.bytes
    assert moved.get("bf16", 0) > 0.9 * sum(moved.values()), (fsdp, moved)


@pytest.mark.slow
def test_collectives_of_tiny_programs(compiled):
  """One psum of f32[1, 128] per device is one all-reduce of 512 bytes; a tiled all-gather to [8, 128] one
  all-gather of 4096 bytes; a psum inside a fori_loop sits in a loop body."""
  tiny = compiled["tiny"]
  assert [(c.kind, c.dtype, c.bytes, c.in_loop) for c in tiny["psum"]] == [("all-reduce", "f32", 512, False)]
  assert [(c.kind, c.dtype, c.bytes) for c in tiny["gather"]] == [("all-gather", "f32", 4096)]
  assert [(c.kind, c.in_loop) for c in tiny["looped"]] == [("all-reduce", True)]


GPU_TEXT = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%async_rs (p: bf16[8,4]) -> bf16[1,4] {
  %p = bf16[8,4]{1,0} parameter(0)
  ROOT %rs = bf16[1,4]{1,0} reduce-scatter(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

%body (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %t = (s32[], f32[16]{0}) parameter(0)
  %v = f32[16]{0} get-tuple-element(%t), index=1
  %ars = f32[16]{0} all-reduce-start(%v), replica_groups={{0,1}}, to_apply=%add
  %ard = f32[16]{0} all-reduce-done(%ars)
  ROOT %out = (s32[], f32[16]{0}) tuple(%i, %ard)
}

ENTRY %main (x: f32[16], y: bf16[8,4]) -> (f32[16], bf16[1,4]) {
  %x = f32[16]{0} parameter(0)
  %y = bf16[8,4]{1,0} parameter(1)
  %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body
  %ags = ((f32[2,16]{1,0}, bf16[8,4]{1,0}), (f32[4,16]{1,0}, bf16[16,4]{1,0})) all-gather-start(%a, %b), dimensions={0}
  %agd = (f32[4,16]{1,0}, bf16[16,4]{1,0}) all-gather-done(%ags)
  %st = ((bf16[8,4]{1,0}), bf16[1,4]{1,0}, s32[]) async-start(%y), calls=%async_rs
  %dn = bf16[1,4]{1,0} async-done(%st), calls=%async_rs
  ROOT %r = (f32[16]{0}, bf16[1,4]{1,0}) tuple(%x, %dn)
}
"""


def test_collectives_of_gpu_forms():
  """XLA:GPU's forms, written out: an async pair counts once (named by its start, sized by its done's result, here
  a combined all-gather of two types), a collective wrapped in async-start is the one inside its computation, and
  one in a while body is in a loop."""
  found = hlo.collectives(GPU_TEXT)
  assert [(c.kind, c.name, c.dtype, c.bytes, c.in_loop) for c in sorted(found, key=lambda c: c.name)] == [
      ("all-gather", "ags", "bf16+f32", 4 * 16 * 4 + 16 * 4 * 2, False),
      ("all-reduce", "ars", "f32", 64, True),
      ("reduce-scatter", "rs", "bf16", 8, False)]
  assert hlo.summary(found) == {"all-reduce": {"count": 1, "bytes": 64, "in_loop": 1},
                                "all-gather": {"count": 1, "bytes": 384, "in_loop": 0},
                                "reduce-scatter": {"count": 1, "bytes": 8, "in_loop": 0}}


def test_bad_grad_reduce_dtype_names_the_choices():
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "test.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.train.grad_reduce_dtype = "float16"
  with pytest.raises(ValueError, match=r"train.grad_reduce_dtype 'float16'; valid: \['bfloat16', 'float32'\]"):
    from_config(cfg, vocab_size=256)
