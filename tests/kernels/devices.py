"""Where the kernel tests run: real Triton on CUDA, Triton's interpreter on CPU tensors elsewhere."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
# the interpreter computes bf16 tl.dot wrongly (triton issue 11584): bf16 runs on the GPU only
LINEAR_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
