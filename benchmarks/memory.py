"""Temporary memory of the output head's loss and gradient: the naive head (full ``[N, V]`` float32 logits, as
``model.head_impl='xla'`` computes them) against the fused, tiled head (``pallas_kernels/fused_ce.py``), from XLA's
own ``compiled.memory_analysis()`` of ``value_and_grad`` with respect to the hidden states and the head's kernel.
The target: the fused head needs at most 25% of the naive head's temporary bytes.

    python benchmarks/memory.py [--tokens 8192] [--width 768] [--vocab 32000,50257] [--tile 2048]

On a GPU, ``--impl=pallas`` measures the Pallas kernels instead of the lax.scan twin.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pallas_kernels import fused_ce  # noqa: E402
import harness  # noqa: E402  (the sibling helper: this directory is the script's path)


def temp_bytes(loss_fn, n: int, d: int, v: int) -> dict:
  """XLA's temporary and argument bytes of ``value_and_grad(loss_fn)`` compiled for these shapes."""
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((n,), jnp.int32)
  weights = jax.ShapeDtypeStruct((n,), jnp.float32)

  def loss(h, w, targets, weights):
    return loss_fn(h, w, targets, weights, num_classes=v, exclude=v - 1).sum()  # the last class: the mask

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, targets, weights).compile()
  stats = compiled.memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "args": stats.argument_size_in_bytes,
          "out": stats.output_size_in_bytes}


def main():
  parser = harness.parser(__doc__)
  parser.add_argument("--tokens", type=int, default=8 * 1024, help="N: hidden states (batch x length)")
  parser.add_argument("--width", type=int, default=768, help="D: model width")
  parser.add_argument("--vocab", default="32000,50257", help="V: vocabulary sizes (the mask class included)")
  parser.add_argument("--tile", type=int, default=2048, help="vocabulary columns per tile of the fused head")
  parser.add_argument("--impl", default="tiled", choices=["tiled", "pallas"], help="the fused implementation")
  args = parser.parse_args()
  fused = (functools.partial(fused_ce.weighted_ce_tiled, tile_v=args.tile) if args.impl == "tiled"
           else fused_ce.weighted_ce_pallas)
  print(f"loss + gradient (h, W) of the output head, N = {args.tokens} tokens, D = {args.width}, float32; "
        f"XLA temporary bytes on {jax.devices()[0].platform}")
  print(f"{'V':>7s} {'naive head':>14s} {'fused ' + args.impl + ' head':>18s} {'fused / naive':>14s} "
        f"{'[N, V] float32 logits':>22s}")
  worst = 0.0
  for v in (int(x) for x in args.vocab.split(",")):
    naive = temp_bytes(fused_ce.weighted_ce_reference, args.tokens, args.width, v)
    tiled = temp_bytes(fused, args.tokens, args.width, v)
    ratio = tiled["temp"] / naive["temp"]
    worst = max(worst, ratio)
    print(f"{v:7d} {naive['temp'] / 2**30:10.3f} GiB {tiled['temp'] / 2**30:14.3f} GiB {ratio:13.1%} "
          f"{args.tokens * v * 4 / 2**30:18.3f} GiB")
  print(f"fused / naive temporary memory, worst case: {worst:.1%} (target <= 25%): "
        f"{'met' if worst <= 0.25 else 'NOT met'}")


if __name__ == "__main__":
  main()
