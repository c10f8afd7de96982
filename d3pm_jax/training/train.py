"""The one train loop: placement on the mesh, jit-compiled train and eval steps, validation during training and
samples at the end, for 1 device, N devices and N hosts.

``train_and_evaluate(config, workdir)`` trains, evaluates validation bits per token, writes metrics to
``workdir/metrics.jsonl`` (``metrics.py``) and checkpoints (state, rng and data-iterator position) to
``workdir/checkpoints`` (``checkpoints.py``), with the train loop's wall time summed over its sessions
(``train_seconds``, also logged at each evaluation). A workdir with checkpoints resumes from the latest one; a
checkpoint whose model or process differs from the config is refused, never mixed. The run's building blocks
(train state, optimiser, process) are in ``state.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3pm_jax import losses, sampling
from d3pm_jax.config import ExperimentConfig, from_config
from d3pm_jax.data import pipeline
from d3pm_jax.models.transformer import Transformer, count_params, weight_gradients_in
from d3pm_jax.runtime import files, multihost, sharding
from d3pm_jax.runtime.sharding import under_mesh_rules
from d3pm_jax.training import checkpoints, faults, metrics as metrics_lib, preemption
from d3pm_jax.training.state import (TrainState, init_state, loss_terms, make_optimizer, make_sampler, process_for,
                                     window_variances)
from pallas_kernels.common import vmapped_axes


# ---------------------------------------------------------------- placement

@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the train state and the batch live: the mesh and the shardings derived from the logical rules."""
  mesh: jax.sharding.Mesh
  state: Any            # a TrainState of NamedShardings
  batch: Any            # NamedSharding of [B, L]
  replicated: Any


def make_placement(config: ExperimentConfig, model: Transformer, optimizer, devices=None) -> Placement:
  """Shards parameters, EMA and optimiser state by the config's logical-axis rules and the batch over
  (data, fsdp); raises if a sharded dimension does not divide over its mesh axes."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.mesh.rules
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, jnp.zeros((1,)))["params"])
  params_sh = sharding.param_shardings(boxed, mesh, rules)
  abstract = jax.eval_shape(lambda: init_state(config, model, optimizer))
  replicated = sharding.replicated(mesh)
  state_sh = TrainState(step=replicated, params=params_sh, ema_params=params_sh, rng=replicated,
                        opt_state=sharding.like_params(abstract.opt_state, abstract.params, params_sh, mesh))
  batch_sh = sharding.batch_sharding(mesh, rules, config.train.batch_size // config.train.grad_accum,
                                     config.data.seq_len)
  return Placement(mesh=mesh, state=state_sh, batch=batch_sh, replicated=replicated)


def global_batch(sharding, local_BxL):
  """This process's rows of a batch (``pipeline.process_rows``), assembled into one global array sharded over
  (data, fsdp): on one process, the whole batch placed on the mesh."""
  local_BxL = np.asarray(local_BxL)
  global_shape = (local_BxL.shape[0] * jax.process_count(),) + local_BxL.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_BxL, global_shape)


def place_batch(placement: Placement, local):
  """This process's rows of a training batch on the mesh: the tokens, or (tokens, segment ids) for packed rows
  (``[B_local, 2, L]`` from the pipeline)."""
  local = np.asarray(local)
  if local.ndim == 3:
    return global_batch(placement.batch, local[:, 0]), global_batch(placement.batch, local[:, 1])
  return global_batch(placement.batch, local)


def _mean_per_token(values_B, x0_BxL, segments_BxL=None):
  """Per real token: every position of a plain window, the non-padding positions of a packed row."""
  if segments_BxL is None:
    return jnp.sum(values_B) / x0_BxL.size
  return jnp.sum(values_B) / jnp.maximum(jnp.sum(segments_BxL > 0), 1)


def replica_axes(mesh, rules, accum: int) -> tuple[str, ...]:
  """The batch axes (of ``activation_batch`` under ``rules``, size > 1 on ``mesh``) whose devices each keep a
  gradient of their own until the step sums them: 'data', whose devices hold whole parameters anyway, and with
  gradient accumulation ('accum' > 1) also 'fsdp'. Then a step gathers each parameter whole once, not once per
  micro-batch, and holds a whole float32 gradient per device until its one reduce-scatter: FSDP keeps parameters and
  optimiser state sharded between steps, not within one. Without accumulation the gathers and reduce-scatters are
  one per step either way, so FSDP's gradients are reduce-scattered as they are made (in ``train.grad_reduce_dtype``:
  ``transformer.weight_gradients_in``), never whole on a device."""
  batch_axes = dict(rules).get("activation_batch") or ()
  batch_axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
  kept = ("data", "fsdp") if accum > 1 else ("data",)
  return tuple(a for a in batch_axes if a in kept and not mesh.empty and mesh.shape[a] > 1)


@dataclasses.dataclass(frozen=True)
class PerReplica:
  """``model`` with parameters given once per replica (leaves ``[R, ...]``, the replicas laid over mesh ``axes``):
  ``apply`` runs replica r's parameters on its own rows, ``[B, ...] -> [R, B / R, ...]``, by a ``vmap`` whose
  replica axis is sharded over ``axes`` (``spmd_axis_name``). Each replica's rows are that device's rows of the
  batch, so the gradient with respect to the ``[R, ...]`` parameters is every device's own partial gradient, summed
  over nobody: the train step keeps it local over the micro-batches and sums it once (``make_train_step``).
  Inside, ``activation_batch`` maps to the batch axes other than ``axes`` (they shard the per-replica rows).
  A loss that takes this for the model sees the same arrays as with the model itself, and draws the same random
  numbers (the draws are outside the network), except dropout: replica r's masks come from the key folded with r.
  The kernels inside (the fused heads, splash, cuDNN and Pallas attention) run per shard of the other batch axes:
  the vmap takes ``axes`` (``common.vmapped_axes``). With ``head_inputs=True`` the model returns ``(h, W)`` as the
  fused head reads them, ``h`` merged back to ``[B, ...]`` and ``W`` per replica, ``[R, D, V]``: the fused
  cross-entropy runs each replica's rows against its own head (``fused_ce``), so ``dW`` too stays per replica."""
  model: Transformer
  replicas: int
  axes: tuple[str, ...]
  inner_rules: tuple

  @property
  def config(self):
    return self.model.config

  def apply(self, variables, *args, rngs=None, **kwargs):
    rows = args[0].shape[0]
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    batched = [isinstance(x, jax.Array) and x.ndim >= 1 and x.shape[0] == rows for x in leaves]
    split = lambda x: x.reshape((self.replicas, rows // self.replicas) + x.shape[1:])

    def one_replica(params, index, *rows_in):
      rows_in = iter(rows_in)
      args_r, kwargs_r = jax.tree_util.tree_unflatten(tree, [next(rows_in) if b else x
                                                             for x, b in zip(leaves, batched)])
      rngs_r = None if rngs is None else {k: jax.random.fold_in(key, index) for k, key in rngs.items()}
      with nn.logical_axis_rules(self.inner_rules), vmapped_axes(self.axes):
        return self.model.apply({"params": params}, *args_r, rngs=rngs_r, **kwargs_r)

    out = jax.vmap(one_replica, spmd_axis_name=self.axes)(
        variables["params"], jnp.arange(self.replicas), *[split(x) for x, b in zip(leaves, batched) if b])
    merge = lambda o: o.reshape((rows,) + o.shape[2:])
    if kwargs.get("head_inputs"):
      h_RxBxLxD, w_RxDxV = out
      return merge(h_RxBxLxD), w_RxDxV
    return jax.tree_util.tree_map(merge, out)


def per_replica(config: ExperimentConfig, model: Transformer, segmented: bool = False) -> PerReplica | None:
  """``model`` as a ``PerReplica`` for the mesh in scope, or None where nothing is gained (no replica axis of size
  > 1) or where it cannot run: cuDNN's attention given a dense mask (``segmented`` rows, or block diffusion's),
  whose batching rule in jax 0.10 cannot take the mask's extra vmapped axis ("cannot reshape ... (R, B/R, 1, L, L)
  into (B, H, L, L)"); such a step reduces its gradients as XLA places them (still in ``train.grad_reduce_dtype``:
  ``transformer.weight_gradients_in``). Every other output head
  (``model.head_kernel()``) and attention (``model.attention_kernel``) applies."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = replica_axes(mesh, config.mesh.rules, config.train.grad_accum)
  dense_mask = segmented or bool(config.process.block_size)
  if not axes or (dense_mask and config.model.attention_kernel == "cudnn"):
    return None
  inner = lambda names: tuple(a for a in (names if isinstance(names, tuple) else (names,)) if a and a not in axes)
  rules = tuple((name, (inner(target) or None) if name == "activation_batch" else target)
                for name, target in config.mesh.rules)
  return PerReplica(model, math.prod(mesh.shape[a] for a in axes), axes, rules)


def make_train_step(config: ExperimentConfig, model, process, optimizer):
  """A pure step ``(state, batch[, window]) -> (state, metrics)``; ``batch`` is the tokens ``[B, L]``, or for
  packed rows the pair (tokens, segment ids); ``window`` (float ``[2]``) is the time window a
  ``process.clip_search`` run trains on. The batch is split into ``grad_accum`` micro-batches whose gradients
  are averaged before one update.

  Micro-batch i is every device's own i-th share of its rows (rows ``i, i + accum, ...`` of the batch), so no
  row moves between devices. Traced under a mesh with replica axes (``per_replica``), each replica's gradient
  stays on its devices over all micro-batches and the replicas' gradients are summed once per step, after the
  loop, in ``train.grad_reduce_dtype`` rather than the model's compute dtype: one all-reduce (a reduce-scatter
  where the parameters are sharded) per step, not one per micro-batch, whichever output head and attention kernels
  the model runs. Elsewhere (FSDP without accumulation) XLA reduces each gradient where the model makes it: the
  model makes its weight gradients in ``train.grad_reduce_dtype`` too (``transformer.weight_gradients_in``)."""
  accum = config.train.grad_accum
  reduce_dtype = jnp.dtype(config.train.grad_reduce_dtype)

  def micro_loss(params, key, x0_BxL, segments_BxL, window, net):
    terms = loss_terms(config, net, process, params, key, x0_BxL, segments_BxL=segments_BxL, window=window)
    return (_mean_per_token(terms["loss"], x0_BxL, segments_BxL),
            _mean_per_token(terms["nelbo"], x0_BxL, segments_BxL))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch, window=None):
    with weight_gradients_in(reduce_dtype):  # where XLA reduces a gradient as it is made, it is in reduce_dtype
      return _step(state, batch, window)

  def _step(state: TrainState, batch, window=None):
    rng, step_rng = jax.random.split(state.rng)
    batch_BxL, segments_BxL = batch if isinstance(batch, tuple) else (batch, None)
    net = per_replica(config, model, segments_BxL is not None)
    if net is None:
      params, total = state.params, lambda g: g
    else:  # every replica's own copy, so each one's gradient is its own (see PerReplica)
      whole = jax.sharding.PartitionSpec(net.axes)  # a replica's copy lies whole on its devices
      params = jax.tree_util.tree_map(
          lambda p: jax.lax.with_sharding_constraint(jnp.broadcast_to(p, (net.replicas,) + p.shape), whole),
          state.params)
      total = lambda g_R: jnp.sum(g_R.astype(reduce_dtype), axis=0).astype(g_R.dtype)
    # [B, ...] -> [accum, B / accum, ...] with micro-batch i = rows i, i + accum, ...: each device's i-th share.
    micro = lambda a: None if a is None else jnp.swapaxes(a.reshape((-1, accum) + a.shape[1:]), 0, 1)

    def accumulate(carry, inputs):
      key, x0, segments = inputs
      (loss, nelbo), grads = grad_fn(params, key, x0, segments, window, net or model)
      total_grads, total_loss, total_nelbo = carry
      return (jax.tree_util.tree_map(jnp.add, total_grads, grads), total_loss + loss, total_nelbo + nelbo), None

    keys = jax.random.split(step_rng, accum)
    if accum == 1:  # no accumulator buffers: they cost a full pass over the parameters
      (loss, nelbo), grads = grad_fn(params, keys[0], batch_BxL, segments_BxL, window, net or model)
      grads = jax.tree_util.tree_map(total, grads)
    else:
      zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
      (grads, loss, nelbo), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0),
                                             (keys, micro(batch_BxL), micro(segments_BxL)))
      grads = jax.tree_util.tree_map(lambda g: total(g) / accum, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = config.train.ema_decay
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    grad_norm = optax.tree_utils.tree_norm(grads)
    # A non-finite loss or gradient (the norm is non-finite iff some entry is) skips the update: parameters,
    # optimiser moments and EMA stay as they were (an elementwise select XLA fuses into the update itself).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss / accum, "bits_per_token": nelbo / accum / math.log(2.0), "grad_norm": grad_norm,
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params),
                         rng=rng), metrics

  return step


def make_eval_step(config, model, process):
  def eval_step(params, key, x0_BxL, weights_BxL, segments_BxL=None):
    return loss_terms(config, model, process, params, key, x0_BxL, evaluate=True, weights_BxL=weights_BxL,
                      segments_BxL=segments_BxL)["nelbo"]
  return eval_step


def compile_steps(config: ExperimentConfig, model, process, optimizer, placement: Placement):
  """The jitted train step ``(state, batch) -> (state, metrics)`` (``(state, batch, window)`` for a
  ``process.clip_search`` run; state donated, laid out by ``placement``) and
  eval step ``(params, key, x0, weights) -> nats_B``; both trace under the mesh rules, and return replicated
  metrics, so every process can read them."""
  mesh, rules = placement.mesh, config.mesh.rules
  inputs = (placement.state, placement.batch) + ((placement.replicated,) if config.process.clip_search else ())
  train_step = jax.jit(under_mesh_rules(make_train_step(config, model, process, optimizer), mesh, rules),
                       donate_argnums=(0,), in_shardings=inputs, out_shardings=(placement.state, placement.replicated))
  eval_step = jax.jit(under_mesh_rules(make_eval_step(config, model, process), mesh, rules),
                      in_shardings=(placement.state.params, placement.replicated, placement.batch, placement.batch,
                                    placement.batch),
                      out_shardings=placement.replicated)
  return train_step, eval_step


def evaluate(config, eval_step, params, data: pipeline.Data, key, placement: Placement) -> dict:
  """Validation NELBO in bits per token over ``eval_batches`` batches of fixed windows spread evenly over the
  validation split, accumulated in float64 on the host; padded positions count neither nats nor tokens. Every
  process holds the validation windows and supplies its rows of each batch."""
  acc = losses.LikelihoodAccumulator()
  batch = config.train.batch_size
  available = data.val_windows.shape[0]
  if available < batch:
    raise ValueError(f"the validation split has {available} windows, fewer than train.batch_size={batch}")
  num = min(config.train.eval_batches * batch, available // batch * batch)
  chosen = pipeline.spread_rows(available, num)
  mine = pipeline.process_rows(batch)
  for i, start in enumerate(range(0, num, batch)):
    rows = chosen[start:start + batch]
    x0 = global_batch(placement.batch, data.val_windows[rows][mine])
    weights = data.val_weights[rows]
    segments = None if data.val_segments is None else global_batch(placement.batch, data.val_segments[rows][mine])
    nats_B = eval_step(params, np.asarray(jax.random.fold_in(key, i)), x0,
                       global_batch(placement.batch, weights[mine]), segments)
    faults.hit("eval_batch", i, jax.process_index())
    acc.add(np.asarray(nats_B), weights.sum(axis=1))
  return acc.result()


def compile_window_search(config: ExperimentConfig, model, process, placement: Placement):
  """The jitted ``(params, key, x0, segments) -> variances`` of ``state.window_variances`` (a
  ``process.clip_search`` run), under the mesh rules, with replicated output."""
  search = lambda params, key, x0, segments: window_variances(config, model, process, params, key, x0, segments)
  return jax.jit(under_mesh_rules(search, placement.mesh, config.mesh.rules),
                 in_shardings=(placement.state.params, placement.replicated, placement.batch, placement.batch),
                 out_shardings=placement.replicated)


def search_clip_window(config, search_step, params, data: pipeline.Data, key, placement: Placement):
  """BD3-LM's data-driven clipped schedule: the window of ``losses.CLIP_WINDOWS`` whose per-block loss estimate
  varies least on the first validation batch (``evaluate``'s first rows), and every window's variance."""
  batch = config.train.batch_size
  rows = pipeline.spread_rows(data.val_windows.shape[0], min(config.train.eval_batches * batch,
                                                              data.val_windows.shape[0] // batch * batch))[:batch]
  mine = pipeline.process_rows(batch)
  x0 = global_batch(placement.batch, data.val_windows[rows][mine])
  segments = None if data.val_segments is None else global_batch(placement.batch, data.val_segments[rows][mine])
  variances = np.asarray(jax.device_get(search_step(params, np.asarray(key), x0, segments)))
  return losses.search_window(variances), variances


# ---------------------------------------------------------------- the loop

class NonFiniteTraining(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class SkipCounter:
  """Counts the steps whose update was skipped (non-finite loss or gradients), logging each, and stops the run
  after ``limit`` in a row, before the next checkpoint: the parameters never took a non-finite update, so the
  checkpoints on disk stay good."""

  def __init__(self, limit: int, total: int = 0):
    self.limit, self.total, self.run, self.last = limit, total, 0, -1

  def record(self, step: int, metrics: dict, writer) -> None:
    """Counts ``step`` (whose ``metrics`` are the train step's, on the device) once, however often it is
    recorded."""
    if step <= self.last:
      return
    self.last = step
    if not float(jax.device_get(metrics["skipped"])):
      self.run = 0
      return
    self.total += 1
    self.run += 1
    writer.log(f"step {step}: non-finite loss or gradients; update skipped ({self.run} in a row, {self.total} in "
               f"all)")
    if self.run >= self.limit:
      raise NonFiniteTraining(
          f"{self.run} consecutive steps (up to step {step}) had a non-finite loss or gradients "
          f"(train.max_consecutive_skips={self.limit}); no update was applied, and the latest checkpoint holds the "
          f"last good parameters. Lower train.learning_rate, keep train.grad_clip > 0 or check the data, then run "
          f"the same command to resume")

def build_experiment(raw_config, workdir: str | None):
  """``(config, data)`` from a config file's ConfigDict: every key is validated before any loading, then the
  data is loaded and the model's vocabulary taken from its tokenizer."""
  preliminary = from_config(raw_config, vocab_size=2)
  data = pipeline.build_data(preliminary.data, preliminary.train.batch_size, preliminary.train.seed, workdir)
  return from_config(raw_config, vocab_size=pipeline.vocab_size_of(data, preliminary.data)), data


def train_and_evaluate(config: ExperimentConfig, workdir: str, data: pipeline.Data | None = None,
                       stop_after: int | None = None, quiet: bool = False) -> dict:
  """Trains to ``config.train.steps`` (or stops early after ``stop_after`` steps, for tests of resumption),
  resuming from ``workdir``'s latest checkpoint. Returns the final metrics and the state under 'state'."""
  os.makedirs(workdir, exist_ok=True)
  tcfg = config.train
  data = data or pipeline.build_data(config.data, tcfg.batch_size, tcfg.seed, workdir)
  model = Transformer(config.model)
  process = process_for(config, workdir)
  optimizer = make_optimizer(tcfg)
  writer = metrics_lib.MetricsWriter(workdir, tcfg.steps, quiet)
  fingerprint = checkpoints.fingerprint(config)
  manager = checkpoints.checkpoint_manager(workdir, tcfg)

  placement = make_placement(config, model, optimizer)
  state = jax.jit(lambda: init_state(config, model, optimizer), out_shardings=placement.state)()
  next_batch = 0
  seconds_before = 0.0  # wall time of the earlier sessions of this run, carried in its checkpoints
  skipped_before = 0
  checkpoints.discard_incomplete(workdir, writer.log)
  restored = checkpoints.restore_checkpoint(manager, state, fingerprint, writer.log)
  if restored is not None:
    state, data_state = restored
    next_batch = int(data_state["next_batch"])
    seconds_before = float(data_state.get("train_seconds", 0.0))
    skipped_before = int(data_state.get("skipped_steps", 0))
    writer.log(f"resumed from step {int(state.step)} in {workdir}")
  # Written once the workdir's checkpoint (if any) is known to belong to this experiment: a refused run must not
  # overwrite the config its checkpoints are read with.
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "corpus.json"), data.info)
    # What d3pm-sample and d3pm-eval rebuild the model from.
    files.write_json(os.path.join(workdir, "experiment.json"), dataclasses.asdict(config))
  if jax.process_count() > 1:  # every process says which rows it feeds: the first thing to check on a new cluster
    rows = pipeline.process_rows(tcfg.batch_size)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
          f"rows {rows.start}:{rows.stop} of each global batch of {tcfg.batch_size}", flush=True)
  writer.log(f"model: {count_params(state.params):,} parameters; process: {config.process.name} "
             f"({config.process.loss}); data: {data.info.get('train_windows')} training windows of "
             f"{config.data.seq_len} tokens")

  train_step, eval_step = compile_steps(config, model, process, optimizer, placement)
  searching = config.process.clip_search
  # The time window training draws t on: the config's, or the last one a process.clip_search run chose.
  window = tuple(restored[1].get("clip_window", config.process.window) if restored else config.process.window)
  search_step = compile_window_search(config, model, process, placement) if searching else None
  eval_key = jax.random.PRNGKey(tcfg.seed + 1)
  step = int(state.step)  # counted on the host from here: reading state.step would wait for the device
  last_step = tcfg.steps if stop_after is None else min(tcfg.steps, step + stop_after)
  agree = preemption.make_agreement(placement.mesh, placement.batch.spec[0], tcfg.batch_size)
  pending = None
  results = {}
  preempted = None
  started = time.time()
  me = jax.process_index()

  def save(at_step):
    progress = {"next_batch": next_batch, "train_seconds": seconds_before + time.time() - started,
                "skipped_steps": skips.total}
    if searching:  # a resumed run trains on the window the last search chose
      progress["clip_window"] = list(window)
    checkpoints.save_checkpoint(manager, state, at_step, progress, fingerprint)
    faults.hit("save_started", at_step, me)

  guard = preemption.Preemption(tcfg.preemption_grace_s,
                                lambda: f"The newest complete checkpoint in {checkpoints.checkpoint_dir(workdir)} "
                                        f"is the resume point.")
  guard.__enter__()
  try:
    skips = SkipCounter(tcfg.max_consecutive_skips, skipped_before)
    while step < last_step:
      batch = place_batch(placement, data.train_batches[next_batch])
      next_batch += 1
      state, metrics = train_step(state, batch, *((np.asarray(window, np.float32),) if searching else ()))
      step += 1
      faults.hit("step_dispatched", step, me)
      stop = agree(guard.requested)
      # Metrics (and the stop decision) are fetched one step late, so the host never waits on the step it just
      # dispatched.
      if pending is not None:
        skips.record(pending[0], pending[1], writer)
        if pending[0] % tcfg.log_every == 0 or pending[0] == 1:
          host = {**jax.device_get(pending[1]), "skipped_total": skips.total}
          writer.write(pending[0], host)
          writer.progress(pending[0], host)
      if bool(jax.device_get(pending[2] if pending is not None and jax.process_count() > 1 else stop)):
        # Every process reads the same agreed flag for the same step, so all of them save this one.
        skips.record(step, metrics, writer)
        save(step)
        preempted = step
        cause = guard.signal_name or "another process's signal"
        writer.log(f"step {step}: stopping on {cause}; saved a checkpoint (run the same command to resume)")
        break
      pending = (step, metrics, stop)
      if step % tcfg.eval_every == 0 or step == tcfg.steps:
        results = evaluate(config, eval_step, state.params, data, eval_key, placement)
        writer.write(step, {**{f"val_{k}": v for k, v in results.items()},
                            "train_seconds": seconds_before + time.time() - started})
        writer.log(f"step {step}: validation {results['bits_per_token']:.4f} bits per token")
        if searching:
          chosen, variances = search_clip_window(config, search_step, state.params, data,
                                                 jax.random.fold_in(eval_key, step), placement)
          window = chosen
          writer.write(step, {"clip_low": chosen[0], "clip_high": chosen[1]})
          writer.log(f"step {step}: training on t in [{chosen[0]}, {chosen[1]}], the window of least per-block loss "
                     f"variance ({variances.min():.4g}; the whole [0, 1]: {variances[0]:.4g})")
      if step % tcfg.checkpoint_every == 0 or step == last_step:
        skips.record(step, metrics, writer)  # the saved count includes this step
        save(step)
    if pending is not None and preempted is None:
      skips.record(pending[0], pending[1], writer)
      writer.write(pending[0], {**jax.device_get(pending[1]), "skipped_total": skips.total})
  finally:  # a stop (preemption, non-finite steps, an error) still lets the checkpoints in flight finish whole
    writer.close()
    manager.wait_until_finished()
    manager.close()
    guard.__exit__(None, None, None)
  return {"state": state, "validation": results, "data": data, "model": model, "process": process,
          "placement": placement, "preempted": preempted}


def print_samples(config: ExperimentConfig, result: dict, writer_out=sys.stdout) -> list:
  """Draws ``num_samples`` sequences with the trained parameters and prints them decoded. Every process draws
  them (one SPMD program); process 0 prints them and returns the texts, the others return []."""
  tcfg = config.train
  sampler = make_sampler(config, result["model"], result["process"], tcfg.sample_steps, tcfg.num_samples,
                         out_sharding=result["placement"].replicated, mesh=result["placement"].mesh)
  tokens = np.asarray(sampler(result["state"].params, np.asarray(jax.random.PRNGKey(tcfg.seed + 2))))
  if not multihost.is_leader():
    return []
  texts = []
  print(f"unigram entropy of the samples: {sampling.unigram_entropy(tokens, config.model.vocab_size):.3f} bits",
        file=writer_out)
  tok = result["data"].tokenizer
  for row in tokens:
    text = tok.decode(row).decode("utf-8", errors="replace") if tok is not None else " ".join(map(str, row))
    texts.append(text)
    print("-" * 40 + "\n" + text, file=writer_out)
  return texts
