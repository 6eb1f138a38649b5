"""DistCA: core attention disaggregation for long-context LLM training."""

__version__ = "0.1.0"
