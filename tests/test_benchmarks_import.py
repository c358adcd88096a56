"""Every benchmark script imports: they import one another's helpers (benchmarks/ is on their path), and a helper
renamed or removed in one must not leave another broken until someone runs it (input_screening once imported a
`started` that workers.py no longer had)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_benchmark_script_imports(name: str) -> None:
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import {name}; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
