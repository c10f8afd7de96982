"""Matrix-product FLOPs of a traced program, counted from its jaxpr so that nothing is hidden in a loop or a kernel.

A compiled program's own cost analysis undercounts a training step: libtpu counts a ``while`` body once (one layer
of ``model.scan_layers``, one micro-batch of ``train.grad_accum``, one step of a sampler's scan) and nothing inside a
Pallas call that declares no cost, and XLA:GPU gives none at all. Here every ``dot_general`` counts
``2 x (output elements) x (contracted size)``; a ``scan`` body counts ``length`` times; a ``shard_map`` body (whose
shapes are one shard's) counts once per shard; a Pallas call counts its declared ``pl.CostEstimate``; cuDNN's fused
attention counts its products (the whole score matrix, as XLA's attention computes it); of a ``cond``'s branches
the costliest counts. Elementwise work is left out: it is a few percent of a transformer's
products and not what a matmul peak measures. A ``while_loop`` of unknown trip count counts its body once and is
reported, as is a Pallas call that declares no cost (splash attention's), so a figure that undercounts says so.
"""
from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class Count:
  flops: float
  unbounded_loops: int = 0    # while loops whose body was counted once
  uncounted_kernels: int = 0  # Pallas calls without a cost estimate, counted as nothing
  kernels: frozenset = frozenset()  # the names of the Pallas calls met

  def __add__(self, other: "Count") -> "Count":
    return Count(self.flops + other.flops, self.unbounded_loops + other.unbounded_loops,
                 self.uncounted_kernels + other.uncounted_kernels, self.kernels | other.kernels)

  def scaled(self, factor: float) -> "Count":
    return dataclasses.replace(self, flops=self.flops * factor)


def _jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _jaxprs(item)


# cuDNN's fused attention (jax.nn.dot_product_attention(implementation='cudnn')): products per (query, key, width)
# triple: forward Q K^T and P V; backward the scores again, then dV, dP, dQ and dK.
_CUDNN_ATTENTION = {"dot_product_attention_fwd_wrapper": 4, "dot_product_attention_bwd_wrapper": 10}


def _attention_flops(eqn) -> float:
  q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  if "BNTH" in str(eqn.params.get("layout", "")):  # [B, heads, length, width]
    batch, heads, queries, width = q
    keys = k[2]
  else:  # [B, length, heads, width]
    batch, queries, heads, width = q
    keys = k[1]
  return float(_CUDNN_ATTENTION[eqn.primitive.name] * batch * heads * queries * keys * width)


def _dot_flops(eqn) -> float:
  (contract_lhs, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract_lhs)


def count_jaxpr(jaxpr) -> Count:
  """The matrix-product FLOPs of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``), every loop and shard counted."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = Count(0.0)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += Count(_dot_flops(eqn))
    elif name in _CUDNN_ATTENTION:
      total += Count(_attention_flops(eqn))
    elif name == "pallas_call":
      estimate = eqn.params.get("cost_estimate")
      names = frozenset({str(eqn.params.get("name") or "pallas_call")})
      total += Count(float(estimate.flops) if estimate is not None else 0.0, 0, int(estimate is None), names)
    elif name == "scan":
      total += count_jaxpr(eqn.params["jaxpr"]).scaled(eqn.params["length"])
    elif name == "while":
      total += count_jaxpr(eqn.params["body_jaxpr"]) + count_jaxpr(eqn.params["cond_jaxpr"]) + Count(0.0, 1)
    elif name == "cond":
      branches = [count_jaxpr(b) for b in eqn.params["branches"]]
      total += max(branches, key=lambda c: c.flops)
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      shards = math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
      total += count_jaxpr(eqn.params["jaxpr"]).scaled(shards)
    else:
      for value in eqn.params.values():
        for sub in _jaxprs(value):
          total += count_jaxpr(sub)
  return total


def count(fn, *args) -> Count:
  """``count_jaxpr`` of ``fn`` traced at ``args`` (arrays or ``ShapeDtypeStruct``s)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args))
