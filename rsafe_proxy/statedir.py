"""Where the proxy keeps what it writes when no configuration file of the user's says where (the audit log, the
spans file of the packaged configuration): one folder per user, the same wherever the proxy is started, and never
inside the installed package."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """$RSAFE_STATE_DIR, else $XDG_STATE_HOME/rsafe-proxy, else ~/.local/state/rsafe-proxy."""
    env = os.environ if env is None else env
    if env.get("RSAFE_STATE_DIR"):
        return Path(env["RSAFE_STATE_DIR"]).expanduser()
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]).expanduser() / "rsafe-proxy"
    return Path.home() / ".local" / "state" / "rsafe-proxy"
