"""PyTorch -> Flax checkpoint conversion for FLUX.1 (transformer, VAE) and IQA weights."""
