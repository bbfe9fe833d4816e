"""Test configuration: hypothesis profiles and the shared registry fixture.

Profiles (choose with HYPOTHESIS_PROFILE): "ci" — modest, derandomized example counts so CI is
fast and reproducible (the default when CI is set); "dev" — the local default; "thorough" — for
a long local run before a release.
"""

import os

import torch

# Without a GPU, Triton kernels run in its interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Two cores on CI: more intra-op threads only add contention for these small tensors.
torch.set_num_threads(min(2, torch.get_num_threads()))
