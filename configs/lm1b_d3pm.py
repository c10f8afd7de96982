"""D3PM on LM1B (Austin et al. 2021, Table 2, T = 1000), one config per process:

    configs/lm1b_d3pm.py:absorbing          target: test perplexity <= 76.9 per word
    configs/lm1b_d3pm.py:uniform            target: test perplexity <= 137.9 per word
    configs/lm1b_d3pm.py:nearest_neighbor   target: test perplexity <= 149.5 per word

The unit is D3PM's: perplexity per word, each sentence's end counted as a word (exp of the total nats over the
held-out sentences' whitespace-separated words plus one per sentence), which d3pm-eval prints as "per word" for
LM1B; its bits per token are per sentencepiece piece and not comparable with these targets.

Data: D3PM's setup (its reference code's lm1b pipeline): a cased sentencepiece model with 8192 pieces trained on
LM1B's training split, each sentence wrapped in <s> ... </s> (the end is scored), the sentence stream cut into rows
of 128 tokens with no segment ids, so attention crosses sentences as in D3PM's batching; the figure is on LM1B's
held-out set (tfds's `test`, our `validation`).
    d3pm-prepare --dataset=lm1b --setup=d3pm --manual_dir=/path/to/lm1b --out=$D3PM_DATA/lm1b_d3pm
    d3pm-train --config=configs/lm1b_d3pm.py:absorbing --workdir=/shared/lm1b_d3pm_absorbing
    d3pm-eval --workdir=/shared/lm1b_d3pm_absorbing   (the trained weights, as D3PM's trainer keeps no EMA; the
                                                      exact T-step bound on every window)
($D3PM_DATA defaults to ./data; or pass --config.data.prepared_dir=DIR.)

Model and budget: a 12-layer, d=768, 12-head transformer (D3PM's reference `lm1b_base`: `gpt_base`), T = 1000,
batch 512 x 128 tokens, 1M steps (67B token positions), AdamW without weight decay at 5e-4 after 10,000 linear
warm-up steps, then decaying as 1/sqrt(step), no EMA (D3PM's trainer keeps none). Loss: the hybrid loss with lambda = 0.01 for absorbing and
pure L_vb (lambda = 0) for uniform and nearest-neighbour (D3PM's Section 5.2: 0.01 hurt them). Schedules: absorbing
uses 1/(T - t + 1) (`jsd`, which D3PM's mutual-information schedule reduces to for absorbing), uniform the cosine
schedule (`cosine_betas`), nearest-neighbour the mutual-information schedule (`mutual_information`, computed at
start from the process and the training split's unigram counts). Gradient clipping at 0.25 (restated below).

Hardware and time (an estimate from 6 x parameters x tokens, not a measurement): ~4.2e19 FLOPs, about 30 hours
on one H100 at 40% of its bf16 peak, or 4 hours on an 8-GPU node (data parallel, `mesh.data=-1`).

Paper and released code: the optimiser, batch and budget follow the paper's App. B.2 (as recorded in
`reference()`), because the published figures are the paper's runs. D3PM's released `lm1b_base` preset differs:
AdamW 2e-4 with 5,000 warm-up steps and a constant rate after, 8 sequences per device, 10,000 steps: a
demonstration preset, not the paper's run; it has no LM1B preset for uniform or nearest-neighbour at all. Where
the paper is silent, the released code is the reference: no EMA (the trainer keeps none), Adam's betas (0.9,
0.999), the test split, the 1/(T - t + 1) schedule, the T5 layer norm (RMS, scale only).

Deviations from the paper:
  - The network is this library's transformer (pre-norm RMSNorm, rotary positions (`model.rope_base`) where D3PM
    has T5 relative position biases, a GLU MLP of width 2048 (`model.mlp_dim`, `model.mlp_activation`) where D3PM
    has a 3072-wide GELU MLP, and adaLN time conditioning of width 128 (`model.cond_dim`) where D3PM adds a learned
    per-step embedding to the tokens'); the same depth, width and heads (92M parameters without the embeddings,
    105M in all). Expected effect: small; a different architecture at equal size.
  - `process.eps`: the schedule's keep-probability is squashed into [1e-4, 1 - 1e-4], so the last step leaves
    1e-4 of the signal where D3PM's last step (beta_T = 1) masks, or mixes, everything; the prior term then costs
    about 1e-4 nats a token instead of 0. Expected effect: none beyond noise (the bound counts the prior term).
  - nearest_neighbor's process (`process.nn_rate_scale`, `process.nn_uniform_rate`) is a rate matrix on a fixed
    k-nearest-neighbour graph (k = 5, as D3PM's), uniformised, where D3PM Sinkhorn-normalises the kNN adjacency of
    the model's own embeddings, refreshed every 200 steps. Expected effect: unknown; a different forward process
    with the same neighbour structure.
  - `model.dtype`: training is in bf16 with float32 parameters; D3PM trained in float32. Expected effect: none on
    the bound beyond noise.
  - `train.grad_clip`: D3PM clips the per-sequence sums' gradient at 0.25; this loss is the per-token mean (1/128
    of that sum), so the same clip is 0.25 / 128. Expected effect: none (the same clip, restated).
  - nearest_neighbor needs the token embeddings that define the neighbours, which D3PM built from word
    embeddings and this library does not ship: pass --config.process.nn_embeddings=emb.npy (a [8192, D] table
    for the prepared tokenizer). Its uniformisation at V = 8192 is refused as too large (see
    processes/nearest_neighbor.py). Expected effect: the row cannot run at this vocabulary yet.
  - By default the sentencepiece model is trained here with D3PM's recipe; D3PM's shipped
    `lm1b-sentencepiece-8k.model` is used when passed as d3pm-prepare --tokenizer_path=lm1b-sentencepiece-8k.model
    (a model without byte pieces is accepted, lossy on characters it has no piece for). Expected effect: a
    different segmentation, which the per-word unit makes comparable.

Compiled for its hardware by the real compilers, train step at the batch above, and fits (the README's table,
tests/test_paper_targets.py):
    d3pm-compile --config=configs/lm1b_d3pm.py --target=gpu:h100x8
Kernels: model.attention_impl and head_impl 'auto', the target platform's: cuDNN attention and the Triton
head on GPUs, splash and the Mosaic head on TPUs (the XLA ones on a CPU).
"""
from d3pm_jax.config import NOT_IN_REFERENCE, base_config, parse_arg, prepared_path

HARDWARE = ("gpu:h100x8",)  # d3pm-compile targets the docstring promises (tests/test_paper_targets.py)

SCHEDULES = {"absorbing": "jsd", "uniform": "cosine_betas", "nearest_neighbor": "mutual_information"}
HYBRID_LAMBDA = {"absorbing": 0.01, "uniform": 0.0, "nearest_neighbor": 0.0}


def get_config(arg=None):
  process = parse_arg(arg, tuple(SCHEDULES)) or "absorbing"
  cfg = base_config()
  cfg.process.update(name=process, loss="d3pm", schedule=SCHEDULES[process], num_steps=1000,
                     hybrid_lambda=HYBRID_LAMBDA[process], nn_k=5)
  cfg.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, cond_dim=128, max_len=128,
                   time_conditioning=True, dtype="bfloat16", vocab_pad_multiple=128)
  cfg.model.update(attention_impl="auto", head_impl="auto")  # the platform's kernels
  cfg.model.scan_layers = True  # one compiled layer body: a 12-layer step compiles ~3.6x faster (text8_md4, H100)
  cfg.data.update(name="lm1b", tokenizer="sentencepiece", seq_len=128, prepared_dir=prepared_path("lm1b_d3pm"))
  cfg.train.update(steps=1_000_000, batch_size=512, learning_rate=5e-4, warmup_steps=10_000,
                   lr_schedule="inverse_sqrt", weight_decay=0.0, b2=0.999, grad_clip=0.25 / 128, ema_decay=0.0,
                   log_every=100, eval_every=10_000, eval_batches=64, checkpoint_every=5000, keep_checkpoints=3,
                   sample_steps=1000)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return cfg


def reference(arg=None) -> dict:
  """The reference's value of every field this config's run reads (tests/test_paper_configs.py): D3PM's paper
  (App. B.2, Table 2) and, where it is silent, its released code (google-research `d3pm/text`: `configs.py`,
  `models.py`, `trainers.py`, `diffusion.py`)."""
  process = parse_arg(arg, tuple(SCHEDULES)) or "absorbing"
  record = {
      "model.num_layers": 12, "model.d_model": 768, "model.num_heads": 12,
      "model.mlp_dim": 3072, "model.mlp_activation": NOT_IN_REFERENCE,  # a plain GELU MLP, no gate
      "model.cond_dim": NOT_IN_REFERENCE,  # a learned per-step embedding added to the tokens'
      "model.time_conditioning": True, "model.norm": "rms",  # T5's layer norm: RMS, scale only
      "model.dropout": 0.0, "model.attention_dropout": 0.0, "model.depth_scaled_init": False,
      "model.rope_base": NOT_IN_REFERENCE,  # T5 relative position biases
      "model.dtype": "float32",
      "data.name": "lm1b", "data.tokenizer": "sentencepiece", "data.seq_len": 128, "data.random_crops": False,
      "train.batch_size": 512, "train.steps": 1_000_000, "train.learning_rate": 5e-4, "train.warmup_steps": 10_000,
      "train.lr_schedule": "inverse_sqrt", "train.weight_decay": 0.0, "train.b1": 0.9, "train.b2": 0.999,
      "train.grad_clip": 0.25, "train.ema_decay": 0.0,
      "process.name": process, "process.loss": "d3pm", "process.schedule": SCHEDULES[process],
      "process.num_steps": 1000, "process.hybrid_lambda": HYBRID_LAMBDA[process],
      "process.eps": 0.0,  # beta_T = 1: the last step masks (or mixes) everything
  }
  if process == "nearest_neighbor":
    record.update({"process.nn_k": 5, "process.nn_rate_scale": NOT_IN_REFERENCE,
                   "process.nn_uniform_rate": NOT_IN_REFERENCE})
  return record
