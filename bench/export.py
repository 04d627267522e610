"""Export benchmark (issue 5): stream a whole filtered result out of the read API as CSV or NDJSON
and watch the server's memory.

    python bench/export.py --schema bench_q_200k          # reuse (or build) the query bench's store

It starts `audit serve` (one worker) on the store, reads its resident memory, then downloads
exports of growing size, each to the end, counting rows and bytes, and reads the server's peak
resident memory (VmHWM) after each. Memory that stays flat from the smallest export to the largest
(about 2,000,000 change rows on the 200,000-event store) is what the issue asks for: an export is
paged by keyset inside the server and streamed, never held whole.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*

from bench.query import DEFAULT_POSTGRES, TOKEN, BenchStore, build_store, start_server

# Smallest first, so that each peak can only have grown.
EXPORTS = [
    "/v1/changes?format=csv&field=username",
    "/v1/events?format=ndjson&type=user.*",
    "/v1/events?format=csv",
    "/v1/changes?format=ndjson",
    "/v1/changes?format=csv",
]


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def download(client: httpx.Client, path: str) -> tuple[int, int, float]:
    """Rows (lines, less a CSV header), bytes and seconds of one whole export."""
    started = time.perf_counter()
    lines = size = 0
    with client.stream("GET", path) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            size += len(chunk)
            lines += chunk.count(b"\n")
    rows = lines - 1 if "format=csv" in path else lines
    return rows, size, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schema", default="bench_q_200k", help="store schema (built if missing)")
    parser.add_argument("--events", type=int, default=200_000, help="when building the store")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    args = parser.parse_args(argv)
    url = f"{args.postgres}?schema={quote(args.schema)}"
    store = BenchStore(url)
    if not store.exists():
        build_store(store, args.events, seed=1)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with tempfile.NamedTemporaryFile(prefix="bench_export_", suffix=".log") as log:
        server = start_server(url, log)
        try:
            server.wait_ready("/readyz")
            pid = server.process.pid
            with httpx.Client(base_url=server.base, headers=headers, timeout=600) as client:
                client.get("/v1/events?limit=1").raise_for_status()  # warm: pool, tables, imports
                print(
                    f"server rss_mb={memory_mb(pid, 'VmRSS'):.0f}"
                    f" peak_rss_mb={memory_mb(pid, 'VmHWM'):.0f} (after start and one read)",
                    flush=True,
                )
                for path in EXPORTS:
                    rows, size, seconds = download(client, path)
                    print(
                        f"export path={path} rows={rows} mb={size / 2**20:.0f}"
                        f" seconds={seconds:.1f} rows_per_s={rows / seconds:.0f}"
                        f" server_peak_rss_mb={memory_mb(pid, 'VmHWM'):.0f}",
                        flush=True,
                    )
            for problem in server.problems():
                print(f"  server: {problem}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
