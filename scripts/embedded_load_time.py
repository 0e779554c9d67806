"""Time the embedded model: first use (GGUF -> safetensors conversion, in a fresh cache) and later loads.

    .venv/bin/python scripts/embedded_load_time.py [--repeats 3]

Prints one line per measurement; the figures in docs/configuration.md come from here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CAI_CACHE_DIR"] = cache  # a fresh cache: the first load converts
        from cai.models import load_policy

        start = time.perf_counter()
        load_policy({"path": "embedded"})
        print(f"first load (converts GGUF -> safetensors): {time.perf_counter() - start:.1f} s")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_policy({"path": "embedded"})
            times.append(time.perf_counter() - start)
        print(f"later loads (cached safetensors): median {statistics.median(times):.2f} s over {args.repeats}")


if __name__ == "__main__":
    main()
