"""``python -m bench`` (``make bench``): run every benchmark of the project, one process each."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.quota", "bench.sync", "bench.month_close", "bench.stripe", "bench.webhooks")


def main() -> int:
    """Run the benchmarks one after the other; the exit status is the first failure's."""
    for module in BENCHMARKS:
        print(f"== python -m {module}", flush=True)
        status = subprocess.run([sys.executable, "-m", module], check=False).returncode
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
