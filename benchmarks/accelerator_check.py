"""One-shot check of the kernels on a GPU or TPU: compile, correctness, speed, memory and MFU, printed as one table.

    python benchmarks/accelerator_check.py               # on the accelerator, at most ~8 minutes
    python benchmarks/accelerator_check.py --rehearse    # anywhere: every row at tiny shapes, kernels interpreted

Sections (``--only compile,correct,speed,mfu`` runs some):
  compile  every kernel compiled by XLA at the shipped shapes: the fused head (loss and gradients) and the fused
           sampler at D in {256, 768, 1024, 2048}, V = 50,257 (and 131,072), attention at head widths 64 and 128,
           bidirectional and causal.
  correct  loss, dh and dW of each fused head against the reference at 'highest' precision from the same bfloat16
           inputs; the sampler's ids against the reference's for the same seed (>= 99.5% equal, every mismatch a
           near-tie); attention values and gradients against the reference and against cuDNN (GPU) or splash (TPU).
  speed    median of 20 runs of the head's loss + gradients (xla, tiled, pallas) at 8 x 1024 tokens, D = 768,
           V = 50,257, and of attention forward + backward (xla, pallas, cudnn or splash) at (8, 1024, 12, 64),
           bfloat16; XLA's temporary bytes (``memory_analysis``) of each head.
  mfu      an MD4-S-shaped train step (12 x 768, 12 heads, GLU 2048, adaLN, L = 1024, batch 8, V = 50,257,
           bfloat16) with each head and attention choice: MFU against the bfloat16 matmul peak measured in this
           process.

Every row runs in its own try/except, so one failure never hides the rest; each is printed as it finishes (a run
cut short still shows what it reached) and the table is printed again at the end. Exit status 1 when a row fails.

It imports only ``pallas_kernels`` and ``d3pm_jax.models.transformer`` (jax, flax, optax, numpy, scipy), so it runs
on an accelerator image without grain, ml_collections or tensorboardX. Should an image lack a pure-Python package
it needs, build the wheel on a machine with the registry (``pip wheel --no-deps NAME -w wheels/``), carry
``wheels/`` with the tree, and run ``pip install --no-index wheels/*.whl`` before the script.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from d3pm_jax.models.transformer import (ModelConfig, Transformer, attention, forward_flops_per_token,  # noqa: E402
                                         segment_mask)
from d3pm_jax.runtime import flops as flops_lib, targets  # noqa: E402
from d3pm_jax.training.metrics import median_seconds  # noqa: E402
from pallas_kernels import attention as attention_kernels, fused_ce, fused_sample  # noqa: E402
import harness  # noqa: E402  (this directory: the module is also loaded by path, in tests)

BF16 = jnp.bfloat16
SECTIONS = ("compile", "correct", "speed", "mfu")


class Table:
  """Rows of (section, name, status, detail, seconds); ``run`` catches everything a row raises."""

  def __init__(self):
    self.rows = []

  def run(self, section: str, name: str, fn):
    start = time.perf_counter()
    try:
      status, detail = fn()
    except Exception as e:  # noqa: BLE001 - a row's failure is reported, never raised
      message = str(e).strip().splitlines()
      status, detail = "ERROR", f"{type(e).__name__}: {message[0][:300] if message else ''}"
    self.rows.append((section, name, status, detail, time.perf_counter() - start))
    print(self.format(self.rows[-1]), flush=True)

  @staticmethod
  def format(row) -> str:
    section, name, status, detail, seconds = row
    return f"{section:8s} {name:52s} {status:5s} {seconds:6.1f}s  {detail}"


@functools.lru_cache(None)
def platform() -> str:
  return jax.default_backend()


def measured(check: bool, detail: str):
  return ("ok" if check else "FAIL"), detail


def bf16_peak(n: int, reps: int = 10) -> float:
  """Best bfloat16 FLOP/s of an n x n matmul chain with float32 accumulation, in this process."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), BF16)
  f = jax.jit(lambda x: (x @ a).astype(BF16) * 0.03)
  x = jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    x = jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


# ---------------------------------------------------------------- the implementations under test

def xla_head(h_NxD, w_DxV, targets_N, weights_N, *, num_classes, exclude=None):
  """The unfused head as XLA computes it in a bfloat16 model: bfloat16 products, float32 logits and loss."""
  logits = jnp.dot(h_NxD.astype(BF16), w_DxV.astype(BF16), preferred_element_type=jnp.float32)
  cols = jnp.arange(w_DxV.shape[1])
  valid = (cols < num_classes) & (cols != (-1 if exclude is None else exclude))
  logits = jnp.where(valid, logits, -1e30)
  target = jnp.take_along_axis(logits, targets_N[:, None], axis=1)[:, 0]
  return weights_N * (jax.nn.logsumexp(logits, axis=1) - target)


class Kernels:
  """The implementations this platform runs (rehearsal: the GPU's, interpreted, with small blocks)."""

  def __init__(self, rehearse: bool):
    self.rehearse = rehearse
    gpu = platform() == "gpu" or rehearse
    blocks = dict(block_n=16, tile_v=64, chunk_d=16) if rehearse else {}
    self.heads = {"xla": xla_head,
                  "tiled": functools.partial(fused_ce.weighted_ce_tiled, tile_v=64 if rehearse else 2048,
                                             dot_dtype=BF16)}
    self.samplers = {"tiled": functools.partial(fused_sample.sample_tiled, tile_v=64 if rehearse else 2048,
                                                dot_dtype=BF16)}
    self.attention = {"xla": lambda q, k, v, s, c: attention(q, k, v, c, segment_mask(s))}
    if gpu:
      self.heads["pallas"] = functools.partial(fused_ce.weighted_ce_pallas, dot_dtype=BF16, interpret=rehearse,
                                               **blocks)
      self.samplers["pallas"] = functools.partial(fused_sample.sample_pallas, dot_dtype=BF16, interpret=rehearse,
                                                  **blocks)
      self.attention["pallas"] = functools.partial(attention_kernels.flash_attention, interpret=rehearse,
                                                   **(dict(block_q=16, block_k=16) if rehearse else {}))
      if not rehearse:
        self.attention["cudnn"] = attention_kernels.cudnn_attention
    if platform() == "tpu":
      self.heads["pallas"] = functools.partial(fused_ce.weighted_ce_pallas_tpu, dot_dtype=BF16)
      self.samplers["pallas"] = functools.partial(fused_sample.sample_pallas_tpu, dot_dtype=BF16)
      self.attention["splash"] = attention_kernels.splash_attention
    self.head_impls = [name for name in ("xla", "tiled", "pallas") if name in self.heads]
    self.attention_impls = [name for name in ("xla", "pallas", "cudnn", "splash") if name in self.attention]


# ---------------------------------------------------------------- inputs

def head_inputs(n, d, v, seed=0):
  """bfloat16-representable h and W (float32 arrays), targets avoiding the mask class v - 1, weights with about
  half the rows 0 (the masked ELBO's unmasked positions)."""
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(n, d)), BF16).astype(jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 3 / math.sqrt(d), BF16).astype(jnp.float32)
  targets = jnp.asarray(rng.integers(0, v - 1, n), jnp.int32)
  weights = jnp.asarray((rng.random(n) + 0.5) * (rng.random(n) < 0.5), jnp.float32)
  return h, w, targets, weights


def attention_inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), BF16) for _ in range(3))
  batch, length = shape[:2]
  segments = jnp.asarray(np.repeat((np.arange(length) < length - length // 8)[None], batch, 0), jnp.int32)
  return q, k, v, segments


def structs(*shapes_dtypes):
  return [jax.ShapeDtypeStruct(s, t) for s, t in shapes_dtypes]


# ---------------------------------------------------------------- sections

def compile_rows(table: Table, kernels: Kernels, sizes):
  n = sizes["tokens"]
  for d, v in sizes["head_shapes"]:
    for name in ("pallas",):
      if name not in kernels.heads:
        continue
      head = kernels.heads[name]

      def loss(h, w, t, wt, head=head, v=v):
        return head(h, w, t, wt, num_classes=v, exclude=v - 1).sum()

      def compile_head(d=d, v=v, loss=loss):
        args = structs(((n, d), jnp.float32), ((d, v), jnp.float32), ((n,), jnp.int32), ((n,), jnp.float32))
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        return "ok", f"compiled; temporaries {temp / 2**20:.1f} MiB"

      table.run("compile", f"{name} head loss+grad D={d} V={v}", compile_head)
      if name in kernels.samplers:
        draw = kernels.samplers[name]

        def compile_sampler(d=d, v=v, draw=draw):
          args = structs(((n, d), jnp.float32), ((d, v), jnp.float32))
          jax.jit(lambda h, w: draw(h, w, 7, num_classes=v, exclude=v - 1)).lower(*args).compile()
          return "ok", "compiled"

        table.run("compile", f"{name} sampler D={d} V={v}", compile_sampler)
  for shape in sizes["attention_shapes"]:
    for causal in (False, True):
      for name in kernels.attention_impls[1:]:
        attend = kernels.attention[name]

        def compile_attention(shape=shape, causal=causal, attend=attend):
          def loss(q, k, v, s):
            return attend(q, k, v, s, causal).astype(jnp.float32).sum()
          args = structs((shape, BF16), (shape, BF16), (shape, BF16), (shape[:2], jnp.int32))
          jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
          return "ok", "compiled"

        table.run("compile", f"{name} attention {shape} causal={causal}", compile_attention)


def correct_rows(table: Table, kernels: Kernels, sizes):
  n, d, v = sizes["correct_head"]
  h, w, targets, weights = head_inputs(n, d, v, seed=1)
  kwargs = dict(num_classes=v, exclude=v - 1)
  with jax.default_matmul_precision("highest"):
    want, want_vjp = jax.vjp(lambda h, w: fused_ce.weighted_ce_reference(h, w, targets, weights, **kwargs), h, w)
    want_dh, want_dw = want_vjp(jnp.ones_like(want))
  # Products of bfloat16 inputs are exact in float32: the loss differs by accumulation order only (1e-4 of the
  # largest); the gradients also by the rounding of dlogits to bfloat16 before their products (2^-7 of the
  # largest).
  tolerances = {"loss": 1e-4, "dh": 2.0 ** -7, "dW": 2.0 ** -7}
  for name in kernels.head_impls[1:]:
    head = kernels.heads[name]

    def check_head(head=head):
      got, vjp = jax.jit(lambda h, w: jax.vjp(lambda h, w: head(h, w, targets, weights, **kwargs), h, w))(h, w)
      dh, dw = vjp(jnp.ones_like(got))
      errors = {key: float(jnp.abs(a - b).max() / jnp.abs(b).max())
                for key, a, b in (("loss", got, want), ("dh", dh, want_dh), ("dW", dw, want_dw))}
      ok = all(errors[key] <= tolerances[key] for key in errors)
      return measured(ok, ", ".join(f"{key} {errors[key]:.1e} (<= {tolerances[key]:.0e})" for key in errors))

    table.run("correct", f"{name} head vs reference (highest)", check_head)

  seed = 12345
  with jax.default_matmul_precision("highest"):
    want_ids, _ = fused_sample.sample_reference(h, w, seed, **kwargs)
    logits = jnp.dot(h, w, precision=jax.lax.Precision.HIGHEST)
    cols = jnp.arange(v)[None]
    noisy = jnp.where(cols < v - 1, logits, -1e30) + fused_sample.gumbel(seed, jnp.arange(n)[:, None], cols)
  for name, draw in kernels.samplers.items():

    def check_sampler(draw=draw):
      ids, _ = jax.jit(lambda h, w: draw(h, w, seed, **kwargs))(h, w)
      same = float((ids == want_ids).mean())
      rows = np.flatnonzero(np.asarray(ids != want_ids))
      gaps = np.abs(np.asarray(noisy)[rows, np.asarray(want_ids)[rows]] - np.asarray(noisy)[rows, np.asarray(ids)[rows]])
      near_ties = bool((gaps <= 1e-3).all())
      worst = f", largest gap {gaps.max():.1e}" if rows.size else ""
      return measured(same >= 0.995 and near_ties, f"{same:.2%} of ids equal (>= 99.5%), {rows.size} mismatches all "
                                                   f"near-ties (<= 1e-3): {near_ties}{worst}")

    table.run("correct", f"{name} sampler ids vs reference", check_sampler)

  q, k, vv, segments = attention_inputs(sizes["correct_attention"], seed=2)
  for causal in (False, True):
    with jax.default_matmul_precision("highest"):
      want, want_vjp = jax.vjp(lambda q, k, v: attention_kernels.attention_reference(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), segments, causal), q, k, vv)
      want_grads = want_vjp(jnp.cos(want))
    for name in kernels.attention_impls[1:]:
      attend = kernels.attention[name]

      def check_attention(attend=attend, causal=causal, want=want, want_grads=want_grads):
        got, vjp = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: attend(q, k, v, segments, causal), q, k, v))(
            q, k, vv)
        grads = vjp(jnp.cos(got.astype(jnp.float32)).astype(got.dtype))
        errors = [float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max())
                  for a, b in zip((got,) + tuple(grads), (want,) + tuple(want_grads))]
        # bfloat16 inputs and outputs, probabilities rounded to bfloat16 before their products: 2^-5 of the largest.
        return measured(max(errors) <= 2.0 ** -5, "out, dq, dk, dv: " + ", ".join(f"{e:.1e}" for e in errors)
                        + " (<= 3.1e-02)")

      table.run("correct", f"{name} attention vs reference causal={causal}", check_attention)
    if "pallas" in kernels.attention and len(kernels.attention_impls) > 2:
      other = kernels.attention_impls[2]

      def check_pair(causal=causal, other=other):
        a = jax.jit(lambda q, k, v: kernels.attention["pallas"](q, k, v, segments, causal))(q, k, vv)
        b = jax.jit(lambda q, k, v: kernels.attention[other](q, k, v, segments, causal))(q, k, vv)
        error = float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max())
        return measured(error <= 2.0 ** -5, f"max difference {error:.1e} of the largest (<= 3.1e-02)")

      table.run("correct", f"pallas attention vs {other} causal={causal}", check_pair)


def speed_rows(table: Table, kernels: Kernels, sizes, reps: int):
  n, d, v = sizes["speed_head"]
  h, w, targets, weights = head_inputs(n, d, v, seed=3)
  h, w = h.astype(BF16), w.astype(BF16)
  times, temps = {}, {}
  for name in kernels.head_impls:
    head = kernels.heads[name]

    def run_head(name=name, head=head):
      step = jax.jit(jax.value_and_grad(lambda h, w: head(h, w, targets, weights, num_classes=v,
                                                         exclude=v - 1).sum(), argnums=(0, 1)))
      temps[name] = step.lower(h, w).compile().memory_analysis().temp_size_in_bytes
      times[name] = median_seconds(step, (h, w), reps)
      ratio = "" if name == "xla" or "xla" not in times else (
          f"; {times[name] / times['xla']:.2f}x xla's time (target <= 1.0), "
          f"{temps[name] / temps['xla']:.1%} of its memory (target <= 25%)")
      return "ok", f"{1e3 * times[name]:.2f} ms median of {reps}, temporaries {temps[name] / 2**20:.0f} MiB{ratio}"

    table.run("speed", f"{name} head loss+grad N={n} D={d} V={v}", run_head)
  q, k, vv, segments = attention_inputs(sizes["speed_attention"], seed=4)
  attention_times = {}
  for name in kernels.attention_impls:
    attend = kernels.attention[name]

    def run_attention(name=name, attend=attend):
      step = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, segments, False).astype(jnp.float32).sum(),
                              argnums=(0, 1, 2)))
      attention_times[name] = median_seconds(step, (q, k, vv), reps)
      baseline = "cudnn" if "cudnn" in attention_times else "splash" if "splash" in attention_times else None
      ratio = ""
      if name == "pallas" and baseline:
        ratio = f"; {attention_times['pallas'] / attention_times[baseline]:.2f}x {baseline}'s (target <= 1.3)"
      if name in ("cudnn", "splash") and "pallas" in attention_times:
        ratio = f"; pallas takes {attention_times['pallas'] / attention_times[name]:.2f}x this (target <= 1.3)"
      return "ok", f"{1e3 * attention_times[name]:.2f} ms median of {reps}{ratio}"

    table.run("speed", f"{name} attention fwd+bwd {sizes['speed_attention']}", run_attention)


def roofline_bound(compiled, step_flops: float):
  """``(measured seconds) -> text``: the step's roofline bound on this chip (d3pm-compile's: the traced program's
  FLOPs, at least its inputs and outputs in HBM bytes, the chip's published peaks) beside the measured time."""
  chip = targets.chip_of(jax.devices()[0].device_kind)
  if chip is None:
    return lambda seconds: f"no published peaks for {jax.devices()[0].device_kind!r}"
  least, kind = targets.roofline_seconds(step_flops, targets.hbm_bytes_at_least(compiled), chip)
  return lambda seconds: (f"roofline >= {1e3 * least:.1f} ms ({kind}-bound at {chip.name}'s published peaks; "
                          f"measured {seconds / least:.2f}x it)")


def mfu_rows(table: Table, kernels: Kernels, sizes, steps: int, peak_n: int):
  import optax

  peak = {}
  table.run("mfu", "bfloat16 matmul peak (this process)",
            lambda: ("ok", f"{peak.setdefault('flops', bf16_peak(peak_n)) / 1e12:.1f} TFLOP/s"))
  model_sizes, batch, length = sizes["mfu_model"], sizes["mfu_batch"], sizes["mfu_length"]
  combos = [(head, "xla") for head in kernels.head_impls]
  combos += [(head, attn) for attn in kernels.attention_impls[1:] for head in ("xla", kernels.head_impls[-1])]
  for head_impl, attention_impl in dict.fromkeys(combos):

    def run_step(head_impl=head_impl, attention_impl=attention_impl):
      cfg = ModelConfig(max_len=length, time_conditioning=True, dtype="bfloat16", scan_layers=True,
                        vocab_pad_multiple=128, attention_impl=attention_impl,
                        kernel_interpret=kernels.rehearse, **model_sizes)
      model = Transformer(cfg)
      v, mask = cfg.vocab_size, cfg.vocab_size - 1
      head = kernels.heads[head_impl]
      optimizer = optax.adamw(1e-4)
      x0 = jnp.asarray(np.random.default_rng(5).integers(0, mask, (batch, length)), jnp.int32)
      params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x0, jnp.zeros((batch,)))["params"]))()
      opt_state = optimizer.init(params)

      def loss_fn(params, key):
        """The masked ELBO of the absorbing process with the linear schedule: weight 1/t on masked positions."""
        t_key, m_key = jax.random.split(key)
        t = jax.random.uniform(t_key, (batch,), minval=1e-3, maxval=1.0)
        masked = jax.random.uniform(m_key, (batch, length)) < t[:, None]
        x_t = jnp.where(masked, mask, x0)
        weights = (masked / t[:, None]).astype(jnp.float32).reshape(-1)
        h, w = model.apply({"params": params}, x_t, t, head_inputs=True)
        return head(h.reshape(batch * length, -1), w, x0.reshape(-1), weights, num_classes=v, exclude=mask).sum()

      @functools.partial(jax.jit, donate_argnums=(0, 1))
      def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      start = time.perf_counter()
      key = jax.random.PRNGKey(1)
      compiled = step.lower(params, opt_state, key).compile()
      bound = roofline_bound(compiled, flops_lib.count(step, params, opt_state, key).flops)
      params, opt_state, loss = compiled(params, opt_state, key)
      jax.block_until_ready(loss)
      compile_s = time.perf_counter() - start
      times = []
      for i in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, jax.random.PRNGKey(2 + i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
      median = float(np.median(times))
      flops = 3 * forward_flops_per_token(cfg, length) * batch * length
      mfu = flops / median / peak["flops"] if "flops" in peak else float("nan")
      return measured(bool(np.isfinite(float(loss))),
                      f"{1e3 * median:.1f} ms/step, MFU {mfu:.1%} (target >= 40% with the best choices), "
                      f"{bound(median)}, compile {compile_s:.0f} s, loss {float(loss):.3g}")

    table.run("mfu", f"MD4-S step head={head_impl} attention={attention_impl}", run_step)


FULL = dict(tokens=8192, head_shapes=[(256, 50257), (768, 50257), (1024, 50257), (2048, 50257), (768, 131072)],
            attention_shapes=[(8, 1024, 12, 64), (4, 1024, 16, 128)], correct_head=(2048, 768, 50257),
            correct_attention=(4, 1024, 12, 64), speed_head=(8192, 768, 50257), speed_attention=(8, 1024, 12, 64),
            mfu_model=dict(vocab_size=50257, num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, cond_dim=128),
            mfu_batch=8, mfu_length=1024)
TINY = dict(tokens=64, head_shapes=[(48, 300)], attention_shapes=[(1, 64, 2, 32)], correct_head=(64, 48, 300),
            correct_attention=(1, 64, 2, 32), speed_head=(64, 48, 300), speed_attention=(1, 64, 2, 32),
            mfu_model=dict(vocab_size=300, num_layers=2, d_model=64, num_heads=2, mlp_dim=128, cond_dim=32),
            mfu_batch=2, mfu_length=64)


def main(argv=None) -> int:
  parser = harness.parser(__doc__)
  parser.add_argument("--rehearse", action="store_true", help="every row at tiny shapes, kernels interpreted")
  parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
  parser.add_argument("--reps", type=int, default=20, help="timed runs per speed row (the median is printed)")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps per MFU row")
  args = parser.parse_args(argv)
  sections = args.only.split(",")
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    parser.error(f"unknown sections {unknown}; valid: {list(SECTIONS)}")
  if platform() == "cpu" and not args.rehearse:
    parser.error("no GPU or TPU here: run with --rehearse (tiny shapes, interpreted kernels)")
  sizes = TINY if args.rehearse else FULL
  reps, steps = (2, 2) if args.rehearse else (args.reps, args.steps)
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {platform()} ({getattr(device, 'device_kind', device)})"
        + (": rehearsal, tiny shapes, kernels interpreted" if args.rehearse else ""), flush=True)
  kernels = Kernels(args.rehearse)
  table = Table()
  if "compile" in sections:
    compile_rows(table, kernels, sizes)
  if "correct" in sections:
    correct_rows(table, kernels, sizes)
  if "speed" in sections:
    speed_rows(table, kernels, sizes, reps)
  if "mfu" in sections:
    mfu_rows(table, kernels, sizes, steps, 256 if args.rehearse else 8192)
  print("\n" + "\n".join(Table.format(row) for row in table.rows))
  failed = [row for row in table.rows if row[2] != "ok"]
  print(f"{len(table.rows) - len(failed)} of {len(table.rows)} rows ok")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
