"""Installed versions of the packages adam-gpu works with, for reports."""

from __future__ import annotations

import importlib.metadata


def package_version(package: str) -> str:
    """The installed version of ``package`` (CuPy under its per-CUDA wheel names too), or "not installed"."""
    for distribution in (package, f"{package}-cuda13x", f"{package}-cuda12x"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"
