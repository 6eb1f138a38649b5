"""The training data source named by ``cfg.data`` (see :class:`distca.config.DataConfig`)."""

from __future__ import annotations

from distca.config import DistCAConfig
from distca.data import DataError, DocumentSource, LengthDistribution, open_source
from distca.errors import ConfigError


def make_source(cfg: DistCAConfig) -> DocumentSource:
    """Open ``cfg.data.source`` with its settings (synthetic tokens span ``model.vocab_size``); a file that
    cannot be opened is a :class:`ConfigError` naming the config keys that point at it."""
    d = cfg.data
    if d.source == "embedded":
        return open_source("embedded")
    try:
        if d.source == "tokens":
            return open_source("tokens", path_prefix=d.path)
        if d.source == "text":
            return open_source("text", path=d.path, tokenizer_json=d.tokenizer, text_key=d.text_key)
    except (DataError, OSError) as exc:
        keys = "data.path" + (" / data.tokenizer" if d.source == "text" else "")
        raise ConfigError(f"data.source {d.source}: cannot open {keys} = {d.path!r}: {exc}") from exc
    dist = LengthDistribution(d.distribution, upsample_long=d.upsample_long, elongate=d.elongate)
    return open_source("synthetic", distribution=dist, n_docs=d.n_docs, vocab_size=cfg.model.vocab_size,
                       seed=cfg.seed, max_len=d.max_len or None)
