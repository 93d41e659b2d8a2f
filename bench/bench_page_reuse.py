"""Benchmark: would XBZRLE-style deltas or a fast codec pay for a simulated demo guest's pages?

    .venv/bin/python bench/bench_page_reuse.py [--memory-mib 4096] [--fill-percent 5] [--seconds 5]

Runs a demo guest's workload in this process (no agents: the same ``SimulatedGuest`` code the
agent runs, 500 pages/s within its working set), then for the pages it rewrote measures what
would travel again in later rounds: how many bytes of each re-sent page actually changed since
the version already sent, the size QEMU's XBZRLE encoding would give (runs of unchanged and
changed bytes, each run's length as a varint, the changed bytes raw), and what zstd (level 1)
and lz4 make of the first pass and of the re-sent pages. Needs ``zstandard`` and ``lz4`` for the
codec columns (``pip install zstandard==0.25.0 lz4==4.4.5``); without them those are skipped.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentprotocol import GuestSpec  # noqa: E402
from bench import quick  # noqa: E402
from bench.agents import guest_id_for  # noqa: E402
from hostagent.drivers.simulated.guest import SimulatedGuest  # noqa: E402
from hostagent.drivers.simulated.memory import PAGE_SIZE, runs_of  # noqa: E402

CHANGED = re.compile(rb"[^\x00]+")


def varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def xbzrle_size(old: bytes, new: bytes) -> tuple[int, int]:
    """(bytes changed, XBZRLE-encoded size) of ``new`` against ``old`` (QEMU migration/xbzrle.c)."""
    diff = bytes(a ^ b for a, b in zip(old, new, strict=True))
    changed = size = position = 0
    for match in CHANGED.finditer(diff):
        size += varint_size(match.start() - position) + varint_size(match.end() - match.start())
        size += match.end() - match.start()
        changed += match.end() - match.start()
        position = match.end()
    return changed, size


def codecs() -> dict[str, object]:
    found: dict[str, object] = {}
    try:
        import zstandard

        compressor = zstandard.ZstdCompressor(level=1)
        found["zstd-1"] = compressor.compress
    except ImportError:
        pass
    try:
        import lz4.frame

        found["lz4"] = lz4.frame.compress
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=4096)
    parser.add_argument("--fill-percent", type=int, default=5)
    parser.add_argument("--dirty-pages-per-s", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0, help="of workload between the two versions")
    args = quick.parse_args(parser, {"memory_mib": 128, "seconds": 0.5})
    spec = {
        "name": "db01",
        "memory_mib": args.memory_mib,
        "vcpus": 4,
        "fill_percent": args.fill_percent,
        "dirty_pages_per_s": args.dirty_pages_per_s,
    }
    guest = SimulatedGuest(GuestSpec(**spec, guest_id=guest_id_for(spec["name"])))
    guest._fill_memory()
    memory = guest.memory
    written = bytes(memory.written)
    first_pass = b"".join(bytes(memory.pages(first, count)) for first, count in runs_of(written))
    first_mib = len(first_pass) / 2**20
    print(
        f"guest {args.memory_mib} MiB, {args.fill_percent}% filled ({first_mib:.0f} MiB first pass), "
        f"working set {guest.working_set_pages} pages, {args.dirty_pages_per_s} pages/s"
    )
    memory.start_tracking()
    sent = {}
    writes = int(args.dirty_pages_per_s * args.seconds)
    for _ in range(writes):
        guest._write_next_page()
    dirty = memory.take_dirty()
    pages = [page for first, count in runs_of(dirty) for page in range(first, first + count)]
    for page in pages:  # the version the first pass had sent (the fill's content)
        sent[page] = first_pass_page(guest, page)
    changed = encoded = 0
    resent = b""
    for page in pages:
        new = bytes(memory.pages(page, 1))
        page_changed, page_encoded = xbzrle_size(sent[page], new)
        changed += page_changed
        encoded += min(page_encoded, PAGE_SIZE)  # XBZRLE falls back to the raw page when longer
        resent += new
    print(
        f"{writes} writes in {args.seconds:.0f} s: {len(pages)} distinct pages re-sent "
        f"({len(pages) * PAGE_SIZE / 2**20:.1f} MiB, "
        f"{len(pages) * PAGE_SIZE / len(first_pass):.1%} of the first pass)"
    )
    print(
        f"  bytes changed in them: {changed / 2**20:.2f} MiB "
        f"({changed / max(1, len(pages) * PAGE_SIZE):.1%}); "
        f"XBZRLE would send {encoded / 2**20:.2f} MiB"
    )
    for name, compress in codecs().items():
        started = time.perf_counter()
        first_size = len(compress(first_pass))  # type: ignore[operator]
        seconds = time.perf_counter() - started
        resent_size = len(compress(resent)) if resent else 0  # type: ignore[operator]
        print(
            f"  {name:7} first pass {first_size / len(first_pass):.3f} of raw "
            f"({len(first_pass) / seconds / 1e6:.0f} MB/s on one core), "
            f"re-sent pages {resent_size / max(1, len(resent)):.3f} of raw"
        )


def first_pass_page(guest: SimulatedGuest, page: int) -> bytes:
    """What the page held after boot (the fill), rebuilt the way ``_fill_memory`` wrote it."""
    from hostagent.drivers.simulated.guest import CHUNK_PAGES, CHUNK_SIZE, PAGE_STAMP

    chunk, index = divmod(page, CHUNK_PAGES)
    if chunk >= guest.memory.chunk_count * guest.spec.fill_percent // 100:
        return bytes(PAGE_SIZE)
    offset = (chunk * 4096) % CHUNK_SIZE + index * PAGE_SIZE
    content = bytearray(guest._pattern[offset : offset + PAGE_SIZE])
    if index == 0:
        PAGE_STAMP.pack_into(content, 0, guest.seed, chunk)
    return bytes(content)


if __name__ == "__main__":
    main()
