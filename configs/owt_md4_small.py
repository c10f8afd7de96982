"""MD4-S on OpenWebText (Shi et al. 2024): masked diffusion with the continuous-time ELBO, target validation
perplexity <= 22.13 (GPT-2 tokens, a random 2% of the 1024-token chunks held out).

Data: MD4's setup: GPT-2's BPE (50,257 tokens), documents joined with EOS and cut into rows of 1024, a random 2% of
the rows (chunks) held out for validation (`--validation=chunks`; MDLM and SEDD hold out the last 100,000
documents instead, d3pm-prepare's default).
    d3pm-prepare --dataset=openwebtext --source=/path/to/openwebtext --tokenizer_path=/path/to/gpt2/tokenizer.json \\
        --validation=chunks --out=$D3PM_DATA/owt_gpt2_chunks
    d3pm-train --config=configs/owt_md4_small.py --workdir=/shared/owt_md4_small
    d3pm-eval --workdir=/shared/owt_md4_small --ema        (MD4 evaluates its EMA weights)
    launch/tpu_pod.sh NAME ZONE --config=configs/owt_md4_small.py --workdir=/shared/owt_md4_small (a TPU pod)
    sbatch launch/slurm_gpu.sbatch --config=configs/owt_md4_small.py --workdir=/shared/owt_md4_small (GPU nodes)
($D3PM_DATA defaults to ./data; or pass --config.data.prepared_dir=DIR.)

Model and budget: configs/md4_small.py's model and optimiser (MD4-S: 12 layers, d=768, 12 heads, GLU of width
2048, adaLN time conditioning, linear schedule; batch 512 x 1024 tokens for 1M steps = 524B token positions; AdamW
3e-4 with 2000 warm-up steps and cosine decay to 0, b2 0.999, weight decay 0.03, no gradient clipping, EMA 0.9999)
with its data section replaced by the OpenWebText one above, and MD4's network options: dropout 0.02, a sigmoid
GLU gate, depth-scaled init, LayerNorm, a time embedding 64 wide.

Hardware and time (an estimate from 6 x parameters x tokens plus attention, not a measurement): ~5.9e20 FLOPs
(170M parameters), about 52 hours on 8 H100s at 40% of their bf16 peak; on a TPU pod, data parallel over every
chip (`mesh.data=-1`).

Paper and released code: MD4's OpenWebText config releases dropout 0 and weight decay 0; its `sweep()` for the
"Small size" model sets dropout 0.02 and weight decay 0.03, which this config follows (the paper's MD4-S run).
MD4's attention dropout is its dropout rate.

Deviations from the paper:
  - The held-out 2% is this library's own random draw of chunks (seed 0), not the draw MD4's preparation made.
    Expected effect: none beyond noise.
  - The network is this library's transformer, sized like MD4-S's: the same GLU, LayerNorm under adaLN and rotary
    positions; its time embedding's hidden layer is 64 wide (MD4's: 256), and depth-scaled init scales the
    residual projections (MD4's: the MLP's three matrices). Expected effect: small; a different architecture at
    equal size.
  - `model.dtype`: bf16 compute with float32 parameters; MD4 trains in float32. Expected effect: none beyond
    noise.
  - `model.attention_dropout`: 0, where MD4 drops attention probabilities at 0.02 too: only the XLA attention
    has dropout, and this config's fit on its hardware (the README's compile table) is with the fused attention
    kernels (cuDNN, splash), which keep no [B, H, L, L] scores. Expected effect: slightly less regularisation;
    small at 0.02 (MD4's released default has no dropout at all).

Compiled for its hardware by the real compilers, train step at the batch above, and fits (the README's table,
tests/test_paper_targets.py):
    d3pm-compile --config=configs/owt_md4_small.py --target=gpu:h100x8
    d3pm-compile --config=configs/owt_md4_small.py --target=tpu:v5e-256
Kernels (inherited): model.attention_impl and head_impl 'auto', the target platform's: cuDNN attention and the
Triton head on GPUs, splash and the Mosaic head on TPUs (the XLA ones on a CPU).
"""
from d3pm_jax.config import parse_arg, prepared_path, sibling_config

HARDWARE = ("gpu:h100x8", "tpu:v5e-256")  # d3pm-compile targets the docstring promises (tests/test_paper_targets.py)


def get_config(arg=None):
  parse_arg(arg, ())
  cfg = sibling_config(__file__, "md4_small").get_config()
  cfg.data.update(name="openwebtext", tokenizer="gpt2", seq_len=1024, tokenizer_path="",
                  prepared_dir=prepared_path("owt_gpt2_chunks"))
  cfg.model.update(dropout=0.02, mlp_activation="sigmoid", depth_scaled_init=True, norm="layer", cond_dim=64)
  return cfg


def reference(arg=None, **data) -> dict:
  """The reference's value of every field this config's run reads (tests/test_paper_configs.py): MD4's released
  code (google-deepmind/md4 `configs/md4/openwebtext.py` and `text8.py`, `md4/networks/transformer.py`,
  `md4/train.py`), with the "Small size" values of its configs' ``sweep()`` where they differ from the released
  defaults (dropout, weight decay, and text8's learning rate), as the paper's runs used them."""
  parse_arg(arg, ())
  return {
      "model.num_layers": 12, "model.d_model": 768, "model.num_heads": 12,
      "model.mlp_dim": 2048, "model.mlp_activation": "sigmoid",  # a GLU with a sigmoid gate
      "model.cond_dim": 64, "model.time_conditioning": True,
      "model.norm": "layer",  # under adaLN: a LayerNorm without scale or bias
      "model.depth_scaled_init": True, "model.rope_base": 10000.0, "model.dtype": "float32",
      "train.batch_size": 512, "train.steps": 1_000_000, "train.warmup_steps": 2000, "train.lr_schedule": "cosine",
      "train.min_lr_ratio": 0.0, "train.weight_decay": 0.03, "train.b1": 0.9, "train.b2": 0.999,
      "train.grad_clip": 0.0, "train.ema_decay": 0.9999,
      "process.name": "absorbing", "process.loss": "masked", "process.schedule": "linear", "process.eps": 1e-4,
      "process.clip_low": 0.0, "process.clip_high": 1.0, "process.clip_search": False, "process.block_size": 0,
      **(data or OWT_DATA),
  }


OWT_DATA = {"model.dropout": 0.02, "model.attention_dropout": 0.02, "train.learning_rate": 3e-4,
            "data.name": "openwebtext", "data.tokenizer": "gpt2", "data.seq_len": 1024, "data.random_crops": False}
