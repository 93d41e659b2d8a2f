"""Benchmark: hashing guest pages as the data plane does, SHA-1 (the former way) against XXH3 (now).

    .venv/bin/python bench/bench_page_hashing.py [--memory-mib 256] [--runs 3]

Both sides of a migration hash every page written since the last round, one call per 4 KiB
page, in a worker thread. This fills a ``GuestMemory`` with random bytes and times
``refresh_digests`` + ``digest`` (XXH3-64 per page, XXH3-128 over the table) against the former
scheme written out here (SHA-1 per page into a 20-byte-per-page table, SHA-256 over it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quick  # noqa: E402
from hostagent.drivers.simulated.memory import PAGE_SIZE, GuestMemory  # noqa: E402


def sha1_scheme(memory: GuestMemory) -> str:
    """The scheme before XXH3: SHA-1 per page into a table, SHA-256 over the table."""
    view, table, sha1 = memory.view, bytearray(20 * memory.page_count), hashlib.sha1
    for page in range(memory.page_count):
        start = page * PAGE_SIZE
        digest = sha1(view[start : start + PAGE_SIZE], usedforsecurity=False).digest()
        table[page * 20 : (page + 1) * 20] = digest
    return hashlib.sha256(table).hexdigest()


def xxh3_scheme(memory: GuestMemory) -> str:
    memory.note_written(0, memory.page_count)
    memory.refresh_digests()
    return memory.digest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = quick.parse_args(parser, {"memory_mib": 16, "runs": 1})
    data = os.urandom(args.memory_mib * 2**20)
    memory = GuestMemory(args.memory_mib)
    memory.view[:] = data
    print(f"{args.memory_mib} MiB of random pages; load {Path('/proc/loadavg').read_text().strip()}")
    for label, scheme in (("SHA-1 per page (before)", sha1_scheme), ("XXH3 per page (now)", xxh3_scheme)):
        seconds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            scheme(memory)
            seconds.append(time.perf_counter() - started)
        rates = [len(data) / second / 1e9 for second in seconds]
        print(
            f"  {label:24} {min(seconds) * 1000:6.0f}-{max(seconds) * 1000:6.0f} ms  "
            f"{min(rates):.2f}-{max(rates):.2f} GB/s"
        )
    memory.close()


if __name__ == "__main__":
    main()
