"""Time what verifying a stage's outputs costs: the per-file sha256 digests a stage records when it completes, and
the same digests recomputed by the stage that consumes it (`rundir.verify_outputs`, e.g. distil train reading a
prepared dataset).

    .venv/bin/python scripts/bench_verify_inputs.py            # 1 GB in 4 shards
    .venv/bin/python scripts/bench_verify_inputs.py --gb 4 --shards 8

The stage folder is written to a temporary directory just before it is hashed, so it is read from the page cache:
the figures are the hashing cost (CPU); a cold read from disk is bounded by the disk's speed as well.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from distilbert_cli.rundir import file_digests, verify_outputs, write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the stage's files")
    parser.add_argument("--shards", type=int, default=4, help="files it is split into")
    args = parser.parse_args()
    shard_bytes = int(args.gb * 1e9 / args.shards)
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        stage = Path(tmp) / "prepare-data"
        (stage / "dataset").mkdir(parents=True)
        chunk = os.urandom(1 << 24)
        for shard in range(args.shards):
            with (stage / "dataset" / f"data-{shard:05d}.arrow").open("wb") as handle:
                for offset in range(0, shard_bytes, len(chunk)):
                    handle.write(chunk[: min(len(chunk), shard_bytes - offset)])
        total = args.shards * shard_bytes

        started = time.perf_counter()
        digests = file_digests(stage)
        recorded = time.perf_counter() - started
        write_json_atomic(stage / "manifest.json", {"stage": "prepare-data", "status": "complete", "files": digests,
                                                    "unfingerprinted": ["manifest.json", "log.txt"]})
        started = time.perf_counter()
        verify_outputs(stage)
        verified = time.perf_counter() - started
    print(f"{total / 1e9:.2f} GB in {args.shards} files, {len(os.sched_getaffinity(0))} usable CPU core(s)")
    print(f"record digests (stage completes): {recorded:.2f} s, {total / 1e9 / recorded:.2f} GB/s")
    print(f"verify (stage consumes):          {verified:.2f} s, {total / 1e9 / verified:.2f} GB/s")


if __name__ == "__main__":
    main()
