"""Where qlib keeps things: the repo root, the cache of fetched sources and built models, results, installed packages."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$QLIB_CACHE``, else ``<repo>/data/cache``), created on demand."""
    root = Path(os.environ.get("QLIB_CACHE") or REPO_ROOT / "data" / "cache")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(*parts: str) -> Path:
    """``<repo>/results/...``, created on demand."""
    path = REPO_ROOT.joinpath("results", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, pip_spec: str | None = None) -> Path:
    """Folder of an installed package, found without importing it; else ModuleNotFoundError naming the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        how = f"pip install --no-deps {pip_spec}" if pip_spec else "pip install -r requirements.txt"
        raise ModuleNotFoundError(f"Package {module!r} is not installed; run `{how}`.")
    return Path(next(iter(spec.submodule_search_locations)))
