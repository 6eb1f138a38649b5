"""Llama-style decoder with residual variants. Knows nothing about distribution: core attention is one
injected callable (local kernel or CAD), chosen by the caller."""

from distca.model.core import CoreAttention, DocLayout, LocalCoreAttention
from distca.model.llama import LlamaModel

__all__ = ["CoreAttention", "DocLayout", "LlamaModel", "LocalCoreAttention"]
