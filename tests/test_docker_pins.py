"""No Docker engine runs here, so the images are not built in CI; their pins must at least agree with
pyproject.toml (the single source of versions)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.sub(r"\[.*\]", "", name): version for name, version in (r.split("==") for r in reqs)}


def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + [r for e in project["optional-dependencies"].values() for r in e]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.\-]*", req), f"unpinned: {req}"


def test_dockerfiles_install_the_pinned_versions():
    pins = _pins()
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "docker" / name).read_text()
        found = re.findall(r"'([A-Za-z0-9_\-]+)==([0-9][0-9A-Za-z.\-]*)'", text)
        assert ("torch", pins["torch"]) in found, f"{name} must install torch=={pins['torch']}"
        for pkg, version in found:
            assert pins.get(pkg) == version, f"{name} installs {pkg}=={version}, pyproject pins {pins.get(pkg)}"
        assert "pip install -e '.[dev]'" in text  # everything else comes from pyproject's pins
        assert "python3.11" in text or "python:3.11" in text
