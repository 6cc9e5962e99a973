"""`tollhouse demo` runs end to end and prints the cost table."""

from __future__ import annotations

import subprocess
import sys


def test_demo_prints_cost_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "addons.cli", "demo", "--keep", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    total = next(line for line in lines if line.startswith("total"))
    # 4 calls; 50 x $3 + 4000 x $0.30 + 1000 x $3.75 + 300 x $15 (Sonnet 4) + 3000 x $2.50 + 400 x $10
    # (gpt-4o) + 176 x $0.15 + 1024 x $0.075 + 150 x $0.60 (gpt-4o-mini) + 800 x $1 + 120 x $5
    # (Haiku 4.5), per 1M tokens: $0.0226932, shown to 6 places.
    assert total.split() == ["total", "4", "10,050", "970", "0.022693", "0"]
    assert (tmp_path / "demo" / "data" / "tollhouse.duckdb").is_file()
