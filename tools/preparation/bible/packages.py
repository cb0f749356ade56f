"""The Debian packages that hold the two modules: finding, downloading and unpacking them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterable

from tools.preparation.bible.versification import BibleError


# ---------------------------------------------------------------------------------------------------
# The Debian packages


@dataclass(frozen=True)
class BibleSource:
    language: str  # ISO 639-1 code, as in the direction ("en-es")
    language_name: str  # as the translation template says it
    package: str  # Debian package holding the module
    module: str  # SWORD module name inside it


ENGLISH_KJV = BibleSource("en", "English", "sword-text-kjv", "engKJV2006eb")
SPANISH_RV1909 = BibleSource("es", "Spanish", "sword-text-sparv", "spaRV1909eb")
SOURCES = (ENGLISH_KJV, SPANISH_RV1909)
# Where a dpkg-installed package puts its modules, and so where they are inside a .deb.
SWORD_ROOT_IN_PACKAGE = Path("usr/share/sword")
_MANUAL_DOWNLOAD = "https://packages.debian.org/bookworm/all/{package}/download"


def find_debs(folder: str | Path, packages: Iterable[str]) -> dict[str, Path]:
    """The .deb file of each package in ``folder`` (the newest name if there are several)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BibleError(f"{folder}: no such folder of .deb files")
    found, missing = {}, []
    for package in packages:
        candidates = sorted(folder.glob(f"{package}_*.deb"))
        if candidates:
            found[package] = candidates[-1]
        else:
            missing.append(package)
    if missing:
        names = " ".join(missing)
        raise BibleError(f"{folder}: no .deb file for {', '.join(missing)}; get it with `apt-get download {names}` "
                         f"(or from {_MANUAL_DOWNLOAD.format(package=missing[0])}) into that folder")
    return found


def download_debs(folder: str | Path, packages: Iterable[str], log: Callable[[str], None] = lambda _: None) -> dict[str, Path]:
    """The packages' .deb files in ``folder``, fetched once with ``apt-get download`` (which needs
    no root, only the machine's package lists)."""
    folder = Path(folder)
    packages = list(packages)
    cached = {package: sorted(folder.glob(f"{package}_*.deb")) for package in packages}
    wanted = [package for package, files in cached.items() if not files]
    if wanted:
        hint = (f"or download the .deb files (e.g. from {_MANUAL_DOWNLOAD.format(package=wanted[0])}) and pass "
                "--debs DIR")
        if shutil.which("apt-get") is None:
            raise BibleError(f"apt-get is not available to download {' '.join(wanted)}; install apt, {hint}")
        folder.mkdir(parents=True, exist_ok=True)
        log(f"downloading {' '.join(wanted)} with apt-get into {folder}")
        # A private folder first, so an interrupted download never looks like a cached package.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
            try:
                result = subprocess.run(["apt-get", "download", *wanted], cwd=scratch, capture_output=True,
                                        text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise BibleError(f"apt-get download {' '.join(wanted)} took more than 10 minutes; {hint}") from None
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if line.startswith("E:")]
                reason = (errors or result.stderr.strip().splitlines() or ["no message"])[-1]
                raise BibleError(f"apt-get download {' '.join(wanted)} failed ({reason}); run `apt-get update` as "
                                 f"root first, {hint}")
            for deb in Path(scratch).glob("*.deb"):
                os.replace(deb, folder / deb.name)
    return find_debs(folder, packages)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_deb(deb: str | Path, destination: str | Path, use_dpkg: bool | None = None) -> None:
    """Unpack a .deb's files under ``destination`` without root: ``dpkg-deb -x`` when it is there
    (or ``use_dpkg``), otherwise read the ar archive and its data.tar with the standard library."""
    deb, destination = Path(deb), Path(destination)
    if use_dpkg is None:
        use_dpkg = shutil.which("dpkg-deb") is not None
    if use_dpkg:
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(destination)], capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise BibleError(f"{deb}: dpkg-deb -x failed ({reason}); download the package again")
        return
    data = _deb_member(deb, "data.tar")
    try:
        archive = tarfile.open(fileobj=BytesIO(data), mode="r:*")
    except tarfile.ReadError as err:
        raise BibleError(f"{deb}: its data archive cannot be read without dpkg-deb ({err}); install dpkg") from None
    with archive:
        archive.extractall(destination, filter="data")  # refuses absolute paths and links out of destination


def _deb_member(deb: Path, prefix: str) -> bytes:
    """The first member of the .deb (an ar archive) whose name starts with ``prefix``."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise BibleError(f"{deb}: not a .deb file (no ar archive header); download it again")
    position = 8
    while position + 60 <= len(data):
        header = data[position:position + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            break
        body = data[position + 60:position + 60 + size]
        if name.startswith(prefix):
            return body
        position += 60 + size + (size % 2)  # members start at even offsets
    raise BibleError(f"{deb}: no {prefix}* member; the file is damaged or not a Debian package")
