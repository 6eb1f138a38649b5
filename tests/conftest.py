"""Shared fixtures and hypothesis profiles for the DistCA test suite."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# Two cores: keep torch from oversubscribing them (pytest may run beside other processes).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "default", max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("DISTCA_HYPOTHESIS_PROFILE", "default"))
