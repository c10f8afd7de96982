"""Layer 2, the networks: the transformer denoiser, bidirectional or causal, with its logical axis names.
May import the math layer's helpers and ``pallas_kernels``; nothing about data, devices, training or commands."""
