"""Serve the test doubles (fake upstream or scripted guard) in their own process, for benchmarks.

python benchmarks/doubles_server.py upstream|guard PORT [DELAY_S]
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    app = FakeUpstream(first_byte_delay_s=delay).app if kind == "upstream" else ScriptedGuard(delay_s=delay).app
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
