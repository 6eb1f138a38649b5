"""Registry of core-attention backends; ``auto`` picks the fastest one that can run the inputs."""

from __future__ import annotations

import functools

import torch

from distca.attention.backends.base import Backend, VarlenMeta
from distca.errors import BackendUnavailableError

BACKEND_NAMES = ("reference", "sdpa", "flash", "torch_varlen")
# Fastest first; reference is always last and always available.
AUTO_ORDER = ("flash", "torch_varlen", "sdpa", "reference")


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend object called ``name`` (constructed once; backends hold no per-call state)."""
    if name == "reference":
        from distca.attention.backends.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "sdpa":
        from distca.attention.backends.sdpa import SdpaBackend

        return SdpaBackend()
    if name == "flash":
        from distca.attention.backends.flash import FlashBackend

        return FlashBackend()
    if name == "torch_varlen":
        from distca.attention.backends.torch_varlen import TorchVarlenBackend

        return TorchVarlenBackend()
    raise BackendUnavailableError(f"unknown attention backend {name!r}; expected one of {BACKEND_NAMES} or 'auto'")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """Backend ``name`` (or the fastest usable for ``auto``), checked against device and dtype."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = get_backend(candidate)
            if backend.unavailable_reason(device, dtype) is None:
                return backend
    backend = get_backend(name)
    reason = backend.unavailable_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {name!r} cannot run here: {reason}")
    return backend


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run on ``device`` with ``dtype``."""
    device = torch.device(device)
    return [n for n in BACKEND_NAMES if get_backend(n).unavailable_reason(device, dtype) is None]


__all__ = [
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "Backend",
    "VarlenMeta",
    "available_backends",
    "get_backend",
    "get_backend_reason",
    "resolve_backend",
]


def get_backend_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with ``dtype`` (None when it can)."""
    return get_backend(name).unavailable_reason(device, dtype)
