"""Pallas kernels for the denoiser's hot path, each beside its pure-JAX twin and its naive reference.

  fused_ce      the output head fused with the weighted cross-entropy of the masked ELBO and the AR loss.
  fused_sample  the output head fused with Gumbel-max sampling (the drawn id and its probability).
  attention     flash attention with segment ids (and the kept cuDNN and splash kernels).
  common        what they share: the masked logit, the stated precision of a product, the valid columns.
"""
