"""Meshes and logical-axis rules: the one place where parameters and batches meet devices.

The mesh has axes ``(data, fsdp, tensor)``. Parameters carry logical axis names (``models/transformer.py``); the
rules map each logical name to mesh axes (FSDP shards ``embed`` over ``fsdp``; Megatron-style tensor parallelism
shards ``heads``, ``mlp`` and ``vocab`` over ``tensor``); the batch is sharded over ``(data, fsdp)``. The axes are
``Auto`` on purpose: XLA propagates shardings through the step from the in/out shardings given here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("cond", None),
    ("cond_hidden", None),
    ("layers", None),                # the stacked axis of model.scan_layers
    # Activations: the batch over (data, fsdp), heads / MLP hidden / logits over tensor (Megatron), the residual
    # stream's width whole on every device (FSDP gathers weights, not activations).
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh sizes over ``(data, fsdp, tensor)``; one size may be -1 for "all remaining devices"."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple = DEFAULT_RULES

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: each must be positive, and at most one "
                       "may be -1 (the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh sizes {tuple(sizes)}: {num_devices} devices do not divide by {known}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} has {math.prod(sizes)} devices but "
                       f"{num_devices} are available; make the product equal the device count")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _mesh_axes(spec_entry) -> tuple:
  if spec_entry is None:
    return ()
  return spec_entry if isinstance(spec_entry, tuple) else (spec_entry,)


def _checked(spec: PartitionSpec, shape, mesh, what: str) -> NamedSharding:
  for dim, entry in zip(shape, spec):
    size = math.prod(mesh.shape[a] for a in _mesh_axes(entry))
    if dim % size:
      raise ValueError(f"{what}: dimension {dim} does not divide over mesh axes {_mesh_axes(entry)} of total size "
                       f"{size} (mesh {dict(mesh.shape)}); change the mesh or the model size (a vocabulary is padded by "
                       "model.vocab_pad_multiple)")
  return NamedSharding(mesh, spec)


def param_shardings(boxed_params, mesh, rules) -> Any:
  """NamedShardings for a tree of ``nn.Partitioned`` parameters (their logical names mapped by ``rules``)."""
  specs = nn.get_partition_spec(boxed_params)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_params))
  spec_leaves = jax.tree_util.tree_leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  shardings = [_checked(spec, leaf.shape, mesh, jax.tree_util.keystr(path))
               for (path, leaf), spec in zip(leaves, spec_leaves)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(nn.unbox(boxed_params)), shardings)


def like_params(tree, params, shardings, mesh) -> Any:
  """Shardings for a tree (an optimiser state) whose leaves mirror parameters: a leaf whose key path ends with a
  parameter's path and has its shape takes that parameter's sharding; every other leaf is replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(shardings)):
    by_path[tuple(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    for start in range(len(path)):
      match = by_path.get(tuple(path[start:]))
      if match is not None and match[0] == np.shape(leaf):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh, rules, batch_size: int, seq_len: int) -> NamedSharding:
  spec = nn.logical_to_mesh(PartitionSpec("batch", None), rules)
  return _checked(spec, (batch_size, seq_len), mesh, "the batch")


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def under_mesh_rules(fn, mesh: jax.sharding.Mesh, rules):
  """``fn`` traced with the mesh and the logical-axis rules in scope, so the model's activation constraints
  (``with_logical_constraint``) become sharding constraints and the kernels run per shard."""
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped

