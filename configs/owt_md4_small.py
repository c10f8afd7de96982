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
with its data section replaced by the OpenWebText one above, and MD4's network options: dropout 0.02, a sigmoid GLU
gate, depth-scaled init.

Hardware and time (an estimate from 6 x parameters x tokens plus attention, not a measurement): ~5.9e20 FLOPs
(170M parameters), about 52 hours on 8 H100s at 40% of their bf16 peak; on a TPU pod, data parallel over every
chip (`mesh.data=-1`).

Deviations from the paper:
  - The held-out 2% is this library's own random draw of chunks (seed 0), not the draw MD4's preparation made.
    Expected effect: none beyond noise.
  - The network is this library's transformer (RMSNorm, rotary positions), sized like MD4-S's. Expected effect:
    small; a different architecture at equal size.

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
  cfg.model.update(dropout=0.02, mlp_activation="sigmoid", depth_scaled_init=True)
  return cfg
