"""Download throughput of the weights manager against a loopback server, next to plain disk-write speed.

Serves a 1 GB file (by default) from an `http.server` thread on 127.0.0.1 that answers like the Hugging Face
Hub (HEAD with LFS headers, redirect, Range), downloads it with `download_model` (streamed, hashed while
downloading, fsync, rename) and prints MB/s. For comparison it writes the same number of bytes to the same
disk with plain 8 MiB writes + fsync, and hashes them in memory.

    python Testing/benchmarks/bench_download.py [--size-mb 1024] [--repeats 3] [--dir /path/on/the/disk/to/test]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # fake_hub
sys.path.insert(0, str(HERE.parents[1]))  # CTFoundationLib

from fake_hub import FakeHub  # noqa: E402

BLOCK = 8 * 2**20


def make_file(path: Path, size: int) -> None:
    """`size` bytes of incompressible data (a random 8 MiB block with a counter in each copy)."""
    block = bytearray(os.urandom(BLOCK))
    with open(path, "wb", buffering=0) as handle:
        written, i = 0, 0
        while written < size:
            block[:8] = i.to_bytes(8, "little")
            n = min(BLOCK, size - written)
            handle.write(memoryview(block)[:n])
            written, i = written + n, i + 1


def disk_write_mbps(folder: Path, size: int) -> float:
    """Plain sequential write of `size` bytes in 8 MiB blocks, fsync included."""
    block = os.urandom(BLOCK)
    target = folder / "disk-write.bin"
    start = time.perf_counter()
    with open(target, "wb", buffering=0) as handle:
        written = 0
        while written < size:
            written += handle.write(block[: min(BLOCK, size - written)])
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return size / 1e6 / elapsed


def sha256_mbps(size: int) -> float:
    block = os.urandom(BLOCK)
    hasher = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(max(1, size // BLOCK)):
        hasher.update(block)
    return max(1, size // BLOCK) * BLOCK / 1e6 / (time.perf_counter() - start)


def serve(folder: Path, source: Path) -> tuple[FakeHub, str]:
    """Start the loopback Hub with the file published, and point the weights manager at it."""
    hub = FakeHub(folder / "hub").start()
    entry = hub.add("bench/weights", "big.pt", source, repo_type="dataset")
    registry = {
        "schema_version": 1,
        "replace": True,
        "licenses": {"BENCH": {"name": "bench", "url": "https://example.org", "summary": "-", "acknowledge": False}},
        "models": {"bench": {
            "title": "bench", "family": "ct-clip", "license": "BENCH", "gated": False,
            "page": "https://example.org", "depends_on": [], "resources": {},
            "files": [{"name": "big.pt", "source": {"type": "hf", "repo": "bench/weights", "repo_type": "dataset",
                                                    "revision": "main", "path": "big.pt"}}],
        }},
    }
    (folder / "registry.json").write_text(json.dumps(registry))
    os.environ.update(CTFOUNDATION_REGISTRY=str(folder / "registry.json"), CTFOUNDATION_MIRROR=hub.url,
                      CTFOUNDATION_HOME=str(folder / "cache"))
    return hub, entry.sha256


def download_mbps(size: int, digest: str) -> float:
    """Time one `download_model` (HEAD, redirect, streamed GET, sha256, fsync, rename) into an empty cache."""
    from CTFoundationLib.weights import Manifest, download_model, remove_model

    remove_model("bench")
    start = time.perf_counter()
    path = download_model("bench", accept_licenses=True)
    elapsed = time.perf_counter() - start
    assert Manifest("bench").files["big.pt"].sha256 == digest, "hash mismatch"
    assert path.stat().st_size == size
    remove_model("bench")
    return size / 1e6 / elapsed


def settle() -> None:
    """Flush dirty pages so one measurement does not pay for the previous one's writeback."""
    if hasattr(os, "sync"):
        os.sync()
    time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind (median shown)")
    parser.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure (default: a temp folder)")
    args = parser.parse_args()
    size = args.size_mb * 2**20
    downloads, writes = [], []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ctf-bench-") as tmp:
        folder = Path(tmp)
        source = folder / "source.bin"
        make_file(source, size)
        hub, digest = serve(folder, source)
        try:
            for _ in range(args.repeats):
                settle()
                writes.append(disk_write_mbps(folder, size))
                settle()
                downloads.append(download_mbps(size, digest))
        finally:
            hub.stop()
    hashing = sha256_mbps(size)
    runs = lambda values: ", ".join(f"{v:.0f}" for v in values)  # noqa: E731
    print(f"file: {size / 2**20:.0f} MiB ({size / 1e6:.0f} MB), {os.cpu_count()} CPU cores, "
          f"disk folder {args.dir or tempfile.gettempdir()}, median of {args.repeats}")
    print(f"download (loopback HTTP, streamed + sha256 + fsync + rename): {median(downloads):7.1f} MB/s"
          f"  [{runs(downloads)}]")
    print(f"plain disk write (8 MiB blocks + fsync):                       {median(writes):7.1f} MB/s"
          f"  [{runs(writes)}]")
    print(f"sha256 in memory (reference):                                  {hashing:7.1f} MB/s")
    print(f"download / disk write: {median(downloads) / median(writes):.2f}")
    return 0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    sys.exit(main())
