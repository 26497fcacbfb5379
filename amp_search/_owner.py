"""Who runs a piece of work, and whether that process still lives: the one liveness check.

A trial (``keys.OWNER_ATTR``) and a candidate's claim file (``results/store.py``) record their
owner as ``{"host": ..., "pid": ...}``. Only a process on this host can be found dead; an
owner elsewhere (or one not named) is taken to be alive.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

__all__ = ["owner_is_dead", "this_owner"]


def this_owner() -> dict[str, Any]:
    """This process as an owner record."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def owner_is_dead(owner: Mapping[str, Any]) -> bool:
    """Whether ``owner`` is a process on this host that no longer runs."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False
