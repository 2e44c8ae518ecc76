"""Process hardening for the agent, which may keep keys in memory (spec.keyCacheSeconds).

``non_dumpable`` sets ``PR_SET_DUMPABLE`` to 0 (Linux, through libc's ``prctl``): no core
dump of the process, and ``/proc/<pid>/mem``, ``ptrace`` and ``process_vm_readv`` are refused
to every other process of the same user (only a process with ``CAP_SYS_PTRACE`` — root on the
node — can still read its memory: SECURITY.md states that trade).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_protected = False  # what the last non_dumpable() achieved


def protected() -> bool:
    """Whether :func:`non_dumpable` made this process non-dumpable (False before it ran or
    after it failed): the agent keeps no key in memory otherwise."""
    return _protected


def non_dumpable() -> bool:
    """Make this process non-dumpable; False (and a warning) where that is not possible."""
    global _protected
    _protected = _make_non_dumpable()
    return _protected


def _make_non_dumpable() -> bool:
    if not sys.platform.startswith("linux"):
        log.warning("not on Linux: the agent process stays dumpable (spec.keyCacheSeconds is not honoured)")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    except OSError as exc:
        log.warning("the agent process could not be made non-dumpable (spec.keyCacheSeconds is not honoured): %s", exc)
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
