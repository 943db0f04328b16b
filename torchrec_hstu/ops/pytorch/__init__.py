"""PyTorch reference kernels (any device)."""
