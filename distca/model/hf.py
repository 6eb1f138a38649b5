"""Hugging Face Llama weights to and from a :class:`LlamaModel`, through local safetensors folders.

The folder layout is Hugging Face's: ``model.safetensors``, or ``model.safetensors.index.json`` plus the
shards it names, beside a ``config.json``. Nothing is downloaded.

Parameter names map one to one (:func:`hf_state_dict_mapping`). No q/k permutation is needed: our RoPE
rotates halves (``[x1, x2] -> [-x2, x1]``), the layout of Hugging Face's Llama checkpoints (not the
interleaved pairs of Meta's original ones).

Residual variants: only ``residual: standard`` *is* a Hugging Face Llama. For ``shortswa`` and ``ddl``
a standard checkpoint fills the parameters the variant shares with Llama (embeddings, the full-attention
projections, MLP, norms, head); the variant's own parameters (the ShortSWA sublayer's ``swa``/``swa_norm``,
the DDL ``attn_delta``/``mlp_delta``) are not in the checkpoint and keep their initialisation, so the
loaded model does not compute what the checkpoint did until it is trained. The interleaved ShortSWA form
(``shortswa_every > 1``) has no extra parameters but windows some layers' attention, so it differs too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distca.config import ModelConfig
from distca.limits import parse_json, read_json_text
from distca.model.hf_config import config_differences, hf_config, hf_model_type
from distca.model.llama import LlamaModel

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Old checkpoints saved RoPE's buffer; it is derived from the config, never a weight (HF skips it too).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LAYER = {
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.o.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}
_BIASES = {  # a config flag -> the bias tensors it adds to each layer
    "qkv_bias": {"self_attn.q_proj.bias": "attn.q.bias", "self_attn.k_proj.bias": "attn.k.bias",
                 "self_attn.v_proj.bias": "attn.v.bias"},
    "o_bias": {"self_attn.o_proj.bias": "attn.o.bias"},
    "mlp_bias": {"mlp.gate_proj.bias": "mlp.gate.bias", "mlp.up_proj.bias": "mlp.up.bias",
                 "mlp.down_proj.bias": "mlp.down.bias"},
}


def hf_state_dict_mapping(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face parameter name -> our :class:`LlamaModel` parameter name, in checkpoint order (Llama,
    Mistral and Qwen2 share the names; biases appear as ``cfg`` has them).

    ``lm_head.weight`` is absent when embeddings are tied (our head shares ``embed.weight``). For the
    residual variants the map covers only the parameters they share with Llama (see the module docstring).
    """
    layer = dict(_LAYER)
    for flag, names in _BIASES.items():
        if getattr(cfg, flag):
            layer |= names
    mapping = {"model.embed_tokens.weight": "embed.weight"}
    for i in range(cfg.n_layers):
        for hf, ours in layer.items():
            mapping[f"model.layers.{i}.{hf}"] = f"blocks.{i}.{ours}"
    mapping["model.norm.weight"] = "norm.weight"
    if not cfg.tie_embeddings:
        mapping["lm_head.weight"] = "head.weight"
    return mapping


def _checkpoint(folder: Path) -> tuple[dict[str, Path], Path]:
    """Each tensor name -> the file holding it, and the file that names the checkpoint (for messages)."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file() and index.is_file():
        raise ValueError(f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE}; remove the stale one")
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single), single
    if not index.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    try:
        weight_map = parse_json(read_json_text(index, str(index), ValueError), str(index), ValueError)["weight_map"]
        where = {str(name): folder / str(shard) for name, shard in weight_map.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{index} is not a safetensors index (it needs a 'weight_map' object)") from None
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, path in where.items():
        by_file[path].append(name)
    for path, names in by_file.items():
        if path.parent != folder or not path.is_file():
            raise ValueError(f"{index} puts {names[0]!r} in shard {path.name!r}, which is not a file in {folder}")
        with safe_open(path, framework="pt") as f:
            held = set(f.keys())
        lost = [n for n in names if n not in held]
        if lost:
            raise ValueError(f"{index} puts {lost[0]!r} in {path}, which does not hold it")
    return where, index


def _same_tensor(a: tuple[Path, str], b: tuple[Path, str], rows: int = 4096) -> bool:
    """Whether two stored tensors are equal, compared a block of rows at a time (never whole in memory)."""
    with safe_open(a[0], framework="pt") as fa, safe_open(b[0], framework="pt") as fb:
        sa, sb = fa.get_slice(a[1]), fb.get_slice(b[1])
        if sa.get_shape() != sb.get_shape() or sa.get_dtype() != sb.get_dtype():
            return False
        n = sa.get_shape()[0]
        return all(torch.equal(sa[i:i + rows], sb[i:i + rows]) for i in range(0, n, rows))


def _check_config(folder: Path, cfg: ModelConfig, strict: bool) -> None:
    """Compare the folder's ``config.json`` (if any) with the model's config, every field that changes the math
    (:func:`~distca.model.hf_config.config_differences`); tensor shapes cannot see every difference
    (``n_heads`` at equal width, θ, rope scaling, ε, windows). A field the model does not implement is refused
    by :meth:`LlamaModel.config_from_hf` itself."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return
    theirs = LlamaModel.config_from_hf(folder, strict=strict)
    # tying is judged by the tensors present, whose messages say more
    diff = config_differences(dataclasses.replace(theirs, tie_embeddings=cfg.tie_embeddings), cfg)
    if diff:
        msg = f"{path} describes another model ({'; '.join(diff)})"
        if strict:
            raise ValueError(msg)
        log.warning(msg)


def _model_names(cfg: ModelConfig) -> list[str]:
    """Every parameter name of the :class:`LlamaModel` that ``cfg`` describes (built on the meta device)."""
    with torch.device("meta"):
        return [n for n, _ in LlamaModel(cfg).named_parameters()]


def load_hf_weights(cfg: ModelConfig, params: Mapping[str, torch.nn.Parameter], folder: str | Path,
                    strict: bool = True) -> list[str]:
    """Load a local Hugging Face Llama safetensors checkpoint into ``params``: parameters of the
    :class:`LlamaModel` that ``cfg`` describes, keyed by its names — a whole model's
    (``dict(model.named_parameters())``) or a part's (one pipeline stage's). Returns the names in ``params``
    left at their initialisation (a variant's extra parameters; with ``strict=False`` also those the
    checkpoint lacks).

    Everything is checked before any parameter changes, against the whole model whichever part ``params``
    holds, so every pipeline stage judges a checkpoint alike: names (with ``strict``, a tensor the model
    wants but the checkpoint lacks, or one the model has no place for, is a :class:`ValueError` naming it
    and its file), shapes (a mismatch is always an error), and the folder's ``config.json`` if present (a
    different ``n_heads``/``rope_theta``/... is an error with ``strict``, else a warning). Tensors are then
    read one at a time with ``safe_open`` and copied into the parameters, converted to each parameter's
    dtype and device, so the checkpoint is never held in memory beside the model. A tied model accepts an
    ``lm_head.weight`` equal to the embeddings; ``rotary_emb.inv_freq`` buffers are skipped.
    """
    folder = Path(folder)
    mapping = hf_state_dict_mapping(cfg)
    unknown = sorted(set(params) - set(_model_names(cfg)))
    if unknown:
        raise ValueError(f"parameters {unknown[:5]} are not parameter names of the configured LlamaModel")
    where, source = _checkpoint(folder)
    _check_config(folder, cfg, strict)

    unexpected = [n for n in where if n not in mapping and not _IGNORED.fullmatch(n)]
    if cfg.tie_embeddings and "lm_head.weight" in unexpected and "model.embed_tokens.weight" in where and \
            _same_tensor((where["lm_head.weight"], "lm_head.weight"),
                         (where["model.embed_tokens.weight"], "model.embed_tokens.weight")):
        unexpected.remove("lm_head.weight")  # a tied checkpoint saved with its (shared) head
    missing = [n for n in mapping if n not in where]
    if unexpected:
        name = unexpected[0]
        hint = " (the model ties embeddings but this head differs from them)" if name == "lm_head.weight" else ""
        msg = (f"tensor {name!r} in {where[name]} has no place in the model{hint}"
               + (f"; {len(unexpected) - 1} more: {unexpected[1:6]}" if len(unexpected) > 1 else ""))
        if strict:
            raise ValueError(msg)
        log.warning("ignoring checkpoint tensors: %s", msg)
    if missing:
        name = missing[0]
        hint = " (the checkpoint's embeddings look tied: set model.tie_embeddings)" if name == "lm_head.weight" else ""
        msg = (f"checkpoint {source} lacks tensor {name!r} for {mapping[name]}{hint}"
               + (f"; {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else ""))
        if strict:
            raise ValueError(msg)
        log.warning("%s; those parameters keep their initialisation", msg)

    wanted = {hf: ours for hf, ours in mapping.items() if ours in params and hf in where}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in wanted:
        by_file[where[name]].append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                shape, want = tuple(f.get_slice(name).get_shape()), tuple(params[wanted[name]].shape)
                if shape != want:
                    raise ValueError(f"tensor {name!r} in {path} has shape {list(shape)}, but {wanted[name]} "
                                     f"is {list(want)}")

    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    params[wanted[name]].copy_(f.get_tensor(name))

    loaded = set(wanted.values())
    left = [n for n in params if n not in loaded]
    extras = [n for n in left if n not in mapping.values()]
    if extras:
        log.info("%d parameters of the %s model are not in checkpoint %s and keep their initialisation: %s",
                 len(extras), cfg.residual, source, extras)
    log.info("loaded %d tensors from %s", len(loaded), source)
    return left


def save_hf_weights(model: LlamaModel, folder: str | Path, max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``model`` as a Hugging Face checkpoint folder (:func:`write_hf_folder`): ``config.json`` (Llama,
    Mistral or Qwen2, as the config requires) and the weights in the model's dtype. Returns the files written.

    Only a ``residual: standard`` model is a Hugging Face model; any other is a :class:`ValueError`, since
    the checkpoint would silently drop the variant's parameters or its windows.
    """
    return write_hf_folder(model.cfg, dict(model.named_parameters()), folder, max_shard_bytes)


def write_hf_folder(cfg: ModelConfig, params: Mapping[str, torch.Tensor], folder: str | Path,
                    max_shard_bytes: int | None = None) -> list[Path]:
    """Write the :class:`LlamaModel` parameters ``params`` (all of them, under our names) as a Hugging Face
    folder: ``model.safetensors`` or, when the weights exceed ``max_shard_bytes``, shards
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (a tensor larger than the limit
    gets a shard of its own), and ``config.json``. Tensors keep their dtype (the config's ``torch_dtype``).

    The write is atomic: everything goes to a temporary folder beside ``folder``, which then takes its place
    by rename, so a crash leaves either the old folder or the new one, never a folder without weights. Files
    of an existing ``folder`` that are not a checkpoint's (a tokenizer, a README) are carried over.
    Returns the files written, at their final paths.
    """
    hf_model_type(cfg)  # refuses a model no Hugging Face type computes, before anything is written
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    mapping = hf_state_dict_mapping(cfg)
    lacking = [ours for ours in mapping.values() if ours not in params]
    if lacking:
        raise ValueError(f"parameters {lacking[:5]} of the model are missing")
    leftover = set(params) - set(mapping.values())
    if leftover:
        raise ValueError(f"parameters with no Hugging Face name: {sorted(leftover)}")
    tensors = [(hf, params[ours]) for hf, ours in mapping.items()]
    dtypes = {p.dtype for _, p in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"the parameters have several dtypes {sorted(map(str, dtypes))}; cast them to one first")

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, p in tensors:
        nbytes = p.numel() * p.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, p))
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.writing-", dir=folder.parent))
    try:
        if folder.is_dir():  # keep what is not ours to replace
            for old in folder.iterdir():
                if old.name in (SINGLE_FILE, INDEX_FILE, CONFIG_FILE) or _SHARD_NAME.fullmatch(old.name):
                    continue
                (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
        for fname, shard in zip(names, shards, strict=True):
            save_file({n: p.detach().cpu().contiguous() for n, p in shard}, tmp / fname, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(p.numel() * p.element_size() for _, p in tensors)},
                     "weight_map": {n: fname for fname, shard in zip(names, shards, strict=True) for n, _ in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, next(iter(dtypes))), indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # on disk before the rename makes them visible, with the modes of a plain write
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                if f.name in names or f.name in (INDEX_FILE, CONFIG_FILE):
                    f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = [folder / n for n in names] + ([folder / INDEX_FILE] if len(shards) > 1 else []) + [folder / CONFIG_FILE]
    log.info("saved %d tensors to %s in %d file(s)", len(tensors), folder, len(shards))
    return written


def _swap_in(new: Path, folder: Path) -> None:
    """Put the complete folder ``new`` at ``folder``: one rename when ``folder`` does not exist; else the old
    one is renamed aside first and removed after (between the two renames both complete folders exist)."""
    if not folder.exists():
        os.rename(new, folder)
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    aside.rmdir()
    os.rename(folder, aside)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)
