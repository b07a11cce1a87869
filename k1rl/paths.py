"""Paths a remote caller names, confined to the run directory.

A service that writes or reads files on a caller's word (the trainer's checkpoint save,
load and HF export) resolves the path here first, so that whoever can reach its port
cannot make it write over, or load weights from, anything outside the run.
"""

from __future__ import annotations

from pathlib import Path


class PathOutsideRunError(ValueError):
    """A requested path resolves outside the run directory."""


def confine(path: str | Path, run_dir: str | Path) -> Path:
    """``path`` resolved (symlinks followed; a relative one is taken inside ``run_dir``),
    or :class:`PathOutsideRunError` when it does not lie inside ``run_dir``."""
    root = Path(run_dir).resolve()
    resolved = (root / Path(path).expanduser()).resolve()
    if resolved != root and root not in resolved.parents:
        raise PathOutsideRunError(
            f"{str(path)!r} is outside the run directory {str(root)!r}: a service reads and "
            "writes only inside its run (run_dir in its config)")
    return resolved
