"""Pallas kernels for the denoiser's hot path, each beside its pure-JAX twin and its naive reference.

  fused_ce      the output head fused with the weighted cross-entropy of the masked ELBO and the AR loss.
  fused_sample  the output head fused with Gumbel-max sampling (the drawn id and its probability).
"""
