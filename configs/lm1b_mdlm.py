"""MDLM on LM1B (Sahoo et al. 2024, Table 1): masked diffusion with the continuous-time NELBO, target test
perplexity <= 27.04 after 33B tokens (MDLM's count: 1M steps x 512 x 128 positions x the half that is masked on
average; 65.5B token positions in all).

Data: MDLM's setup: bert-base-uncased's WordPiece vocabulary (30,522 pieces), each sentence `[CLS] ... [SEP]`
in its own row padded to 128 tokens, a longer one truncated (MDLM's `wrap=False`); the figure is on LM1B's held-out set (tfds's `test`, our `validation`).
Padding is neither attended to nor scored. The unit is perplexity per WordPiece token, what d3pm-eval prints as
perplexity (per token).
    d3pm-prepare --dataset=lm1b --setup=mdlm --tokenizer_path=/path/to/bert-base-uncased/vocab.txt \\
        --manual_dir=/path/to/lm1b --out=$D3PM_DATA/lm1b_mdlm
    d3pm-train --config=configs/lm1b_mdlm.py --workdir=/shared/lm1b_mdlm
    d3pm-eval --workdir=/shared/lm1b_mdlm --ema          (MDLM validates with its EMA weights)
($D3PM_DATA defaults to ./data; or pass --config.data.prepared_dir=DIR.)

Model and budget: MDLM's `small` DiT size (12 layers, d=768, 12 heads; here 85M parameters without the untied
input and output embeddings, 132M in all), dropout 0.1, log-linear schedule, global batch 512 of 128 tokens for
1M steps, AdamW at 3e-4 after 2500 warm-up steps then constant, betas (0.9, 0.999), no weight decay, clipping at
1.0, EMA 0.9999, no time conditioning (`time_conditioning: False` in MDLM's DiT).

Hardware and time (an estimate from 6 x parameters x tokens, not a measurement): ~5.2e19 FLOPs, about 36 hours
on one H100 at 40% of its bf16 peak, or 4.5 hours on an 8-GPU node (data parallel).

Deviations from the paper:
  - The network is this library's transformer (pre-norm, rotary positions, a GLU MLP of width 2048 with the
    parameters of DiT's 4x GELU MLP (`model.mlp_dim`, `model.mlp_activation`: MDLM's is 3072 wide, GELU, no
    gate), and no adaLN at all without time conditioning, where MDLM's DiT keeps its adaLN layers fed a constant);
    MDLM's DiT uses LayerNorm (scale only), which is kept. Expected effect: small; a different architecture at
    equal size.
  - Times are drawn with this library's low-discrepancy (antithetic) sampler, as MDLM's are; the schedule keeps
    alpha in [1e-3, 1 - 1e-3] by an affine squash (`process.eps`) and draws t from all of [0, 1]
    (`process.clip_low`), where MDLM's log-linear noise is alpha(t) = 1 - (1 - 1e-3) t and its sampler keeps
    t >= 1e-3. Expected effect: none beyond noise.

Compiled for its hardware by the real compilers, train step at the batch above, and fits (the README's table,
tests/test_paper_targets.py):
    d3pm-compile --config=configs/lm1b_mdlm.py --target=gpu:h100x8
Kernels: model.attention_impl and head_impl 'auto', the target platform's: cuDNN attention and the Triton
head on GPUs, splash and the Mosaic head on TPUs (the XLA ones on a CPU).
"""
from d3pm_jax.config import NOT_IN_REFERENCE, base_config, parse_arg, prepared_path

HARDWARE = ("gpu:h100x8",)  # d3pm-compile targets the docstring promises (tests/test_paper_targets.py)


def get_config(arg=None):
  parse_arg(arg, ())
  cfg = base_config()
  cfg.process.update(name="absorbing", loss="masked", schedule="loglinear", eps=1e-3)
  cfg.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, cond_dim=128, max_len=128,
                   time_conditioning=False, norm="layer", dtype="bfloat16", vocab_pad_multiple=128, dropout=0.1)
  cfg.model.update(attention_impl="auto", head_impl="auto")  # the platform's kernels
  cfg.model.scan_layers = True  # one compiled layer body: a 12-layer step compiles ~3.6x faster (text8_md4, H100)
  cfg.data.update(name="lm1b", tokenizer="wordpiece", seq_len=128, prepared_dir=prepared_path("lm1b_mdlm"))
  cfg.train.update(steps=1_000_000, batch_size=512, learning_rate=3e-4, warmup_steps=2500, min_lr_ratio=1.0,
                   weight_decay=0.0, b2=0.999, grad_clip=1.0, ema_decay=0.9999, log_every=100,
                   eval_every=10_000, eval_batches=32, checkpoint_every=5000, keep_checkpoints=3, sample_steps=1000)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return cfg


def reference(arg=None) -> dict:
  """The reference's value of every field this config's run reads (tests/test_paper_configs.py): MDLM's released
  configs (kuleshov-group/mdlm `configs/config.yaml`, `model/small.yaml`, `data/lm1b.yaml`, `models/dit.py`,
  `noise_schedule.py`), which Suppl. D.2 of the paper states."""
  parse_arg(arg, ())
  return {
      "model.num_layers": 12, "model.d_model": 768, "model.num_heads": 12,
      "model.mlp_dim": 3072, "model.mlp_activation": NOT_IN_REFERENCE,  # GELU (tanh), no gate
      "model.time_conditioning": False, "model.norm": "layer", "model.dropout": 0.1, "model.attention_dropout": 0.0,
      "model.depth_scaled_init": False, "model.rope_base": 10000.0, "model.dtype": "bfloat16",
      "data.name": "lm1b", "data.tokenizer": "wordpiece", "data.seq_len": 128, "data.random_crops": False,
      "train.batch_size": 512, "train.steps": 1_000_000, "train.learning_rate": 3e-4, "train.warmup_steps": 2500,
      "train.lr_schedule": "cosine", "train.min_lr_ratio": 1.0,  # constant after warm-up: a cosine from 1 to 1
      "train.weight_decay": 0.0, "train.b1": 0.9, "train.b2": 0.999, "train.grad_clip": 1.0,
      "train.ema_decay": 0.9999,
      "process.name": "absorbing", "process.loss": "masked", "process.schedule": "loglinear",
      "process.eps": NOT_IN_REFERENCE,  # alpha(t) = 1 - (1 - 1e-3) t: clipped at t = 1 only
      "process.clip_low": 1e-3, "process.clip_high": 1.0,  # sampling_eps: t in [1e-3, 1]
      "process.clip_search": False, "process.block_size": 0,
  }
