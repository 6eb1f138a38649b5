"""A training checkpoint to a Hugging Face folder: ``distca export --checkpoint DIR --out HF_DIR``.

A checkpoint is DeepSpeed's pipeline layout, whatever the run's PP × DP: one ``layer_XX-model_states.pt`` per
pipeline layer (:func:`~distca.train.pipe.pipeline_layers`: embedding, blocks, final norm, head; a tied head
has no file of its own), written once per stage by its first data-parallel rank, beside the optimizer
partitions this export does not need. The trainer also writes ``distca_model.json``, the run's
:class:`~distca.config.ModelConfig`, into every tag; an older checkpoint needs the run's YAML (``--config``).

The layer files are read with ``torch.load(weights_only=True)``: plain tensors, no pickled code. The folder is
written atomically (:func:`~distca.model.hf.write_hf_folder`). The weights are the module's (bf16 in a bf16 run,
where the fp32 master copy lives in the optimizer partitions), unless ``dtype`` casts them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from distca.config import ModelConfig, config_from_dict, load_config
from distca.errors import ConfigError
from distca.limits import parse_json, read_json_text

log = logging.getLogger(__name__)

MODEL_FILE = "distca_model.json"
PIPELINE_FILE = "distca_pipeline.json"  # the stages' blocks: the optimizer partitions hold exactly those


def write_model_config(tag_dir: Path, cfg: ModelConfig) -> None:
    """Record the run's model beside a checkpoint's tensors (atomically: a reader never sees half a file)."""
    tmp = tag_dir / f".{MODEL_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    os.replace(tmp, tag_dir / MODEL_FILE)


def run_checkpoint_dir(cfg) -> Path:
    """Where a run (a :class:`~distca.config.DistCAConfig`) keeps its checkpoints: ``train.checkpoint_dir``, else
    ``output_dir/checkpoints``."""
    return Path(cfg.train.checkpoint_dir or Path(cfg.output_dir) / "checkpoints")


def write_pipeline_layout(tag_dir: Path, blocks: tuple[int, ...]) -> None:
    """Record how many blocks each stage held (atomically): a resume must build the same stages."""
    tmp = tag_dir / f".{PIPELINE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"stage_blocks": list(blocks)}) + "\n")
    os.replace(tmp, tag_dir / PIPELINE_FILE)


def check_pipeline_layout(checkpoint: Path, blocks: tuple[int, ...]) -> None:
    """Before a resume from ``checkpoint``'s latest tag: its stages must hold ``blocks`` blocks each, or a clear
    error (each rank's optimizer partition holds its stage's parameters: another split cannot load it). A
    checkpoint from before the layout was recorded is not checked."""
    latest = checkpoint / "latest"
    if not latest.is_file():
        return
    path = checkpoint / latest.read_text().strip() / PIPELINE_FILE
    if not path.is_file():
        return
    saved = parse_json(read_json_text(path, str(path), ConfigError), str(path), ConfigError)
    had = saved.get("stage_blocks") if isinstance(saved, dict) else None
    if had != list(blocks):
        raise ConfigError(f"train.resume: the checkpoint in {path.parent} was written by {len(had or [])} pipeline "
                          f"stages holding {had} blocks; this run's stages hold {list(blocks)} "
                          "(train.pipeline_parallel, train.stage_split, train.stage_blocks must match the run that "
                          "wrote it; `distca export` reads any layout)")


def checkpoint_tag_dir(checkpoint: Path, tag: str | None = None) -> Path:
    """The folder of one checkpoint: ``checkpoint/tag``, ``checkpoint/<latest>``, or ``checkpoint`` itself when it
    holds the layer files."""
    if tag:
        found = checkpoint / tag
    elif (checkpoint / "latest").is_file():
        found = checkpoint / (checkpoint / "latest").read_text().strip()
    else:
        found = checkpoint
    if not any(found.glob("layer_*-model_states.pt")):
        raise FileNotFoundError(f"{found} holds no DeepSpeed pipeline layer files (layer_XX-model_states.pt); "
                                "point --checkpoint at a run's checkpoint folder or one of its step folders")
    return found


def checkpoint_model_config(tag_dir: Path, config: str | Path | None = None) -> ModelConfig:
    """The run's model: ``distca_model.json`` in the tag, else the ``model`` section of ``config`` (the run's YAML)."""
    path = tag_dir / MODEL_FILE
    if path.is_file():
        return config_from_dict({"model": parse_json(read_json_text(path, str(path), ConfigError), str(path),
                                                     ConfigError)}).model
    if config is None:
        raise ConfigError(f"{tag_dir} has no {MODEL_FILE} (a checkpoint from before it was written): pass the run's "
                          "config with --config")
    return load_config(config).model


def checkpoint_parameters(tag_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every :class:`~distca.model.llama.LlamaModel` parameter of the checkpoint, under the model's names, checked
    against the names and shapes ``cfg`` gives."""
    from distca.model.llama import LlamaModel

    with torch.device("meta"):
        want = {n: tuple(p.shape) for n, p in LlamaModel(cfg).named_parameters()}
    prefixes = ["embed", *(f"blocks.{i}" for i in range(cfg.n_layers)), "norm", "head"]  # pipeline_layers' order
    out: dict[str, torch.Tensor] = {}
    for idx, prefix in enumerate(prefixes):
        path = tag_dir / f"layer_{idx:02d}-model_states.pt"
        if not path.is_file():
            if prefix == "head" and cfg.tie_embeddings:
                continue  # the tied head is the embedding's layer
            raise FileNotFoundError(f"checkpoint {tag_dir} lacks {path.name} ({prefix})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, t in state.items():
            out[f"{prefix}.{name}"] = t
    if cfg.tie_embeddings:
        out.pop("head.weight", None)
    extra = sorted(set(out) - set(want))
    missing = sorted(set(want) - set(out) - ({"head.weight"} if cfg.tie_embeddings else set()))
    if extra or missing:
        raise ValueError(f"checkpoint {tag_dir} does not hold the model its config describes: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, t in out.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(f"checkpoint {tag_dir}: {name} has shape {list(t.shape)}, the config says "
                             f"{list(want[name])}")
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, tag: str | None = None,
                      config: str | Path | None = None, dtype: torch.dtype | None = None,
                      max_shard_bytes: int | None = None) -> list[Path]:
    """Write the checkpoint at ``checkpoint`` (its latest tag, or ``tag``) as a Hugging Face folder ``out`` that
    ``transformers`` loads, config included. Returns the files written."""
    from distca.model.hf import write_hf_folder

    tag_dir = checkpoint_tag_dir(Path(checkpoint), tag)
    cfg = checkpoint_model_config(tag_dir, config)
    params = checkpoint_parameters(tag_dir, cfg)
    if dtype is not None:
        params = {n: t.to(dtype) for n, t in params.items()}
    written = write_hf_folder(cfg, params, out, max_shard_bytes)
    log.info("exported %s to %s", tag_dir, out)
    return written
