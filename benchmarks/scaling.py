"""Per-device memory of the ~1B config's train state on 8 fake CPU devices: replicated vs FSDP vs FSDP + tensor.

    python benchmarks/scaling.py [--config configs/diffusion_1b.py] [--devices 8] [--no-compile]

For each mesh over (data, fsdp, tensor) it lowers and compiles the real sharded train step (``train.compile_steps``,
the one the train loop runs) with abstract inputs, so nothing of the model's size is allocated, and prints:
- state/device: parameters + Adam moments + EMA + step and rng held by one device, summed from the shardings the
  train loop places them with (exact);
- args/device: XLA's own ``memory_analysis().argument_size_in_bytes`` of the compiled step (state + one batch);
- temp/device: XLA's temporary buffers for the step (activations, gradients, gathered weights), for a small lowering
  batch, so read it as relative across meshes, not as the production figure. A config with ``scan_layers`` also
  gets an FSDP row with the layers unrolled, to show what the scan saves.
Target (issue 5): FSDP over 8 devices holds at most 1/7 of the replicated per-device state.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time

import harness  # the sibling helper (this directory is the script's path)


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = harness.parser(__doc__)
  parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "diffusion_1b.py"))
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000, help="tokenizer vocabulary (the model adds the mask)")
  parser.add_argument("--batch", type=int, default=8, help="global batch of the lowering")
  parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the lowering")
  parser.add_argument("--no-compile", action="store_true", help="shardings only: skip XLA's memory analysis")
  args = parser.parse_args()
  # Fake devices must be requested before JAX initialises its CPU backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import numpy as np

  from d3pm_jax.config import from_config
  from d3pm_jax.models.transformer import Transformer, count_params
  from d3pm_jax.training import train
  from d3pm_jax.training.state import build_process, init_state, make_optimizer

  n = args.devices
  base = from_config(_load_config(args.config), vocab_size=args.vocab)
  base = dataclasses.replace(base, data=dataclasses.replace(base.data, seq_len=args.seq_len),
                             train=dataclasses.replace(base.train, batch_size=args.batch, grad_accum=1))
  meshes = [("replicated (data parallel)", (n, 1, 1), False), ("FSDP", (1, n, 1), False),
            ("FSDP + tensor", (1, n // 2, 2), False)]
  if base.model.scan_layers:  # what scanning the blocks saves: the same FSDP step with the layers unrolled
    meshes.append(("FSDP, layers unrolled", (1, n, 1), True))
  model = Transformer(base.model)
  process = build_process(base.process, base.model)
  optimizer = make_optimizer(base.train)
  abstract = jax.eval_shape(lambda: init_state(base, model, optimizer))
  total_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
  print(f"jax {jax.__version__} on {n} fake {jax.devices()[0].platform} devices; config "
        f"{os.path.basename(args.config)}: {count_params(abstract.params):,} parameters, train state "
        f"{total_bytes / 2**30:.2f} GiB (float32 parameters + Adam mu, nu + EMA); lowering batch "
        f"{args.batch} x {args.seq_len}")
  print(f"{'mesh':28s} {'(data,fsdp,tensor)':>18s} {'state/device':>13s} {'vs replicated':>13s} "
        f"{'args/device':>12s} {'temp/device':>12s} {'compile s':>9s}")
  replicated_bytes = None
  for name, mesh, unrolled in meshes:
    exp = dataclasses.replace(base, mesh=dataclasses.replace(base.mesh, data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
    if unrolled:
      exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, scan_layers=False))
    model = Transformer(exp.model)
    abstract = jax.eval_shape(lambda: init_state(exp, model, optimizer))
    placement = train.make_placement(exp, model, optimizer)
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                     for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(placement.state)))
    replicated_bytes = replicated_bytes or per_device
    args_text = temp_text = compile_text = "-"
    if not args.no_compile:
      state_in = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract, placement.state)
      batch_in = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=placement.batch)
      train_step, _ = train.compile_steps(exp, model, process, optimizer, placement)
      start = time.perf_counter()
      memory = train_step.trace(state_in, batch_in).lower().compile().memory_analysis()
      compile_text = f"{time.perf_counter() - start:9.1f}"
      args_text = f"{memory.argument_size_in_bytes / 2**30:8.3f} GiB"
      temp_text = f"{memory.temp_size_in_bytes / 2**30:8.3f} GiB"
    print(f"{name:28s} {str(mesh):>18s} {per_device / 2**30:9.3f} GiB {replicated_bytes / per_device:12.2f}x "
          f"{args_text:>12s} {temp_text:>12s} {compile_text:>9s}", flush=True)
  print(f"target: FSDP over {n} devices holds <= 1/{n - 1} of the replicated per-device state")


if __name__ == "__main__":
  sys.exit(main())
