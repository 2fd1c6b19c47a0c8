"""Test configuration: Triton's interpreter on CPU-only machines, and hypothesis profiles."""
import os

import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated, so set it before any kernel module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Interpreted kernels run their default configuration; tuning is a GPU-only activity.
os.environ.setdefault("AOFUNC_AUTOTUNE", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
