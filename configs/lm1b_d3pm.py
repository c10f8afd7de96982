"""D3PM on LM1B (Austin et al. 2021, Table 2, T = 1000, hybrid loss lambda = 0.01), one config per process:

    configs/lm1b_d3pm.py:absorbing          target: test perplexity <= 76.9
    configs/lm1b_d3pm.py:uniform            target: test perplexity <= 137.9
    configs/lm1b_d3pm.py:nearest_neighbor   target: test perplexity <= 149.5

Data: D3PM's setup: a cased sentencepiece model with 8192 pieces trained on LM1B's training split, sentences packed
into rows of 128 tokens, each with its own segment id (attention and the loss never cross a sentence); the
figure is on LM1B's held-out set (tfds's `test`, our `validation`).
    d3pm-prepare --dataset=lm1b --setup=d3pm --manual_dir=/path/to/lm1b --out=$D3PM_DATA/lm1b_d3pm
    d3pm-train --config=configs/lm1b_d3pm.py:absorbing --workdir=/shared/lm1b_d3pm_absorbing
    d3pm-eval --workdir=/shared/lm1b_d3pm_absorbing --exact_windows=-1     (the exact T-step bound, every window)
($D3PM_DATA defaults to ./data; or pass --config.data.prepared_dir=DIR.)

Model and budget: a 12-layer, d=768, 12-head transformer (D3PM's reference `lm1b_base`: `gpt_base`), T = 1000,
batch 128 x 128 tokens, 1M steps (16.8B token positions), learning rate 2e-4 after 5000 linear warm-up steps
then constant, gradient clipping at 0.25, no weight decay. Schedules: absorbing uses 1/(T - t + 1) (`jsd`),
uniform and nearest-neighbour the cosine schedule (`cosine_betas`).

Hardware and time (an estimate from 6 x parameters x tokens, not a measurement): ~1.1e19 FLOPs, about 7.5 hours
on one H100 at 40% of its bf16 peak, or 1 hour on an 8-GPU node (data parallel, `mesh.data=-1`).

Deviations from the paper:
  - The network is this library's transformer (pre-norm RMSNorm, rotary positions, GLU MLP of width 2048, adaLN
    time conditioning), not D3PM's T5-style encoder; it has the same depth, width and heads (92M parameters without
    the embeddings, 105M in all).
  - The loss ignores padding (only the last packed row has any); D3PM's reference code counts it.
  - Training is in bf16 with float32 parameters; D3PM trained in float32.
  - nearest_neighbor needs the token embeddings that define the neighbours, which D3PM built from word
    embeddings and this library does not ship: pass --config.process.nn_embeddings=emb.npy (a [8192, D] table
    for the prepared tokenizer). The batch size (128) and uniform's and NN's schedules follow our reading of
    D3PM's Appendix B and were not checked against the reference code's launch flags, which are not public.
"""
from d3pm_jax.config import base_config, parse_arg, prepared_path

SCHEDULES = {"absorbing": "jsd", "uniform": "cosine_betas", "nearest_neighbor": "cosine_betas"}


def get_config(arg=None):
  process = parse_arg(arg, tuple(SCHEDULES)) or "absorbing"
  cfg = base_config()
  cfg.process.update(name=process, loss="d3pm", schedule=SCHEDULES[process], num_steps=1000, hybrid_lambda=0.01)
  cfg.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, cond_dim=128, max_len=128,
                   time_conditioning=True, dtype="bfloat16", vocab_pad_multiple=128)
  cfg.data.update(name="lm1b", tokenizer="sentencepiece", seq_len=128, prepared_dir=prepared_path("lm1b_d3pm"))
  cfg.train.update(steps=1_000_000, batch_size=128, learning_rate=2e-4, warmup_steps=5000, min_lr_ratio=1.0,
                   weight_decay=0.0, b2=0.999, grad_clip=0.25, ema_decay=0.9999, log_every=100,
                   eval_every=10_000, eval_batches=64, checkpoint_every=5000, keep_checkpoints=3, sample_steps=1000)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return cfg
