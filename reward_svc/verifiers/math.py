"""Rule-based math verification (k1.5 "Rewards": rule-based where the answer form allows).

The final answer is found as ``reward.answer_formats`` say (:mod:`reward_svc.answers`): by
default the last ``\\boxed{...}``, else the sentence after the last "The answer is" (the
closing line of the synthetic tasks, see :mod:`k1rl.data.tasks`). A response without one
scores 0, as does an answer longer than ``MAX_ANSWER_CHARS``.

Plain integers ("85", "085", "1,000", "-7") are compared exactly in this process, with no
sympy: that is nearly every answer of a policy trained on the task format. Any other form
("85.0", "\\boxed{85}", "$85$", "\\frac{170}{2}") is checked by math-verify's parse/verify.

Why math-verify runs in a child process: its own timeouts use SIGALRM, which works only on
the main thread (off it, parse and verify raise ValueError), and the RPC server runs handlers
on a worker thread. With those timeouts off, length caps do not make it safe: the 14-character
answer ``$10^{10^{10}}$`` makes sympy compute a huge power (still running after 8 s when
measured). So the check runs in a spawned worker process with timeouts off; the parent waits
``timeout_s`` for the verdict and, past it, kills the worker (the answer scores 0) and starts
a new one in the background. Unlike a signal, the kill also ends a computation stuck inside a
single C call, and the worker's address space is capped so a runaway cannot eat the host's
memory within the deadline.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import signal
import threading
from multiprocessing.connection import Connection

from k1rl.config import RewardConfig
from k1rl.data.tasks import ANSWER_PREFIX, extract_answer

from reward_svc.answers import MAX_ANSWER_CHARS, extract

from reward_svc.verifiers import Verifier, register

log = logging.getLogger(__name__)

_INTEGER = re.compile(r"-?\d[\d,]*")
# a runaway sympy computation gets this much address space on top of what the imports use,
# then fails with MemoryError (which math-verify turns into "not equal")
_CHILD_EXTRA_MEMORY = 1 << 30


def canonical_int(text: str) -> str | None:
    """``text`` as extract_answer normalises an integer (no commas, no leading zeros), or None
    if it is not a plain integer."""
    if len(text) > MAX_ANSWER_CHARS or not _INTEGER.fullmatch(text):
        return None
    return extract_answer(f"{ANSWER_PREFIX} {text}")


def as_latex(text: str) -> str:
    """Bare answers go in $...$ so math-verify reads the whole answer as one expression; left
    bare, it takes the last number, and "86 or 85" would match 85."""
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


class BadGoldAnswer(ValueError):
    """The gold answer is not something math-verify can parse: a data bug, not a wrong reply."""


@register("math")
class MathVerifier(Verifier):
    """Correct iff the final answer equals the gold answer as a number or expression."""

    def __init__(self, timeout_s: float = 3.0, formats: tuple[str, ...] = ("boxed", "answer_is"),
                 pattern: str | None = None) -> None:
        self.worker = MathVerifyWorker(timeout_s)
        self.formats = tuple(formats)
        self.pattern = re.compile(pattern) if pattern else None

    @classmethod
    def from_config(cls, config: RewardConfig) -> MathVerifier:
        return cls(timeout_s=config.verify_timeout_s, formats=tuple(config.answer_formats),
                   pattern=config.answer_regex)

    def verify(self, response: str, answer: str) -> bool:
        gold = answer.strip()
        if not gold:
            raise BadGoldAnswer("the gold answer is empty")
        given = extract(response, self.formats, self.pattern)
        if given is None:
            return False
        gold_int, given_int = canonical_int(gold), canonical_int(given)
        if gold_int is not None and given_int is not None:
            return gold_int == given_int
        return self.worker.check(as_latex(gold), as_latex(given))

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.worker.close()


class MathVerifyWorker:
    """math-verify in a spawned child process, with a hard wall-clock limit per check.

    Thread-safe (one check at a time). ``restarts`` counts workers killed or lost.
    """

    def __init__(self, timeout_s: float = 3.0, start_timeout_s: float = 60.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False

    def start(self) -> None:
        """Spawn the worker and wait until it has imported math-verify."""
        with self._lock:
            self._ensure_ready()

    def check(self, gold: str, answer: str) -> bool:
        """verify(parse(gold), parse(answer)); False on timeout or worker death.

        Raises BadGoldAnswer if ``gold`` does not parse.
        """
        with self._lock:
            self._ensure_ready()
            assert self._conn is not None
            try:
                self._conn.send((gold, answer))
            except OSError:  # the worker died since the last check: retry once on a new one
                self._restart()
                self._ensure_ready()
                self._conn.send((gold, answer))
            try:
                if not self._conn.poll(self.timeout_s):
                    log.warning("math-verify took over %.3g s on %.80r: scored 0, worker "
                                "restarted", self.timeout_s, answer)
                    self._restart()
                    return False
                status, value = self._conn.recv()
            except (EOFError, OSError):
                log.warning("math-verify worker died on %.80r: scored 0, restarted", answer)
                self._restart()
                return False
        if status == "bad_gold":
            raise BadGoldAnswer(f"math-verify cannot parse the gold answer {gold!r}")
        return bool(value)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_ready(self) -> None:
        if self._proc is None:
            self._spawn()
        if self._ready:
            return
        assert self._conn is not None and self._proc is not None
        try:
            ok = self._conn.poll(self.start_timeout_s) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            code = self._proc.exitcode
            self._stop()
            raise RuntimeError(
                f"math-verify worker did not start within {self.start_timeout_s:.3g} s "
                f"(exit code {code})"
            )
        self._ready = True

    def _spawn(self) -> None:
        # spawn, not fork: the service process runs ZMQ threads, which a fork would copy
        # in whatever state they were in
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child,), name="math-verify", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False

    def _restart(self) -> None:
        self._stop()
        self.restarts += 1
        # start the replacement now, so its imports overlap with whatever the caller does next
        self._spawn()

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
            if self._proc.exitcode is not None:
                self._proc.close()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False


# ---------------------------------------------------------------------- child process


def _worker_main(conn: Connection) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when this worker ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # parse/verify warn once that timeouts are off: they are, on purpose (see module doc)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    _limit_memory()
    conn.send("ready")
    while True:
        try:
            gold, answer = conn.recv()
        except EOFError:  # the parent closed the pipe or died
            return
        try:
            gold_parsed = parse(gold, fallback_mode="no_fallback", parsing_timeout=None)
            if not gold_parsed:
                conn.send(("bad_gold", False))
                continue
            given = parse(answer, fallback_mode="no_fallback", parsing_timeout=None)
            ok = bool(given) and verify(gold_parsed, given, timeout_seconds=None)
        except Exception:  # math-verify swallows most errors; anything else is "not equal"
            ok = False
        conn.send(("ok", ok))


def _limit_memory() -> None:
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = used + _CHILD_EXTRA_MEMORY
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # not Linux: the wall-clock limit still holds
        pass
