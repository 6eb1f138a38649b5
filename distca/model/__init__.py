"""Llama-style decoder with residual variants. Knows nothing about distribution: core attention is one
injected callable (local kernel or CAD), chosen by the caller."""

from distca.model.core import CoreAttention, DocLayout, LocalCoreAttention
from distca.model.hf import hf_state_dict_mapping, load_hf_weights, save_hf_weights
from distca.model.llama import LlamaModel

__all__ = ["CoreAttention", "DocLayout", "LlamaModel", "LocalCoreAttention", "hf_state_dict_mapping",
           "load_hf_weights", "save_hf_weights"]
