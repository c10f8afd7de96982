"""``d3pm-sample --workdir=DIR [--steps N] [--strategy S] [--prompt TEXT | --infill TEMPLATE]``.

Example: d3pm-sample --workdir=/tmp/stdlib_tiny --strategy=threshold --threshold=0.7 --prompt="def "
Strategies: ancestral (with --remask for predictor-corrector), confidence, first_hitting (one network call per
token, exact for masked diffusion) and threshold (parallel decoding; prints the network calls per sample).

Loads the latest checkpoint of a ``d3pm-train`` workdir and prints decoded samples. ``--prompt`` fixes a prefix;
``--infill`` fixes a template in which ``[MASK]`` marks one free token and ``[MASK]*20`` twenty (backslash
escapes ``\\n`` and ``\\t`` are understood). Given tokens never change; positions after the prompt or template are
generated too, up to the model's sequence length.
"""
from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from d3pm_jax import sampling
from d3pm_jax.cli import common, sampler_flags
from d3pm_jax.data import pipeline
from d3pm_jax.models import approximate_cache
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import checkpoints, state

_WORKDIR = flags.DEFINE_string("workdir", None, "A d3pm-train workdir.")
_STEPS = flags.DEFINE_integer("steps", 128, "Reverse steps (diffusion; per block with --blocks).")
_GRID = flags.DEFINE_enum("time_grid", "uniform", list(sampling.TIME_GRIDS), "Reverse-step times.")
_NUM = flags.DEFINE_integer("num_samples", 4, "How many samples.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Temperature of the denoiser's prediction p(x_0 | x_t).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass of the denoiser's prediction p(x_0 | x_t).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Take the argmax of p(x_0 | x_t); which positions unmask stays random.")
_PROMPT = flags.DEFINE_string("prompt", None, "A prefix to continue.")
_INFILL = flags.DEFINE_string("infill", None, "A template with [MASK] or [MASK]*N holes.")
_LENGTH = flags.DEFINE_integer("length", 0, "Tokens to generate (block diffusion only; any multiple of the block "
                               "size, past the training length with a sliding window). Default: the training length.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=-2**63, upper_bound=2**63 - 1)
_EMA = flags.DEFINE_bool("ema", False, "Sample with the EMA parameters.")
_PRECISION = flags.DEFINE_enum("precision", "float64", ["float32", "float64"],
                               "Precision of the categorical draws (float64 turns on 64-bit JAX).")
flags.mark_flag_as_required("workdir")
flags.adopt_module_key_flags(sampler_flags)  # --help lists the frontier samplers' flags too

MASK_PATTERN = re.compile(r"\[MASK\](?:\*(\d+))?")


def parse_template(template: str, tokenizer, length: int):
  """(given_L bool, prompt_L int32) from a template: text pieces are fixed, ``[MASK]*N`` leaves N free tokens."""
  given, tokens = [], []
  pos = 0
  for match in MASK_PATTERN.finditer(template):
    piece = tokenizer.encode(template[pos:match.start()].encode())
    given += [True] * len(piece)
    tokens += piece.tolist()
    holes = int(match.group(1) or 1)
    given += [False] * holes
    tokens += [0] * holes
    pos = match.end()
  tail = tokenizer.encode(template[pos:].encode())
  given += [True] * len(tail)
  tokens += tail.tolist()
  if len(tokens) > length:
    raise ValueError(f"the template needs {len(tokens)} tokens but the model's sequence length is {length}")
  pad = length - len(tokens)
  return np.array(given + [False] * pad), np.array(tokens + [0] * pad, np.int32)


class Progress:
  """A progress line on stderr; ``total`` None (threshold decoding: as many steps as it takes) counts only."""

  def __init__(self, total: int | None):
    self.total, self.done = total, 0

  def __call__(self):
    self.done += 1
    if self.total is None:
      print(f"\rsampling: step {self.done}", end="", file=sys.stderr, flush=True)
    elif self.done % max(1, self.total // 20) == 0 or self.done == self.total:
      print(f"\rsampling: step {self.done}/{self.total}", end="\n" if self.done == self.total else "",
            file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # orbax warns at every read-only open
  if _NUM.value < 1:
    raise app.UsageError(f"--num_samples must be >= 1; got {_NUM.value}")
  if _PRECISION.value == "float64":
    jax.config.update("jax_enable_x64", True)
  workdir = _WORKDIR.value
  try:
    config = checkpoints.load_experiment(workdir)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if _PROMPT.value is not None and _INFILL.value is not None:
    raise app.UsageError("pass either --prompt or --infill, not both")
  if config.data.name == "markov":
    raise app.UsageError("d3pm-sample decodes text; this workdir trained on the synthetic 'markov' source")
  tokenizer = pipeline.tokenizer_of(config.data, workdir)
  params, step = checkpoints.restore_params(workdir, config, _EMA.value)
  length, batch = config.data.seq_len, _NUM.value
  given = prompt = None
  template = _INFILL.value if _INFILL.value is not None else _PROMPT.value
  if template is not None:
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    given_L, prompt_L = parse_template(template, tokenizer, length)
    given, prompt = jnp.tile(given_L, (batch, 1)), jnp.tile(prompt_L, (batch, 1))
  model = Transformer(config.model)
  process = state.process_for(config, workdir)
  cfg = sampling.SamplerConfig(num_steps=_STEPS.value,
                               temperature=_TEMPERATURE.value, top_p=_TOP_P.value, precision=_PRECISION.value,
                               greedy=_GREEDY.value, time_grid=_GRID.value, **sampler_flags.sampler_kwargs())
  key = jax.random.PRNGKey(_SEED.value)
  print(f"checkpoint step {step} of {workdir}", file=sys.stderr)
  if process is None:
    if _INFILL.value is not None:
      raise app.UsageError("the autoregressive baseline continues prompts; it cannot infill")
    diffusion_only = [f"--{f.name}" for f in (_STEPS, _GRID, *sampler_flags.ALL) if f.present]
    if diffusion_only:
      raise app.UsageError(f"{', '.join(diffusion_only)} set the diffusion sampler, but {workdir} holds the "
                           f"autoregressive baseline, which decodes one token per position left to right; drop them "
                           f"(--temperature, --top_p, --greedy, --prompt and --seed apply)")
    tokens = sampling.autoregressive_sample(model, params, key, batch, length, config.model.vocab_size - 1, cfg,
                                            given, prompt)
  elif config.process.block_size:
    if sampler_flags.BLOCKS.present:
      raise app.UsageError(f"{workdir} holds a block-diffusion model (process.block_size="
                           f"{config.process.block_size}), which samples block by block already; drop --blocks")
    if _LENGTH.present and (_LENGTH.value < 1 or _LENGTH.value % config.process.block_size):
      raise app.UsageError(f"--length must be a positive multiple of the block size {config.process.block_size}; "
                           f"got {_LENGTH.value}")
    length = _LENGTH.value if _LENGTH.present else length
    if given is not None and given.shape[1] < length:
      pad = length - given.shape[1]
      given, prompt = np.pad(given, ((0, 0), (0, pad))), np.pad(prompt, ((0, 0), (0, pad)))
    eos = getattr(tokenizer, "eos_id", None)
    tokens = jax.jit(lambda key: state.block_sample(config, model, params, process, key, batch, length, cfg,
                                                    given, prompt, eos_id=eos))(key)
  else:
    if _LENGTH.present:
      raise app.UsageError("--length sets how much a block-diffusion model generates; this model's length is its "
                           f"training length, {length}")
    logits_fn = lambda x_t, t_B: model.apply({"params": params}, x_t, t_B)
    steps = {"first_hitting": length, "threshold": None}.get(cfg.strategy, cfg.num_steps * cfg.num_blocks)
    progress = Progress(steps)
    tokens, nfe = sampling.sample_with_nfe(process, logits_fn, key, batch, length, cfg, given, prompt,
                                           on_step=progress, time_conditioned=config.model.time_conditioning,
                                           head=state.sample_head(model, params, process, cfg),
                                           kv_cache=approximate_cache.kv_cache(model, params))
    nfe = np.asarray(nfe)
    print(("\n" if steps is None else "") + f"network calls per sample: {nfe.mean():.1f} (min {nfe.min()}, "
          f"max {nfe.max()})", file=sys.stderr)
  print(f"unigram entropy of the samples: {sampling.unigram_entropy(tokens, config.model.vocab_size):.3f} bits",
        file=sys.stderr)
  for row in np.asarray(tokens):
    print("-" * 40)
    print(tokenizer.decode(row).decode("utf-8", errors="replace"))


def run():
  common.run(main, "d3pm-sample")


if __name__ == "__main__":
  run()
