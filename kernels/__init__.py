"""Triton kernels and their plain-torch reference twins, on plain tensors only."""
