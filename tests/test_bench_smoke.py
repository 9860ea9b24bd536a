"""Every benchmark of ``make bench`` still runs (a layout move once broke bench.month_close unnoticed):
each one, as ``python -m bench.X`` in a process of its own, on a tiny workload, exits 0 and prints its
ratio line. Nothing is timed here; the figures themselves are README's, from full runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.__main__ import BENCHMARKS

TINY = {
    "bench.quota": ["--requests", "300", "--rounds", "1", "--projects", "20", "--concurrency", "4"],
    "bench.sync": ["--rows", "400", "--orgs", "4", "--projects", "2", "--baseline", "40"],
    "bench.month_close": ["--orgs", "20"],
    "bench.stripe": ["--orgs", "2", "--rows", "5"],
    "bench.webhooks": ["--deliveries", "40", "--orgs", "4", "--concurrency", "4"],
}


def test_every_benchmark_of_make_bench_has_a_tiny_run() -> None:
    assert set(TINY) == set(BENCHMARKS)


@pytest.mark.parametrize("module", BENCHMARKS)
def test_the_benchmark_runs_and_prints_its_ratio(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *TINY[module]],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout, done.stdout
