"""The sampler's strategy flags, shared by ``d3pm-sample`` and ``d3pm-eval`` (and adopted into their ``--help``):
the strategy, semi-AR blocks, threshold decoding, predictor-corrector remasking and approximate KV caches
(``sampling.SamplerConfig``; ``d3pm_jax.sampling``)."""
from absl import flags

from d3pm_jax import sampling

STRATEGY = flags.DEFINE_enum("strategy", "ancestral", list(sampling.STRATEGIES), "Sampling strategy.")
BLOCKS = flags.DEFINE_integer(
    "blocks", 1, "Semi-autoregressive blocks (absorbing), left to right; a time-conditioned model is given the time "
    "that matches the fraction of the whole sequence still masked.")
THRESHOLD = flags.DEFINE_float("threshold", 0.9, "--strategy=threshold: unmask every masked position whose proposal "
                               "has p(x_0 | x_t) >= this, and at least the most confident (0: all in one call).")
RANK_NOISE = flags.DEFINE_float(
    "rank_noise", 0.0, "--strategy=confidence|threshold: Gumbel noise of this scale on the log-confidence that "
    "ranks proposals (MaskGIT's choice temperature; 0: pure confidence order, large: a uniform random order).")
REMASK = flags.DEFINE_enum("remask", "none", list(sampling.REMASKS),
                           "Predictor-corrector remasking of ancestral steps: 'psi' mixes in the prediction pushed "
                           "to time s with weight 1 - kappa (every process); 'cap' and 'rescale' are ReMDM's sigma "
                           "(absorbing).")
KAPPA = flags.DEFINE_float("kappa", 1.0, "--remask=psi: the ancestral posterior's weight (1: ancestral).")
ETA = flags.DEFINE_float("eta", 0.0, "--remask=cap|rescale: ReMDM's eta.")
REMASK_ON = flags.DEFINE_float("remask_on", 1.0, "The corrector acts while remask_off <= t <= remask_on.")
REMASK_OFF = flags.DEFINE_float("remask_off", 0.0, "See --remask_on.")
REMASK_CONFIDENCE = flags.DEFINE_bool("remask_confidence", False, "ReMDM-conf (absorbing): remask the least "
                                      "confident decoded tokens first (sigma shared by softmax(-confidence)).")
ALPHA_ON = flags.DEFINE_float("alpha_on", 0.0, "ReMDM-loop (absorbing): decode to this alpha by --remask_on, hold it "
                              "inside the window while the corrector runs, decode the rest after --remask_off "
                              "(0: no loop).")
CACHE = flags.DEFINE_enum("cache", "none", list(sampling.CACHES),
                          "Approximate KV cache of --blocks (Fast-dLLM): 'prefix' reuses the finished blocks' keys "
                          "and values within a block, 'dual' the masked suffix's too.")
CACHE_REFRESH = flags.DEFINE_integer("cache_refresh", 0, "Refresh the cache every this many steps of a block "
                                     "(0: only at the block's start; 1: every step, exact).")
ALL = (STRATEGY, BLOCKS, THRESHOLD, RANK_NOISE, REMASK, KAPPA, ETA, REMASK_ON, REMASK_OFF, REMASK_CONFIDENCE,
       ALPHA_ON, CACHE, CACHE_REFRESH)
FIELDS = {"blocks": "num_blocks"}  # flag name -> SamplerConfig field, where they differ


def sampler_kwargs(only_set: bool = False) -> dict:
  """These flags' values as ``SamplerConfig`` fields; ``only_set``: those given on the command line."""
  return {FIELDS.get(f.name, f.name): f.value for f in ALL if f.present or not only_set}
