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
# How each kernel shows in optimised HLO: a Mosaic kernel's custom call (the fused head, splash attention), a
# Triton kernel's (the fused head), cuDNN's fused attention.
KERNEL_MARKS = {"mosaic": "tpu_custom_call", "triton": "__gpu$xla.gpu.triton", "cudnn": "__cudnn$"}
BATCH = 32  # rows: 8 devices x 4 micro-batches of one row each

COMPILE = textwrap.dedent("""
    import dataclasses, importlib.util, json, re, sys
    from d3pm_jax.runtime import hlo, targets
    targets.prepare_environment()
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from d3pm_jax.config import from_config
    from d3pm_jax.models.transformer import Transformer
    from d3pm_jax.training import state as st, train
    from pallas_kernels.common import compiling_for

    spec = importlib.util.spec_from_file_location("cfg", "configs/test.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)

    def step_hlo(devices, accum, fsdp, reduce_dtype="float32", platform=None):
      cfg = module.get_config()
      cfg.model.update(d_model=64, mlp_dim=128, dtype="bfloat16")
      if platform:  # the kernels 'auto' picks there; splash attention takes rows of a multiple of 128
        cfg.model.update(head_impl="auto", attention_impl="auto", max_len=128)
        cfg.data.seq_len = 128
      cfg.train.update(batch_size=BATCH, grad_accum=accum, grad_reduce_dtype=reduce_dtype)
      cfg.mesh.update(data=-1, fsdp=fsdp, tensor=1)
      config = from_config(cfg, vocab_size=256)
      with compiling_for(platform or "cpu"):
        model, optimizer = Transformer(config.model), st.make_optimizer(config.train)
        placement = train.make_placement(config, model, optimizer, devices=devices)
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          jax.eval_shape(lambda: st.init_state(config, model, optimizer)),
                                          placement.state)
        step, _ = train.compile_steps(config, model, st.process_for(config), optimizer, placement)
        batch = jax.ShapeDtypeStruct((BATCH, config.data.seq_len), jnp.int32, sharding=placement.batch)
        return step.lower(abstract, batch).compile().as_text()

    def kernels(text):
      return {name: text.count(mark) for name, mark in KERNEL_MARKS.items()}

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
    out["tpu_bf16"] = {f"{fsdp} {accum}": listed(step_hlo(tpu, accum, fsdp, "bfloat16"))
                       for fsdp, accum in ((1, 2), (2, 1))}
    gpu = targets.devices(targets.parse_target("gpu:h100x8"))
    out["gpu"] = {str(accum): listed(step_hlo(gpu, accum, 1)) for accum in (1, 4)}
    out["auto"], out["auto_kernels"] = {}, {}
    for platform, devices in (("tpu", tpu), ("gpu", gpu)):
      for accum in (1, 4):
        text = step_hlo(devices, accum, 1, platform=platform)
        out["auto"][f"{platform} {accum}"] = listed(text)
        out["auto_kernels"][f"{platform} {accum}"] = kernels(text)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled():
  """Every program's collectives (as dicts of ``hlo.Collective``): the train step on tpu:v5e-8 ('tpu', keyed
  'fsdp accum'; 'tpu_bf16' at grad_reduce_dtype='bfloat16', data parallel with accumulation, the per-replica sum,
  and FSDP without, where the model's weight-gradient products reduce) and gpu:h100x8 ('gpu', keyed by
  accum), the step with the kernels model.head_impl='auto' and attention_impl='auto' pick there ('auto', keyed
  'platform accum'; 'auto_kernels': how many of each ``KERNEL_MARKS`` its HLO holds), and three tiny shard_map
  programs ('tiny')."""
  prelude = f"BATCH, ACCUMS, KERNEL_MARKS = {BATCH}, {ACCUMS}, {KERNEL_MARKS}\n"
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # another process on this machine may hold libtpu
  out = subprocess.run([sys.executable, "-c", prelude + COMPILE], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  sections = json.loads(out.stdout.strip().splitlines()[-1])
  kernels = sections.pop("auto_kernels")
  return {"auto_kernels": kernels,
          **{section: {key: [hlo.Collective(**{**c, "shapes": tuple(c["shapes"])}) for c in found]
                       for key, found in programs.items()}
             for section, programs in sections.items()}}


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
  between devices; under FSDP it gathered every parameter."""
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
  """With a bfloat16 model, every all-reduce and reduce-scatter is float32 by default (data parallel, FSDP with
  accumulation and FSDP without, where XLA reduces each weight gradient as the model makes it: TPU and GPU); with
  train.grad_reduce_dtype='bfloat16' the gradients' reductions, the bulk of their bytes, are bfloat16. (Before
  ``transformer.weight_gradients_in``, FSDP without accumulation reduced in bfloat16 whatever was stated.)"""
  programs = list(compiled["tpu"].values()) + list(compiled["gpu"].values())
  for found in programs:
    assert reductions(found) and {c.dtype for c in reductions(found)} == {"f32"}, hlo.summary(found)
  for fsdp, found in compiled["tpu_bf16"].items():
    moved = {}
    for c in reductions(found):
      moved[c.dtype] = moved.get(c.dtype, 0) + c.bytes
    assert moved.get("bf16", 0) > 0.9 * sum(moved.values()), (fsdp, moved)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_kernel_steps_reduce_gradients_once_in_float32(compiled, platform):
  """With the kernels 'auto' picks (TPU: the Mosaic fused head and splash attention; GPU: the Triton fused head and
  cuDNN attention; their custom calls are in the HLO, so no XLA fallback passes for them), a bfloat16 model's
  gradients still stay on each data replica over the micro-batches and cross devices once per step in float32:
  accumulating 4 micro-batches adds only the loss's scalars per micro-batch, no collective outside the loop, and
  moves what no accumulation does. Before, the fused head opted the step out, and most gradients were all-reduced
  in bfloat16."""
  marks = {"tpu": ("mosaic",), "gpu": ("triton", "cudnn")}[platform]
  programs = {accum: compiled["auto"][f"{platform} {accum}"] for accum in (1, 4)}
  for accum, found in programs.items():
    assert all(compiled["auto_kernels"][f"{platform} {accum}"][mark] for mark in marks), compiled["auto_kernels"]
    assert reductions(found) and {c.dtype for c in reductions(found)} == {"f32"}, hlo.summary(found)
  assert not [c for c in programs[4] if c.in_loop and c.bytes > 64], hlo.summary(programs[4])
  outside = lambda found: sorted(c.kind for c in found if not c.in_loop)
  assert outside(programs[4]) == outside(programs[1]), (hlo.summary(programs[1]), hlo.summary(programs[4]))
  assert per_step_bytes(programs[4], 4) <= 1.05 * per_step_bytes(programs[1], 1), hlo.summary(programs[4])


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


SPLASH_TEXT = """HloModule m

%body (p: f32[16]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  %k = f32[16]{0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={"a": {
}},
}}, metadata={op_name="splash"}
  ROOT %ar = f32[16]{0} all-reduce(%k), replica_groups={}, to_apply=%add
}

ENTRY %main (x: f32[16]) -> f32[16] {
  %x = f32[16]{0} parameter(0)
  ROOT %w = f32[16]{0} while(%x), condition=%cond, body=%body
}
"""


def test_a_kernels_multiline_metadata_does_not_end_its_computation():
  """Splash attention's custom calls carry JSON metadata over several lines, some starting with braces: the
  collective after one is still found, and still inside its loop body."""
  assert [(c.kind, c.name, c.in_loop) for c in hlo.collectives(SPLASH_TEXT)] == [("all-reduce", "ar", True)]


def test_bad_grad_reduce_dtype_names_the_choices():
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "test.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.train.grad_reduce_dtype = "float16"
  with pytest.raises(ValueError, match=r"train.grad_reduce_dtype 'float16'; valid: \['bfloat16', 'float32'\]"):
    from_config(cfg, vocab_size=256)


KERNEL_STEP_SCRIPT = r"""
    def kernel_experiment(mesh, accum, head):
      cfg = module.get_config()  # absorbing, the masked ELBO: the fused head applies
      cfg.model.update(head_impl=head, head_tile=64, attention_impl="pallas", kernel_interpret=True,
                       vocab_pad_multiple=8)  # 256 bytes + the mask, a multiple of every mesh axis
      cfg.train.update(batch_size=8, grad_accum=accum, ema_decay=0.9)  # the rows run() feeds
      cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
      return from_config(cfg, 256)

    errors = {}
    for head, accum, mesh in [("tiled", 1, (8, 1, 1)), ("tiled", 2, (2, 2, 2)), ("pallas", 1, (4, 2, 1))]:
      reference = run(None, jax.devices()[:1], exp=kernel_experiment((1, 1, 1), accum, head))
      state = run(None, jax.devices(), exp=kernel_experiment(mesh, accum, head))
      errors[f"{head} accum {accum} {mesh}"] = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), state.params, reference.params)))
    print(json.dumps(errors))
"""


@pytest.mark.slow
def test_per_replica_step_with_kernels_equals_one_device():
  """On 8 fake CPU devices, the step that keeps each replica's gradient (``train.PerReplica``) with the fused head
  (tiled, and the Triton kernels interpreted) and the Pallas attention (interpreted), whose shard_maps leave the
  replica axes to the vmap and whose head weight is read per replica, trains the parameters one device does: data
  alone; accumulation, whose replicas are (data, fsdp), beside tensor; data replicas whose rows FSDP shards.
  atol 1e-5 (sums reordered)."""
  from test_sharding import run_script
  for name, err in run_script(KERNEL_STEP_SCRIPT).items():
    assert err < 1e-5, (name, err)


BLOCK_MASK = textwrap.dedent("""
    import importlib.util, json, re
    from d3pm_jax.runtime import targets
    targets.prepare_environment()
    import jax, jax.numpy as jnp
    from d3pm_jax.config import from_config
    from d3pm_jax.models.transformer import Transformer
    from d3pm_jax.training import state as st, train
    from pallas_kernels.common import compiling_for

    spec = importlib.util.spec_from_file_location("cfg", "configs/test.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    cfg = module.get_config("bd3lm")
    cfg.model.update(d_model=64, mlp_dim=128, num_heads=1, dtype="bfloat16", attention_impl="auto",
                     head_impl="auto", max_len=128)
    cfg.data.seq_len, cfg.process.block_size = 128, 16
    cfg.train.batch_size = 32
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    config = from_config(cfg, vocab_size=256)
    with compiling_for("gpu"):
      model, optimizer = Transformer(config.model), st.make_optimizer(config.train)
      placement = train.make_placement(config, model, optimizer,
                                       devices=targets.devices(targets.parse_target("gpu:h100x8")))
      abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        jax.eval_shape(lambda: st.init_state(config, model, optimizer)),
                                        placement.state)
      step, _ = train.compile_steps(config, model, st.process_for(config), optimizer, placement)
      text = step.lower(abstract, jax.ShapeDtypeStruct((32, 128), jnp.int32, sharding=placement.batch)).compile().as_text()
    print(json.dumps({"global": len(re.findall(r"\\[32,256,256\\]", text)), "shard": len(re.findall(r"\\[4,256,256\\]", text)),
                      "cudnn": text.count("__cudnn$")}))
""")


@pytest.mark.slow
def test_block_diffusions_attention_mask_is_built_per_data_shard():
  """Block diffusion on 8 H100s (cuDNN attention, data parallel, 4 rows a device): the [rows, 2L, 2L] attention
  mask made from the block numbers is built for each device's own 4 rows, never for the global batch of 32. The
  block numbers are an iota with no sharding of their own, and before they were laid out by row the compiled step
  built 18 global-batch masks on every device (at owt_bd3lm's 64 rows a device, an s32[512, 2048, 2048] buffer of
  8 GiB; its step fell from 55.9 to 49.9 GiB). Mutation: the block numbers left unconstrained."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  out = subprocess.run([sys.executable, "-c", BLOCK_MASK], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  found = json.loads(out.stdout.strip().splitlines()[-1])
  assert found["cudnn"] > 0 and found["global"] == 0 and found["shard"] > 0, found
