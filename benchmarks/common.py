"""Helpers shared by the benchmark scripts: device/dtype parsing, timing, headers, tables and output paths.

Benchmarks are run as scripts (``python benchmarks/<name>.py``), so this module is imported as
``common`` from the script's own folder. Nothing here depends on a GPU; CUDA is synchronised around
every timed call when the device is a CUDA device.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distca.config import DistCAConfig, config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_ROOT = REPO_ROOT / "out"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_device(name: str) -> torch.device:
    """``cpu``/``cuda``/``cuda:N`` → device; fails early with a readable message when CUDA is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch build ({torch.__version__}) sees no CUDA device")
    return device


def default_dtype_name(device: torch.device) -> str:
    """fp32 on CPU (the CPU kernels' native precision), bf16 on GPU (what training uses)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when asked; otherwise leave torch's default."""
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


@dataclass
class Timing:
    """Wall-clock samples of one measured call (seconds) and their median."""

    samples: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "samples_s": self.samples, "warmup": self.warmup}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised on both sides."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 2,
    reps: int = 5,
    budget_s: float | None = None,
) -> Timing:
    """Median-ready timing of ``fn``: ``warmup`` untimed calls, then up to ``reps`` timed calls.

    ``budget_s`` bounds the time spent on one measurement: warmups stop early once a single call
    exceeds half the budget (the first warmup always runs), and repetitions stop once the timed
    calls have used the budget (at least one always runs). Slow CPU points thus get fewer samples
    instead of stalling the run; the number of samples is recorded next to the median.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    done_warmup = 0
    for _ in range(warmup):
        dt = _timed(fn, device)
        done_warmup += 1
        if budget_s is not None and dt > budget_s / 2:
            break
    timing = Timing(warmup=done_warmup)
    for _ in range(reps):
        timing.samples.append(_timed(fn, device))
        if budget_s is not None and sum(timing.samples) >= budget_s:
            break
    return timing


def git_commit() -> str:
    """Short commit of the repository (``+dirty`` with local changes), or ``uncommitted``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    if not commit:
        return "uncommitted"
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return f"{commit}+dirty" if dirty else commit


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: host, CPU count, torch, threads and the GPU name if any."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_info(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Machine info plus date and commit, and any benchmark settings passed as keywords."""
    return {
        **machine_info(device),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        **extra,
    }


def header_lines(title: str, info: dict[str, Any]) -> list[str]:
    """Markdown header for a printed table, ready to paste into BENCHMARKS.md."""
    machine = f"{info['host']}, {info['cpus']} CPUs, torch {info['torch']} ({info['torch_threads']} threads)"
    if "device_name" in info:
        machine += f", {info['device_name']} (CUDA {info.get('cuda')})"
    lines = [f"### {title}", "", f"- machine: {machine}", f"- date: {info['date']}", f"- commit: {info['commit']}"]
    skip = {"host", "cpus", "torch", "torch_threads", "python", "device_name", "cuda", "date", "commit"}
    settings = ", ".join(f"{k}={v}" for k, v in info.items() if k not in skip)
    if settings:
        lines.append(f"- settings: {settings}")
    return [*lines, ""]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A GitHub markdown table; numbers right-aligned, everything else left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) if cells else len(col) for i, col in enumerate(columns)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(columns))]

    def fmt(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric,
                                                                                               strict=True)) + "|"
    return [fmt(list(columns)), rule, *(fmt(r) for r in cells)]


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return text in {"—", "-"}
    return True


def out_dir(kind: str) -> Path:
    """``out/<kind>/`` under the repository root (git-ignored), created if needed."""
    path = OUT_ROOT / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


def available_memory_bytes(device: torch.device) -> int:
    """Memory a benchmark may still allocate: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def fmt_ms(seconds: float | None, digits: int = 3) -> str:
    """Seconds → milliseconds text with ``digits`` significant figures (``—`` when missing)."""
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.{max(0, digits - 1 - _order(ms))}f}"


def _order(x: float) -> int:
    return len(str(int(abs(x)))) - 1 if abs(x) >= 1 else 0


def attention_run_config(heads: int, kv_heads: int, head_dim: int, backend: str, timeout_s: float,
                         precision: str = "fp32", round_tokens: int = 1024) -> DistCAConfig:
    """A run config for a benchmark of core attention alone: the attention shape, kernel backend, transport
    timeout and precision, one trainer whose rounds carry up to ``round_tokens`` tokens (what bounds a
    server's receive buffers); everything else at the config's defaults. Its servers, transport and scheduler
    settings come from :mod:`distca.parts`, as a training run's do."""
    return config_from_dict({"model": {"hidden": heads * head_dim, "n_heads": heads, "n_kv_heads": kv_heads},
                             "attention": {"backend": backend}, "transport": {"timeout_s": timeout_s},
                             "cluster": {"n_trainers": 1}, "train": {"precision": precision, "pipeline_parallel": 1,
                                                                     "tokens_per_rank": round_tokens}})
