"""The samplers' speed-quality trade on a trained masked-diffusion workdir, scored by an AR workdir.

    python benchmarks/samplers.py --workdir DIR --evaluator AR_DIR [--num-samples 32] [--blocks 4] [--quick]
                                  [--only TEXT[=T,...] ...] [--temperatures T,...] [--at-entropy H,...]

For each sampler: network calls per sample (NFE), tokens/s (compilation excluded), generative perplexity under
the AR evaluator (with its 95% interval over samples) and the samples' unigram entropy (bits), at the model's
own length L:
  ancestral at 64, 256 and 512 steps (capped at 4L), and with --blocks semi-AR blocks of 512 / blocks steps each
  without a cache and with the dual cache (the same blocks and cache as threshold decoding's, so that its speed-up
  splits into the blocks', the cache's and the tokens a call's), first-hitting (one call per token), threshold decoding at
  tau 0.5 / 0.7 / 0.9 in --blocks semi-AR blocks without a cache and with the prefix and dual caches, and with
  the dual cache at rank noise 1000 (the one position decoded beside those above tau in random order), and ReMDM
  (remask='cap', eta 0.02) at L and 2L steps, with confidence weighting and as the loop (alpha_on 0.9 held for
  t in [0.05, 0.55], ReMDM's setting) at 2L.
The issue's L = 512 needs workdirs trained at 512 (the stdlib runs' max_len is 128), e.g.
    d3pm-train --config=configs/stdlib_tiny.py --workdir=/tmp/md4_512 --config.data.seq_len=512 \
      --config.model.max_len=512 --config.train.batch_size=8
and the same with configs/stdlib_ar.py into /tmp/ar_512 (about 12 and 10 minutes on 2 CPU cores).
Target (issue 24): threshold decoding with the DualCache at >= 4x the tokens/s of 512-step ancestral sampling
at a gen-ppl within 10% of it. Read gen-ppl beside entropy: lower entropy buys lower gen-ppl.
--temperatures (e.g. 0.9,0.97,1.05) runs every chosen sampler at each temperature and then prints its gen-ppl at
the data's unigram entropy measured at the samples' size (``evaluate.entropy_mark``: as many validation windows as
samples, over random draws; the whole split's plug-in entropy reads higher), interpolated between neighbouring
temperatures of that frontier, with a bootstrap interval over the samples and the mark's draws
(``evaluate.frontier_reading``, as d3pm-eval's --frontier reads it), or says that the sweep does not bracket that
entropy, and says so where the sweep's entropy does not rise with temperature. Sweep three temperatures or more
around 1: on the stdlib models 0.9 to 1.05 moves the entropy by about half a bit. Every row draws with the same
key, so a row prints the same figures whichever others run beside it, and each row's samples pair with the first
row's at the same temperature: the last column is the ratio of the two gen-ppls from the paired per-sample
differences (``evaluate.paired_gen_ppl_ratio``), its 95% interval, "indistinguishable" where that holds 1, and
the pairs that would narrow it to a 10% difference.
--only TEXT keeps the samplers whose label contains TEXT; repeat it for several (labels hold commas, so one
value is one piece of a label). --only TEXT=T,... also gives those samplers their own temperatures, in place of
--temperatures (--only TEXT= runs them once, at T 1, outside the sweep), so that two samplers whose frontiers lie
at different temperatures sweep in one process, e.g.
    --only "ancestral 512=0.95,1,1.05" --only "threshold 0.9 rank noise 1000=0.8,0.9,1" --blocks 16
(the README's issue-24 reading: confidence order collapses these models' samples unless drawn hot, while rank
noise 1000 decodes the forced position at random and runs at 5.4x its tokens/s at a gen-ppl that 16 samples do not
tell from ancestral's).
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from d3pm_jax import sampling
from d3pm_jax.data import pipeline
from d3pm_jax.evaluation import evaluate
from d3pm_jax.evaluation.eval_workdir import load_evaluator
from d3pm_jax.models.approximate_cache import kv_cache
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import checkpoints, state

import harness  # the sibling helper (this directory is the script's path)


RANK_NOISES = (1000.0,)  # far above the log-confidence gaps: a uniform random order (0.5-2 collapsed at T 1)


def settings(length: int, blocks: int, quick: bool):
  """(label, SamplerConfig) pairs."""
  steps = sorted({min(n, 4 * length) for n in ((16,) if quick else (64, 256, 512))})
  rows = [(f"ancestral {n} steps", sampling.SamplerConfig(num_steps=n)) for n in steps]
  if blocks > 1:  # threshold decoding's blocks and caches under ancestral steps: the parts of its speed-up
    per_block = max(1, max(steps) // blocks)
    for cache, named in (("none", ""), ("dual", ", dual cache")):  # not "cache dual": --only picks threshold's
      rows.append((f"ancestral {per_block} steps x {blocks} blocks{named}",
                   sampling.SamplerConfig(num_steps=per_block, num_blocks=blocks, cache=cache)))
  rows.append(("first-hitting", sampling.SamplerConfig(strategy="first_hitting")))
  for tau in ((0.7,) if quick else (0.5, 0.7, 0.9)):
    for cache in ("none", "prefix", "dual"):
      rows.append((f"threshold {tau}, {blocks} blocks, cache {cache}",
                   sampling.SamplerConfig(strategy="threshold", threshold=tau, num_blocks=blocks, cache=cache)))
    for noise in RANK_NOISES:
      rows.append((f"threshold {tau} rank noise {noise:g}, {blocks} blocks, cache dual", sampling.SamplerConfig(
          strategy="threshold", threshold=tau, num_blocks=blocks, cache="dual", rank_noise=noise)))
  for n in ((length,) if quick else (length, 2 * length)):
    rows.append((f"ReMDM cap 0.02, {n} steps", sampling.SamplerConfig(num_steps=n, remask="cap", eta=0.02)))
  if not quick:
    rows.append((f"ReMDM-conf cap 0.02, {2 * length} steps", sampling.SamplerConfig(
        num_steps=2 * length, remask="cap", eta=0.02, remask_confidence=True)))
    rows.append((f"ReMDM-loop cap 0.02, {2 * length} steps", sampling.SamplerConfig(
        num_steps=2 * length, remask="cap", eta=0.02, alpha_on=0.9, remask_on=0.55, remask_off=0.05)))
  return rows


def parse_temperatures(where: str, text: str) -> list[float]:
  """A comma-separated list of sampling temperatures, each checked by SamplerConfig (positive and finite); a bad
  one stops the script with a message that starts with ``where``, the flag as given."""
  try:
    temperatures = [float(t) for t in text.split(",") if t]
    for t in temperatures:
      sampling.SamplerConfig(temperature=t)
  except ValueError as e:
    raise SystemExit(f"{where}: give comma-separated temperatures, e.g. 0.9,1.0 ({e})")
  return temperatures


def select(rows, only, temperatures):
  """(label, SamplerConfig, sampler label) for each run: the rows that the --only entries (text, own temperatures
  or None to take --temperatures, flag value) pick, or all of them, one run per temperature where a row has
  temperatures (its label then ends in ", T t" and the sampler label names its frontier)."""
  labels = [label for label, _ in rows]
  chosen = []
  for label, cfg in rows:
    hits = [entry for entry in only if entry[0] in label]
    if len(hits) > 1:
      raise SystemExit(f"--only {hits[0][2]!r} and --only {hits[1][2]!r} both pick {label!r}: give each sampler once")
    temps = hits[0][1] if hits and hits[0][1] is not None else temperatures
    if hits or not only:
      chosen += ([(f"{label}, T {t:g}", dataclasses.replace(cfg, temperature=t), label) for t in temps] if temps
                 else [(label, cfg, label)])
  for text, _, value in only:
    if not any(text in label for label in labels):
      hint = " (one piece of a label per --only: repeat the flag for several)" if "," in text else ""
      raise SystemExit(f"--only {value!r} matches none of the samplers {labels}{hint}")
  return chosen


def main():
  parser = harness.parser(__doc__)
  parser.add_argument("--workdir", required=True, help="a trained masked-diffusion (absorbing) workdir")
  parser.add_argument("--evaluator", required=True, help="an AR baseline's workdir on the same data")
  parser.add_argument("--num-samples", type=int, default=32)
  parser.add_argument("--blocks", type=int, default=4, help="semi-AR blocks of threshold decoding")
  parser.add_argument("--quick", action="store_true", help="one setting of each kind, few steps")
  parser.add_argument("--only", action="append", default=[], metavar="TEXT[=T,...]",
                      help="run only the samplers whose label contains TEXT, at temperatures T,... if given (else at "
                      "--temperatures); repeat for several, e.g. --only 'ancestral 256' --only 'ReMDM=0.9,1'")
  parser.add_argument("--temperatures", default="", help="comma-separated temperatures: run each chosen sampler "
                      "at each, and read its gen-ppl at the data's unigram entropy off that frontier")
  parser.add_argument("--at-entropy", default="", help="with --temperatures or --only TEXT=T,...: comma-separated "
                      "entropies (bits) at which to read each frontier besides the data's, e.g. another sampler's")
  args = parser.parse_args()
  temperatures = parse_temperatures(f"--temperatures={args.temperatures!r}", args.temperatures)
  only = []
  for value in args.only:
    text, has_own, own = value.rpartition("=") if "=" in value else (value, "", "")
    only.append((text, parse_temperatures(f"--only {value!r}", own) if has_own else None, value))
  try:
    at_entropies = [float(h) for h in args.at_entropy.split(",") if h]
  except ValueError as e:
    raise SystemExit(f"--at-entropy={args.at_entropy!r}: give comma-separated entropies in bits, e.g. 1.7,2.0 ({e})")
  if at_entropies and not (temperatures or any(temps for _, temps, _ in only)):
    raise SystemExit(f"--at-entropy={args.at_entropy!r} reads temperature frontiers: give --temperatures "
                     "(or --only TEXT=T,...) too")
  config = checkpoints.load_experiment(args.workdir)
  most = math.log2(config.model.vocab_size)  # a unigram entropy lies in [0, log2 V]
  if any(not 0 <= h <= most for h in at_entropies):
    raise SystemExit(f"--at-entropy={args.at_entropy!r}: entropies are bits in [0, {most:.3f}] "
                     f"(log2 of this model's vocabulary of {config.model.vocab_size})")
  params, step = checkpoints.restore_params(args.workdir, config)
  model, process = Transformer(config.model), state.process_for(config, args.workdir)
  if process is None or config.process.name != "absorbing" or config.process.block_size:
    raise SystemExit(f"{args.workdir} is not a masked-diffusion run (absorbing, no block_size)")
  score, num_tokens, _ = load_evaluator(config, args.evaluator)
  length, batch = config.data.seq_len, args.num_samples
  harness.stated_peak()
  print(f"{args.workdir} (step {step}), L = {length}, {batch} samples; evaluator {args.evaluator}")
  logits_fn = lambda p, x, t: model.apply({"params": p}, x, t)
  rows = select(settings(length, args.blocks, args.quick), only, temperatures)
  mark = None
  if any(label != sampler_label for label, _, sampler_label in rows):  # a temperature sweep
    data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed, args.workdir)
    mark = evaluate.entropy_mark(data.val_windows, data.val_weights, config.model.vocab_size,
                                 min(batch, data.val_windows.shape[0]))
    print(f"the data's unigram entropy at {mark['windows']} windows (the samples' size): {mark['mean']:.3f} +- "
          f"{mark['std']:.3f} bits over random draws ({mark['whole_split']:.3f} over the whole split)")
  width = max(len(label) for label, _, _ in rows)
  reference = rows[0][2]  # the first ancestral row: every row is compared with it at the same temperature
  print(f"{'sampler':<{width}s} {'NFE':>6s} {'tokens/s':>9s} {'gen-ppl':>22s} {'entropy':>8s}   "
        f"gen-ppl / {reference}'s, paired by key [95%] (pairs to resolve 10%)")
  frontier, nats_by_temperature = {}, {}
  for label, cfg, sampler_label in rows:
    run = jax.jit(lambda p, key, cfg=cfg: sampling.sample_with_nfe(
        process, lambda x, t: logits_fn(p, x, t), key, batch, length, cfg,
        time_conditioned=config.model.time_conditioning, kv_cache=kv_cache(model, p)))
    key = jax.random.PRNGKey(0)
    compiled = run.lower(params, key).compile()
    start = time.perf_counter()
    tokens, nfe = jax.block_until_ready(compiled(params, key))
    seconds = time.perf_counter() - start
    tokens = np.asarray(tokens)
    nats = np.asarray(score(tokens), np.float64)
    quality = evaluate.generative_perplexity(tokens, lambda _: nats, num_tokens)
    ppl = f"{quality['gen_ppl']:.2f} [{quality['gen_ppl_95'][0]:.2f}, {quality['gen_ppl_95'][1]:.2f}]"
    paired = ""
    base = nats_by_temperature.setdefault(cfg.temperature, nats) if sampler_label == reference else \
        nats_by_temperature.get(cfg.temperature)
    if base is not None and sampler_label != reference and batch > 1:
      p = evaluate.paired_gen_ppl_ratio(nats, base, length)
      paired = (f"   {p['ratio']:.3f} [{p['ratio_95'][0]:.3f}, {p['ratio_95'][1]:.3f}]"
                f"{'' if p['resolved'] else ' indistinguishable'} ({p['pairs_to_resolve']})")
    print(f"{label:<{width}s} {float(np.mean(nfe)):6.1f} {batch * length / seconds:9.1f} {ppl:>22s} "
          f"{quality['unigram_entropy']:8.3f}{paired}", flush=True)
    if label != sampler_label:
      frontier.setdefault(sampler_label, []).append((cfg.temperature, tokens, nats))
  if mark is None:
    return
  for entropy, whose in [(None, "the data's entropy")] + [(h, "entropy") for h in at_entropies]:
    at_mark = mark if entropy is None else {**mark, "mean": entropy, "draws": np.array([entropy]),
                                            "resampled_draws": mark["resampled_draws"] - mark["mean"] + entropy}
    print(f"gen-ppl at {whose} ({at_mark['mean']:.3f} bits), along each sampler's temperature frontier "
          f"[95% bootstrap over samples{' and the mark' if entropy is None else ''}]:")
    for sampler_label, sweep in frontier.items():
      sweep = sorted(sweep, key=lambda entry: entry[0])
      reading = evaluate.frontier_reading([(t, n) for _, t, n in sweep], config.model.vocab_size, at_mark)
      span = f"{min(reading['entropies']):.3f}-{max(reading['entropies']):.3f}"
      lo, hi = reading["gen_ppl_95"]
      text = (f"{reading['gen_ppl']:.2f} [{'below' if lo is None else f'{lo:.2f}'}, "
              f"{'above' if hi is None else f'{hi:.2f}'}]" if reading["gen_ppl"] is not None
              else f"not bracketed (the sweep's entropies span {span} bits)")
      if not reading["monotone"]:
        text += " (entropy does not rise with temperature here: only neighbouring temperatures are joined)"
      print(f"  {sampler_label:<{width - 2}s} {text}", flush=True)


if __name__ == "__main__":
  main()
