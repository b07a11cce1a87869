"""Compiled programs by source hash, shared on disk by a service's workers.

An RL batch submits the same program many times: one request per test case (verl's
SandboxFusion reward does), or the same checker with every request. A compile whose
language, command and source were seen before is not run again: its outputs (the
compile dir's regular files besides the source: a binary, Java's classes) and its
outcome are copied back. Compile errors are kept too (every re-submission would fail
the same way); time-outs, memory kills and the sandbox's own failures are not, since
they depend on the machine's load.

Entries are directories ``<root>/<sha256>/`` written under a temporary name and renamed
into place (atomic: workers racing on the same source both end with a whole entry);
past ``max_entries`` the least recently used are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from k1rl.protocol import CompileOutcome

OUTCOME = ".outcome.json"
MAX_ENTRY_BYTES = 256 << 20  # larger outputs are compiled again rather than copied


class CompileCache:
    def __init__(self, root: Path, max_entries: int) -> None:
        self.root = root
        self.max_entries = max_entries
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # the workers' (root's) alone: no program sees it

    @staticmethod
    def key(language: str, argv: list[str], source: bytes) -> str:
        h = hashlib.sha256(language.encode())
        for part in argv:
            h.update(b"\0" + part.encode())
        h.update(b"\0\0" + source)
        return h.hexdigest()

    def restore(self, key: str, into: Path, uid: int, time_s: float) -> CompileOutcome | None:
        """Copy a cached compile's outputs into ``into`` (owned by ``uid``); its outcome,
        or None on a miss. A compile that took longer than this request's ``time_s``
        allows is a miss: compiled again, it times out as the request asks."""
        entry = self.root / key
        try:
            outcome = CompileOutcome.model_validate_json((entry / OUTCOME).read_text())
            if outcome.time_s > time_s:
                return None
            for f in entry.iterdir():
                if f.name != OUTCOME:
                    dest = into / f.name
                    shutil.copy2(f, dest)
                    os.chown(dest, uid, uid)
            os.utime(entry)  # recently used
        except (OSError, ValueError):
            return None  # missing, or pruned by another worker meanwhile: compile
        return outcome.model_copy(update={"cached": True})

    def store(self, key: str, compiled: Path, source_file: str,
              outcome: CompileOutcome) -> None:
        """Keep the regular files ``compiled`` holds beside ``source_file`` (not when the
        compiler was stopped: out of time, or killed)."""
        if outcome.timed_out or outcome.exit_code is None or (self.root / key).exists():
            return
        outputs = [f for f in compiled.iterdir()
                   if f.name != source_file and f.is_file() and not f.is_symlink()]
        if sum(f.stat().st_size for f in outputs) > MAX_ENTRY_BYTES:
            return
        tmp = self.root / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in outputs:
            shutil.copy2(f, tmp / f.name)
        (tmp / OUTCOME).write_text(outcome.model_dump_json())
        try:
            os.rename(tmp, self.root / key)
        except OSError:  # another worker stored it first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self._prune()

    def _prune(self) -> None:
        entries = [e for e in self.root.iterdir() if not e.name.startswith(".")]
        if len(entries) <= self.max_entries:
            return

        def used(e: Path) -> float:
            try:
                return e.stat().st_mtime
            except OSError:
                return 0.0

        for e in sorted(entries, key=used)[:len(entries) - self.max_entries]:
            shutil.rmtree(e, ignore_errors=True)
