"""Data packages: an npm tarball is checked against its pinned integrity and unpacked in part."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile

import pytest

from calm.tasks import sources


def _tarball(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """A pinned fake npm package whose 'download' copies a local tarball."""
    files = {
        "package/LICENSE.txt": "licence",
        "package/dist/quran_bn.json": "[]",
        "package/dist/chapters/1.json": "not wanted",
        "package/../escape.json": "outside",
        "other/dist/quran_en.json": "not under package/",
    }
    tarball = tmp_path / "src" / "fake-1.0.0.tgz"
    tarball.parent.mkdir()
    integrity = _tarball(tarball, files)
    pkg = sources.NpmPackage(
        "fake", "1.0.0", "test", integrity, files=("LICENSE.txt", "dist/quran_*.json")
    )
    monkeypatch.setenv("CALM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sources.PACKAGES, "fake", pkg)
    monkeypatch.setattr(sources, "_npm_tarball", lambda pkg, directory: tarball)
    return pkg


def test_npm_package_is_checked_and_only_its_named_files_unpacked(fake_npm, tmp_path):
    with pytest.raises(sources.MissingData, match="hub_offline.py data fake"):
        sources.locate("fake", "dist/quran_bn.json")
    target = sources.fetch("fake")
    assert target == tmp_path / "cache" / "npm" / "fake-1.0.0"
    unpacked = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert unpacked == [".complete", "LICENSE.txt", "dist/quran_bn.json"]
    assert not (tmp_path / "cache" / "npm" / "escape.json").exists()
    assert sources.locate("fake", "dist/quran_bn.json").read_text() == "[]"
    assert fake_npm.pin == "fake@1.0.0"


def test_npm_tarball_with_another_digest_is_refused(fake_npm, monkeypatch):
    wrong = sources.NpmPackage("fake", "1.0.0", "test", "sha512-" + "A" * 86 + "==")
    monkeypatch.setitem(sources.PACKAGES, "fake", wrong)
    with pytest.raises(sources.UserError, match="expected sha512-AAAA"):
        sources.fetch("fake")
    assert not (sources.cache_dir() / "npm" / "fake-1.0.0" / ".complete").exists()


def test_quran_json_is_pinned_to_the_registry_integrity():
    pkg = sources.PACKAGES["quran-json"]
    assert pkg.pin == "quran-json@3.1.2"
    assert pkg.tarball_url == "https://registry.npmjs.org/quran-json/-/quran-json-3.1.2.tgz"
    assert len(base64.b64decode(pkg.integrity.removeprefix("sha512-"))) == 64
