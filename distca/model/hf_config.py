"""Hugging Face ``config.json`` to and from a :class:`ModelConfig`, for the Llama family: ``llama``, ``mistral``
and ``qwen2``, in both layouts ``transformers`` writes.

- **4.x layout**: ``rope_theta`` at the top and ``rope_scaling`` (``{"rope_type"|"type": ..., "factor": ...}``).
- **5.x layout**: ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ..., ...}``), no top-level θ.

Read as ``transformers`` 5 reads them: ``rope_scaling`` wins over ``rope_parameters`` when both are present;
θ comes from the rope dict, else the top level, else 10000; a field a config leaves out takes that model
type's ``transformers`` default (``rms_norm_eps`` is 1e-6, Mistral's ``sliding_window`` 4096, ...).

Every field that changes the math is either implemented or refused: with ``strict`` a refusal is a
:class:`ValueError` naming the field and its value; with ``strict=False`` it is a warning that says what the
loaded model computes instead. Fields that do not change the math (token ids, ``use_cache``,
``initializer_range``, ``pretraining_tp``, ``torch_dtype``, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from distca.config import ModelConfig, RopeScaling
from distca.limits import parse_json, read_json_text

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ACTIVATIONS = ("silu", "swish")  # the same function under two names

# transformers 5.24's defaults for the fields we read, per model type, which a config.json may leave out. The
# sizes (layers, widths, heads, vocabulary) have defaults there too, but a folder without them is refused:
# weights shaped for another size would be the only hint.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    "mistral": dict(num_key_value_heads=8, rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
}
_COMMON = dict(hidden_act="silu", tie_word_embeddings=False, attention_dropout=0.0, head_dim=None,
               partial_rotary_factor=None, rope_theta=None, rope_scaling=None, rope_parameters=None, layer_types=None)


class _Reader:
    """One config.json being read: its fields with the model type's defaults, and what it refuses."""

    def __init__(self, raw: dict, where: str, strict: bool):
        if not isinstance(raw, dict):
            raise ValueError(f"{where} is not a JSON object")
        self.raw, self.where, self.strict = raw, where, strict
        kind = raw.get("model_type")
        if kind is None:
            log.warning("%s has no model_type; reading it as 'llama'", where)
            kind = "llama"
        if kind not in MODEL_TYPES:
            raise ValueError(f"{where}: model_type {kind!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
        self.kind = kind
        self.defaults = {**_COMMON, **_DEFAULTS[kind]}

    def get(self, key: str) -> Any:
        return self.raw[key] if key in self.raw else self.defaults.get(key)

    def require(self, key: str, tp: type) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.where} lacks {key!r}")
        if isinstance(value, bool) or not isinstance(value, tp | int if tp is float else tp):
            raise ValueError(f"{self.where}: {key} must be {tp.__name__}, got {value!r}")
        return tp(value)

    def refuse(self, what: str, instead: str) -> None:
        """A field that changes the math and is not implemented: an error with ``strict``, else a warning."""
        msg = f"{self.where}: {what} is not supported"
        if self.strict:
            raise ValueError(f"{msg} (strict loading refuses it)")
        log.warning("%s; the loaded model computes %s instead, so its outputs differ from the checkpoint's", msg,
                    instead)


def _rope(r: _Reader) -> tuple[float, RopeScaling]:
    """θ and the scaling, from either layout."""
    params = r.get("rope_scaling") or r.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{r.where}: rope_scaling/rope_parameters must be an object, got {params!r}")
    layer_types = r.get("layer_types") or ()
    if any(k in layer_types for k in params):
        r.refuse(f"per-layer-type rope parameters ({sorted(params)})", "the first entry's rope for every layer")
        params = next(iter(params.values())) or {}
    theta = params.get("rope_theta", r.get("rope_theta"))
    theta = 10000.0 if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta) or theta <= 1:
        raise ValueError(f"{r.where}: rope_theta must be a finite number > 1, got {theta!r}")
    partial = params.get("partial_rotary_factor", r.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        r.refuse(f"partial_rotary_factor {partial!r}", "RoPE over the whole head")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        r.refuse(f"rope type {kind!r} (implemented: {', '.join(ROPE_TYPES)})", "unscaled RoPE")
        return float(theta), RopeScaling()
    if kind == "default":
        return float(theta), RopeScaling()

    def num(key: str, default: Any = None) -> Any:
        v = params.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{r.where}: rope {key} must be a number, got {v!r}")
        return v

    fields: dict[str, Any] = {"type": kind}
    factor = num("factor")
    orig = params.get("original_max_position_embeddings", r.get("original_max_position_embeddings"))
    orig = r.get("max_position_embeddings") if orig is None else orig
    if kind in ("llama3", "yarn"):
        fields["original_max_position"] = int(orig)
    if kind == "yarn" and factor is None:  # DeepSeek-style: the ratio of the context lengths
        factor = r.get("max_position_embeddings") / orig
    if factor is None:
        raise ValueError(f"{r.where}: rope type {kind!r} needs a 'factor'")
    fields["factor"] = float(factor)
    if kind == "llama3":
        for ours, theirs in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor")):
            v = num(theirs)
            if v is None:
                raise ValueError(f"{r.where}: rope type 'llama3' needs {theirs!r}")
            fields[ours] = float(v)
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            v = num(key)
            if v:  # transformers treats 0/None alike here
                fields[key] = float(v)
        fields["truncate"] = bool(params.get("truncate", True))
    try:
        return float(theta), RopeScaling(**fields)
    except Exception as exc:
        raise ValueError(f"{r.where}: rope parameters {params}: {exc}") from None


def _windows(r: _Reader, n_layers: int) -> list[int]:
    """Per-layer windows: Mistral's ``sliding_window`` on every layer; Qwen2's sliding layers (``layer_types``)."""
    if r.kind == "mistral":
        if "layer_types" in r.raw:
            r.refuse(f"a Mistral layer_types list {r.raw['layer_types']!r}", "sliding_window on every layer")
        w = r.get("sliding_window")
        return [] if w is None else [_window(r, w)] * n_layers
    kinds = r.get("layer_types")
    if r.kind == "qwen2" and kinds is None:
        w = r.get("sliding_window") if r.get("use_sliding_window") else None
        kinds = ["sliding_attention" if w is not None and i >= r.get("max_window_layers") else "full_attention"
                 for i in range(n_layers)]
    if kinds is None:
        return []
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        raise ValueError(f"{r.where}: layer_types must list {n_layers} layer types, got {kinds!r}")
    unknown = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if unknown:
        r.refuse(f"layer type {unknown[0]!r}", "full attention in those layers")
    if "sliding_attention" not in kinds:
        return []
    w = r.get("sliding_window")
    if w is None:
        raise ValueError(f"{r.where}: layer_types has sliding_attention layers but sliding_window is null")
    w = _window(r, w)
    return [w if k == "sliding_attention" else -1 for k in kinds]


def _window(r: _Reader, w: Any) -> int:
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"{r.where}: sliding_window must be an integer >= 1 or null, got {w!r}")
    return w


def model_config_from_hf(raw: dict, where: str = "config.json", strict: bool = True) -> dict[str, Any]:
    """The :class:`ModelConfig` fields a Hugging Face ``config.json`` (parsed) describes (see the module docstring)."""
    r = _Reader(raw, where, strict)
    n_layers = r.require("num_hidden_layers", int)
    hidden, heads = r.require("hidden_size", int), r.require("num_attention_heads", int)
    kv = r.get("num_key_value_heads")
    kv = heads if kv is None else kv
    if isinstance(kv, bool) or not isinstance(kv, int):
        raise ValueError(f"{where}: num_key_value_heads must be int, got {kv!r}")
    head_dim = r.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"{where}: head_dim must be a positive integer or null, got {head_dim!r}")
    explicit = head_dim if head_dim is not None and head_dim * heads != hidden else 0
    theta, scaling = _rope(r)

    act = r.get("hidden_act")
    if act not in _ACTIVATIONS:
        r.refuse(f"hidden_act {act!r}", "SiLU (SwiGLU)")
    dropout = r.get("attention_dropout")
    if dropout not in (0, 0.0, None):
        r.refuse(f"attention_dropout {dropout!r}", "attention without dropout")
    if r.kind == "qwen2":  # Qwen2's q/k/v projections always carry biases, its output projection none
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(r.get("attention_bias") or False)
        mlp_bias = bool(r.get("mlp_bias") or False)
    eps = r.require("rms_norm_eps", float)
    return dict(n_layers=n_layers, hidden=hidden, n_heads=heads, n_kv_heads=kv,
                ffn_hidden=r.require("intermediate_size", int), vocab_size=r.require("vocab_size", int),
                rope_theta=theta, rope_scaling=scaling, norm_eps=eps,
                tie_embeddings=bool(r.get("tie_word_embeddings")), attention_head_dim=explicit,
                qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, layer_windows=_windows(r, n_layers))


def read_hf_config(folder: str | Path, strict: bool = True, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a local Hugging Face folder's ``config.json`` (:func:`model_config_from_hf`),
    with ``overrides`` replacing fields of the result."""
    path = Path(folder) / "config.json"
    raw = parse_json(read_json_text(path, str(path), ValueError), str(path), ValueError)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    return ModelConfig(**{**model_config_from_hf(raw, str(path), strict), **overrides})


def hf_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face model type that computes what ``cfg`` does, or a :class:`ValueError` saying why none does."""
    if cfg.residual != "standard":
        raise ValueError(f"a {cfg.residual!r} model is not a Hugging Face Llama (only residual 'standard' is); "
                         "its extra parameters or windows have no place in the checkpoint")
    if cfg.layer_masks:
        raise ValueError(f"model.layer_masks {list(cfg.layer_masks)}: the Llama, Mistral and Qwen2 configs have no "
                         "per-layer mask pattern (windows alone are model.layer_windows, which Mistral and Qwen2 "
                         "express)")
    windows = set(cfg.layer_windows) - {-1}
    if cfg.qkv_bias and not cfg.o_bias:
        if cfg.mlp_bias:
            raise ValueError("q/k/v biases without an output bias (Qwen2) but with MLP biases: no Hugging Face "
                             "model type has that")
        return "qwen2"
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("an output-projection bias without q/k/v biases: no Hugging Face model type has that")
    if windows:
        if len(windows) > 1 or -1 in cfg.layer_windows or cfg.qkv_bias or cfg.mlp_bias:
            raise ValueError(f"layer windows {cfg.layer_windows} with biases {cfg.qkv_bias, cfg.mlp_bias}: only "
                             "Mistral (one window on every layer, no biases) or Qwen2 (q/k/v biases) express "
                             "windows")
        return "mistral"
    return "llama"


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of ``cfg`` in the 5.x layout (``rope_parameters``), with the same rope also in the 4.x
    fields (``rope_theta``, and ``rope_scaling`` when scaled), so that :func:`model_config_from_hf` and both
    ``transformers`` 4.x and 5.x read it back to the same model."""
    kind = hf_model_type(cfg)
    s = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": s.type, "rope_theta": cfg.rope_theta}
    if s.type != "default":
        rope["factor"] = s.factor
    if s.type == "llama3":
        rope |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                 "original_max_position_embeddings": s.original_max_position}
    if s.type == "yarn":
        rope |= {"original_max_position_embeddings": s.original_max_position, "beta_fast": s.beta_fast,
                 "beta_slow": s.beta_slow, "truncate": s.truncate}
        rope |= {k: getattr(s, k) for k in ("attention_factor", "mscale", "mscale_all_dim") if getattr(s, k)}
    # informational for these rope types (the factor is explicit), but transformers checks it against the factor
    max_pos = round(s.original_max_position * s.factor) if s.type in ("llama3", "yarn") else 2048
    out: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[kind]],
        "model_type": kind,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": max_pos,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,  # 4.x layout: without it, transformers 4 would use theta = 10000
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if s.type != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if kind == "llama":
        out |= {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
    if kind == "mistral":
        out["sliding_window"] = cfg.layer_windows[0]
    if kind == "qwen2":
        windows = cfg.layer_windows or [-1] * cfg.n_layers
        sliding = sorted(set(windows) - {-1})
        out |= {"use_sliding_window": bool(sliding), "sliding_window": sliding[0] if sliding else None,
                "layer_types": ["full_attention" if w == -1 else "sliding_attention" for w in windows]}
        if len(sliding) > 1:
            raise ValueError(f"Qwen2 has one sliding window, the model has several: {sliding}")
    return out


def config_differences(theirs: ModelConfig, ours: ModelConfig) -> list[str]:
    """Each field (but the residual variant's own) in which two model configs differ, as ``"field: a vs b"``."""
    skip = {"residual", "shortswa_window", "shortswa_every", "ddl_beta_init"}
    out = []
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(theirs, f.name), getattr(ours, f.name)
        if f.name in skip or a == b:
            continue
        if dataclasses.is_dataclass(a):
            out += [f"{f.name}.{g.name}: checkpoint {getattr(a, g.name)!r}, model {getattr(b, g.name)!r}"
                    for g in dataclasses.fields(a) if getattr(a, g.name) != getattr(b, g.name)]
        else:
            out.append(f"{f.name}: checkpoint {a!r}, model {b!r}")
    return out


# The fields a run's YAML keeps when its model comes from a checkpoint folder: the residual variant's own.
_VARIANT_FIELDS = ("residual", "shortswa_window", "shortswa_every", "ddl_beta_init")


def with_checkpoint_model(cfg):
    """``cfg`` (a :class:`~distca.config.DistCAConfig`) with its ``model`` read from ``train.init_from_hf`` when
    that is set: the folder decides the model (shape, rope, biases, windows); the YAML keeps only the residual
    variant's fields. A field the YAML set otherwise is named in one warning. Every launcher calls this before
    it starts servers or ranks, so servers, planner and trainers see the folder's model; the trainer's strict
    load checks the folder against it again."""
    folder = cfg.train.init_from_hf
    if not folder:
        return cfg
    from distca.errors import ConfigError

    try:
        theirs = read_hf_config(folder, **{k: getattr(cfg.model, k) for k in _VARIANT_FIELDS})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.init_from_hf: {exc}") from exc
    diff = config_differences(theirs, cfg.model)
    if diff:
        log.warning("train.init_from_hf %s sets the model: %s", folder, "; ".join(
            d.replace("checkpoint", "folder").replace("model ", "config ") for d in diff))
    return dataclasses.replace(cfg, model=theirs)
