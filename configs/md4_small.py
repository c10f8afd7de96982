"""MD4-S at its published scale: a 12-layer, d=768 masked-diffusion transformer (GPT-2-small sized: 92M
non-embedding parameters with a GLU of width 2048, 142M in all), 1024-token sequences, batch 512, 1M AdamW steps.

Data: the stdlib corpus with a locally trained 32k sentencepiece vocabulary, so the scale runs with nothing to
download; MD4's published OpenWebText figure does not apply to it. configs/owt_md4_small.py is this model on
OpenWebText, the published setup. Optimiser as MD4-S: warm-up 2000, cosine to 0, weight decay 0.03, no clipping.

Mesh: data parallel over every device (-1). The train state (2.3 GB of float32 parameters, Adam moments and EMA)
fits each accelerator, so FSDP buys nothing here. The workdir must be shared by all hosts (NFS, a gcsfuse mount).
    d3pm-train --config=configs/md4_small.py --workdir=/shared/md4_small                (one host)
    launch/tpu_pod.sh NAME ZONE --config=configs/md4_small.py --workdir=/shared/md4_small (a TPU pod)
    sbatch launch/slurm_gpu.sbatch --config=configs/md4_small.py --workdir=/shared/md4_small (GPU nodes)

Compiled for its hardware by the real compilers, train step at the batch above, and fits (the README's table,
tests/test_paper_targets.py):
    d3pm-compile --config=configs/md4_small.py --target=gpu:h100x8
Kernels: model.attention_impl and head_impl 'auto', the target platform's: cuDNN attention and the Triton
head on GPUs, splash and the Mosaic head on TPUs (the XLA ones on a CPU).
"""
from d3pm_jax.config import base_config, parse_arg

HARDWARE = ("gpu:h100x8",)  # d3pm-compile targets the docstring promises (tests/test_paper_targets.py)


def get_config(arg=None):
  parse_arg(arg, ())
  cfg = base_config()
  cfg.process.update(name="absorbing", loss="masked", schedule="linear")
  cfg.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, cond_dim=128, max_len=1024,
                   time_conditioning=True, dtype="bfloat16", scan_layers=True, vocab_pad_multiple=128)
  cfg.model.update(attention_impl="auto", head_impl="auto")  # the platform's kernels
  cfg.data.update(name="stdlib", tokenizer="sentencepiece", spm_vocab_size=32000, seq_len=1024)
  cfg.train.update(steps=1_000_000, batch_size=512, learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.0,
                   weight_decay=0.03, grad_clip=0.0, b2=0.999, ema_decay=0.9999, log_every=100, eval_every=10_000,
                   eval_batches=16, checkpoint_every=5000, keep_checkpoints=3, sample_steps=1000)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return cfg
