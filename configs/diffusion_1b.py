"""A 1.11B-parameter masked-diffusion transformer (18 layers, d=2048, 16 heads, GLU 5632, 32k vocabulary padded to
a multiple of 128) for pods: fully sharded (FSDP) over every device by default, bf16 compute, remat per block, the
blocks scanned over stacked weights (one block's gathered weights and gradients live at a time, and compiling
does not grow with depth).

Its train state is 17.8 GB (float32 parameters, Adam moments and EMA): too much to replicate on a 16 GB
accelerator, 2.2 GB per device over 8 with FSDP. ``python benchmarks/scaling.py`` prints the per-device bytes for
the replicated, FSDP and FSDP + tensor meshes on 8 fake CPU devices.

Data: the stdlib corpus with a 32k sentencepiece vocabulary until the OpenWebText / LM1B pipelines land.
Meshes: ``--config.mesh.fsdp=-1`` (default); FSDP within a host and tensor parallelism for wide layers, e.g. on 8
devices ``--config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2``. Launch:
    launch/tpu_pod.sh NAME ZONE --config=configs/diffusion_1b.py --workdir=/shared/diffusion_1b

Compiled for its hardware by the real compilers, train step at the batch above, and fits (the README's table,
tests/test_paper_targets.py):
    d3pm-compile --config=configs/diffusion_1b.py --target=gpu:h100x8
    d3pm-compile --config=configs/diffusion_1b.py --target=tpu:v5p-16
Kernels: model.attention_impl and head_impl 'auto', the target platform's: cuDNN attention and the Triton
head on GPUs, splash and the Mosaic head on TPUs (the XLA ones on a CPU).
"""
from d3pm_jax.config import base_config, parse_arg

HARDWARE = ("gpu:h100x8", "tpu:v5p-16")  # d3pm-compile targets the docstring promises (tests/test_paper_targets.py)


def get_config(arg=None):
  parse_arg(arg, ())
  cfg = base_config()
  cfg.process.update(name="absorbing", loss="masked", schedule="linear")
  cfg.model.update(num_layers=18, d_model=2048, num_heads=16, mlp_dim=5632, cond_dim=256, max_len=1024,
                   time_conditioning=True, dtype="bfloat16", remat=True, scan_layers=True,
                   vocab_pad_multiple=128)
  cfg.model.update(attention_impl="auto", head_impl="auto")  # the platform's kernels
  cfg.data.update(name="stdlib", tokenizer="sentencepiece", spm_vocab_size=32000, seq_len=1024)
  cfg.train.update(steps=500_000, batch_size=512, learning_rate=2e-4, warmup_steps=5000, min_lr_ratio=0.1,
                   weight_decay=0.1, b2=0.95, ema_decay=0.9999, log_every=100, eval_every=10_000,
                   eval_batches=16, checkpoint_every=2000, keep_checkpoints=3, sample_steps=1000)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  return cfg
