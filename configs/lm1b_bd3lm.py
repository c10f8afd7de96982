"""BD3-LM on LM1B (Arriola et al. 2025, "Block Diffusion", Table 1): block diffusion with blocks of L' tokens,
target test perplexity <= 28.23 at L' = 4 (':4', the default) after 65B tokens; the same table gives MDLM
<= 31.78 and an autoregressive transformer 22.83 in that setup. The figures for ':8' and ':16' are in the same
table; check them there before quoting them (this docstring quotes only the L' = 4 row, verified).

Data: bert-base-uncased's WordPiece vocabulary (30,522 pieces), as configs/lm1b_mdlm.py, in BD3-LM's rows
(its `lm1b-wrap`): the stream of each sentence's "pieces [SEP]" cut into rows of 126 tokens, each row wrapped as
`[CLS] ... [SEP]` (`--packing=wrapped`), so a block may cross a sentence boundary, as in the paper; each row's
first token is given clean and left out of the likelihood (`data.ignore_bos`, BD3-LM's `ignore_bos`).
    d3pm-prepare --dataset=lm1b --setup=mdlm --packing=wrapped --tokenizer_path=/path/to/bert-base-uncased/vocab.txt \\
        --manual_dir=/path/to/lm1b --out=$D3PM_DATA/lm1b_mdlm_wrapped
    d3pm-train --config=configs/lm1b_bd3lm.py:4 --workdir=/shared/lm1b_bd3lm4
    d3pm-eval --workdir=/shared/lm1b_bd3lm4 --ema         (BD3-LM, as MDLM, validates with its EMA weights)
($D3PM_DATA defaults to ./data; or pass --config.data.prepared_dir=DIR.)

Model and budget: MDLM's `small` size without time conditioning (12 layers, d=768, 12 heads, dropout 0.1,
log-linear schedule), global batch 512 of 128 tokens for 1M steps (65.5B token positions), AdamW at 3e-4 after
2500 warm-up steps then constant, betas (0.9, 0.999), no weight decay, clipping at 1.0, EMA 0.9999. Each step
runs the network once over x_t followed by x_0 (256 positions) under the block-diffusion mask.

Hardware and time (an estimate from 6 x parameters x tokens, doubled for the 2L pass, not a measurement):
~1e20 FLOPs, about 72 hours on one H100 at 40% of its bf16 peak, or 9 hours on an 8-GPU node (data parallel).

Clipped schedule: training draws t from a window that a search re-chooses at each evaluation as the one whose
per-block loss estimate varies least on the first validation batch (`process.clip_search`, BD3-LM's `var_min`),
starting from [1e-3, 1]; evaluation integrates the bound over all of [0, 1].

Deviations from the paper:
  - The network is this library's transformer (pre-norm LayerNorm, rotary positions, a GLU MLP of width 2048:
    `model.mlp_dim`, `model.mlp_activation`); BD3-LM's is MDLM's DiT (a 3072-wide GELU MLP, adaLN fed a
    constant). BD3-LM's config sets `tie_word_embeddings: True`, but its code never ties them; both are untied
    here too. Expected effect: small; a different architecture at equal size.
  - BD3-LM fine-tunes an MDLM checkpoint (850k steps of the same data at L' = 128); here the whole budget trains
    at L'. Expected effect: likely small; the objective is the same, the paper fine-tunes for speed.
  - The searched windows are this library's (`losses.CLIP_WINDOWS`: seven windows, the full one among them);
    BD3-LM searches widths 0.5-0.9 in steps of 0.05. Expected effect: small; the variance criterion is the same.
  - `process.eps`: alpha is squashed into [1e-3, 1 - 1e-3]; BD3-LM masks with probability exactly t. Expected
    effect: none beyond noise.

Compiled for its hardware by the real compilers, train step at the batch above, and fits (the README's table,
tests/test_paper_targets.py):
    d3pm-compile --config=configs/lm1b_bd3lm.py --target=gpu:h100x8
Kernels: model.attention_impl and head_impl 'auto', the target platform's: cuDNN attention and the Triton
head on GPUs, splash and the Mosaic head on TPUs (the XLA ones on a CPU).
"""
from d3pm_jax.config import NOT_IN_REFERENCE, base_config, parse_arg, prepared_path

HARDWARE = ("gpu:h100x8",)  # d3pm-compile targets the docstring promises (tests/test_paper_targets.py)

BLOCK_SIZES = {"4": 4, "8": 8, "16": 16}


def get_config(arg=None):
  block_size = BLOCK_SIZES[parse_arg(arg, tuple(BLOCK_SIZES)) or "4"]
  cfg = base_config()
  cfg.process.update(name="absorbing", loss="masked", schedule="loglinear", eps=1e-3, block_size=block_size,
                     clip_search=True, clip_low=1e-3, clip_high=1.0)
  cfg.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, cond_dim=128, max_len=128,
                   time_conditioning=False, norm="layer", dtype="bfloat16", vocab_pad_multiple=128, dropout=0.1)
  cfg.model.update(attention_impl="auto", head_impl="auto")  # the platform's kernels
  cfg.model.scan_layers = True  # one compiled layer body: a 12-layer step compiles ~3.6x faster (text8_md4, H100)
  cfg.data.update(name="lm1b", tokenizer="wordpiece", seq_len=128, prepared_dir=prepared_path("lm1b_mdlm_wrapped"),
                  ignore_bos=True)
  cfg.train.update(steps=1_000_000, batch_size=512, learning_rate=3e-4, warmup_steps=2500, min_lr_ratio=1.0,
                   weight_decay=0.0, b2=0.999, grad_clip=1.0, ema_decay=0.9999, log_every=100,
                   eval_every=10_000, eval_batches=32, checkpoint_every=5000, keep_checkpoints=3, sample_steps=1000)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return cfg


def reference(arg=None, seq_len: int = 128, tokenizer: str = "wordpiece", data: str = "lm1b") -> dict:
  """The reference's value of every field this config's run reads (tests/test_paper_configs.py): BD3-LM's released
  code (kuleshov-group/bd3lms `configs/config.yaml`, `algo/bd3lm.yaml`, `model/small.yaml`, `models/dit.py`,
  `scripts/train/train_lm1b_bd3lm.sh`), which the paper's appendix states. configs/owt_bd3lm.py passes its data."""
  block_size = BLOCK_SIZES[parse_arg(arg, tuple(BLOCK_SIZES)) or "4"]
  return {
      "model.num_layers": 12, "model.d_model": 768, "model.num_heads": 12,
      "model.mlp_dim": 3072, "model.mlp_activation": NOT_IN_REFERENCE,  # GELU (tanh), no gate
      "model.time_conditioning": False, "model.norm": "layer", "model.dropout": 0.1, "model.attention_dropout": 0.0,
      "model.depth_scaled_init": False, "model.rope_base": 10000.0, "model.dtype": "bfloat16",
      "data.name": data, "data.tokenizer": tokenizer, "data.seq_len": seq_len, "data.random_crops": False,
      "data.ignore_bos": True,  # the first token given clean, out of the likelihood
      "train.batch_size": 512, "train.steps": 1_000_000, "train.learning_rate": 3e-4, "train.warmup_steps": 2500,
      "train.lr_schedule": "cosine", "train.min_lr_ratio": 1.0,  # constant after warm-up: a cosine from 1 to 1
      "train.weight_decay": 0.0, "train.b1": 0.9, "train.b2": 0.999, "train.grad_clip": 1.0,
      "train.ema_decay": 0.9999,
      "process.name": "absorbing", "process.loss": "masked", "process.schedule": "loglinear",
      "process.eps": 0.0,  # mask probability exactly t
      "process.block_size": block_size,
      "process.clip_search": True, "process.clip_low": 1e-3, "process.clip_high": 1.0,  # var_min from [1e-3, 1]
  }
