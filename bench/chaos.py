"""Kill k1rl's services in the middle of a run and check that nothing was lost.

    python bench/chaos.py [--iterations 20] [--kills 5] [--seed 0]
                          [--at SERVICE:METHOD,...] [--work-dir DIR]

Runs one small RL config twice on this machine (``k1rl rl``'s path: master.run with local
services): unfaulted, then with ``--kills`` SIGKILLs of a whole service (its process
group, as a container dies), each in a seeded random iteration at a seeded random moment
(MOMENTS). A moment is read from the services' own Prometheus endpoints
(``k1rl_rpc_in_flight``): "mid-train" means the trainer is running a train step. ``--at`` fixes the moments instead (in order, one per kill), e.g.
``mid-generate,mid-score,mid-train,mid-publish,mid-switch`` (see MOMENTS: mid-publish
kills the trainer while an engine pulls its weights).

The killed service is restarted by the launcher (the rollout engine by the sidecar that
owns it); the master redoes the iteration or re-sends the call (k1rl/master/recovery.py).
At the end:

- iterations are contiguous (0..N-1 once each) and policy versions never go back;
- the prompt ledger (k1rl/master/ledger.py) resolves every group: trained, parked in the
  final replay buffer, or dropped with a reason; none recorded twice for an iteration;
- lost_prompts: draws missing from the ledger or extra (every iteration draws
  prompts_per_iteration prompts), unresolved groups, and groups the unfaulted run (same
  seed: the same draws) drew with another prompt;
- lost_trajectories: trajectories of trained groups neither trained nor dropped with a
  reason, of parked groups not in the replay buffer, and any difference between what the
  ledger says went to the trainer and the samples the trainer reports having trained on.

Last line, one JSON object: kills, recovered (kills after which the run went on to its
end), lost_trajectories, lost_prompts, extra_seconds (faulted minus unfaulted wall time,
same invocation), restart_seconds (per kill: until the killed service answered ready
again), extra_over_restart (extra_seconds / sum of restart_seconds; target <= 2),
redone (iterations redone), retried (generate, train or checkpoint steps sent again), resent (calls
re-sent as they were), restarts (by service), checks, plan.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
# the services import the plugin too (they inherit this environment)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from k1rl.config import RunConfig  # noqa: E402
from k1rl.launch import free_tcp_address  # noqa: E402
from k1rl.master.ledger import PromptLedger, audit  # noqa: E402
from k1rl.master.replay import ReplayBuffer  # noqa: E402
from k1rl.master.state import RunState  # noqa: E402
from k1rl.metrics import prometheus  # noqa: E402
from k1rl.metrics.jsonl import read_metrics  # noqa: E402
from k1rl.rpc import RPCClient, RPCTimeout  # noqa: E402

# moment: (the service killed, the service whose request is in flight then, that request)
MOMENTS = {
    "mid-generate": ("rollout", "rollout", "generate"),
    "mid-score": ("reward", "reward", "score"),
    "mid-train": ("trainer", "trainer", "train"),
    "mid-publish": ("trainer", "rollout", "update_weights"),  # an engine pulls its weights
    "mid-checkpoint": ("trainer", "trainer", "checkpoint"),
    "mid-switch": ("checkpoint_engine", "checkpoint_engine", "phase"),
}
SECTIONS = ("trainer", "rollout", "reward", "checkpoint_engine")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def config(work: Path, model_dir: Path, iterations: int, seed: int) -> RunConfig:
    """4 prompts x 4 samples of 2-digit additions per iteration, scored by ``slow_math``
    (bench/chaos_verifier.py: 0.1 s per response, as a judge model might take)."""
    from k1rl.data.tasks import write_problems

    problems = work / "add2.jsonl"
    if not problems.exists():
        write_problems(problems, [("add", 2)], count=200, seed=seed)
    cfg = RunConfig.model_validate({
        "run_id": "chaos", "seed": seed, "plugins": ["chaos_verifier"],
        "model": {"path": str(model_dir)},
        "rollout": {"n": 4, "max_tokens": 16},
        "rl": {"iterations": iterations, "prompts_per_iteration": 4, "eval_every": 0},
        "data": {"train": [{"path": str(problems), "verifier": "slow_math",
                            "fields": {"verifier": None}}], "heldout_fraction": 0},
    })
    # a dead service is noticed within 2 s (the defaults, 2 s x 3, suit big clusters)
    cfg.calls.ping_every_s = 1.0
    cfg.calls.misses = 2
    cfg.calls.max_restarts = 20
    return cfg


def fresh_addresses(cfg: RunConfig) -> RunConfig:
    cfg = cfg.model_copy(deep=True)
    for name in SECTIONS:
        section = getattr(cfg, name)
        section.address = free_tcp_address()
        section.metrics_port = _port(free_tcp_address())
    return cfg


def plan(iterations: int, kills: int, at: list[str], seed: int) -> list[dict]:
    """Each kill's iteration (distinct and after the first, unless ``at`` names it as
    MOMENT@ITERATION) and moment (random unless ``at`` names it)."""
    rng = random.Random(seed)
    if at and len(at) != kills:
        raise SystemExit(f"--at names {len(at)} moments for {kills} kills")
    moments = [m.partition("@") for m in at] or [(m, "", "")
                                                  for m in rng.choices(sorted(MOMENTS), k=kills)]
    if unknown := [m for m, _, _ in moments if m not in MOMENTS]:
        raise SystemExit(f"--at {unknown}: the moments are {', '.join(MOMENTS)}")
    free = [i for i in range(1, iterations) if str(i) not in {it for _, _, it in moments}]
    unplaced = sum(not it for _, _, it in moments)
    if unplaced > len(free):
        raise SystemExit(f"{unplaced} kills in distinct iterations need {unplaced + 1} "
                         "iterations at least")
    drawn = iter(sorted(rng.sample(free, unplaced)))
    kills_ = [{"iteration": int(it) if it else next(drawn), "moment": m,
               "service": MOMENTS[m][0]} for m, _, it in moments]
    return sorted(kills_, key=lambda k: k["iteration"])


class Killer(threading.Thread):
    """Carries out a plan against a running master's services."""

    def __init__(self, cfg: RunConfig, run_dir: Path, kills: list[dict]):
        super().__init__(name="chaos", daemon=True)
        self.cfg, self.run_dir, self.kills = cfg, run_dir, kills
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for kill in self.kills:
                if not self._strike(kill):
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc

    def _strike(self, kill: dict) -> bool:
        while self._iterations_done() < kill["iteration"]:
            if self.done.wait(0.2):
                return False
        victim, watched, method = MOMENTS[kill["moment"]]
        section = getattr(self.cfg, victim)
        port = getattr(self.cfg, watched).metrics_port
        while not self._in_flight(port, method):
            if self.done.wait(0.005):
                return False
        pid = self._pid(kill["service"])
        instance = self._instance(section.address)
        killed_at = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        kill.update(at_iteration=self._iterations_done(),
                    restart_s=self._back(section.address, instance, killed_at))
        print(f"chaos: killed {victim} {kill['moment']} in iteration "
              f"{kill['at_iteration']}; ready again after {kill['restart_s']:.1f} s", flush=True)
        return True

    def _iterations_done(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def _pid(self, service: str) -> int:
        pid_file = (self.run_dir / "logs" / ("engine0/rollout.pid" if service == "rollout"
                                             else f"{service}.pid"))
        return int(pid_file.read_text())

    def _in_flight(self, port: int, method: str) -> bool:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
        except OSError:
            return False
        return any(s.value >= 1 for family in text_string_to_metric_families(text.decode())
                   if family.name == "k1rl_rpc_in_flight" for s in family.samples
                   if s.labels.get("method") == method)

    @staticmethod
    def _instance(address: str) -> str:
        with RPCClient(address, timeout_s=1.0) as client:
            return client.ping().instance

    def _back(self, address: str, instance: str, killed_at: float) -> float:
        """Seconds from the kill until another instance of the service answers ready."""
        with RPCClient(address, timeout_s=1.0) as client:
            while not self.done.is_set():
                try:
                    pong = client.ping()
                    if pong.ready and pong.instance != instance:
                        return time.monotonic() - killed_at
                except RPCTimeout:
                    pass
                time.sleep(0.1)
        return time.monotonic() - killed_at


def timed_run(cfg: RunConfig, run_dir: Path, kills: list[dict]) -> tuple[float, Killer]:
    from k1rl import master

    killer = Killer(cfg, run_dir, kills)
    killer.start()
    started = time.monotonic()
    try:
        master.run(cfg, run_dir)
    finally:
        killer.done.set()
        killer.join()
    if killer.error is not None:
        raise killer.error
    return time.monotonic() - started, killer


def ledger_of(run_dir: Path) -> dict[str, str]:
    return {k: e.problem for k, e in PromptLedger(run_dir).latest().items()}


def check(cfg: RunConfig, run_dir: Path, baseline: dict[str, str] | None) -> dict:
    records = read_metrics(run_dir)
    versions = [r.policy_version for r in records]
    state = RunState.load(run_dir)
    buffer = ReplayBuffer(capacity=2**62, segment_tokens=1, max_response_tokens=1)
    buffer.load(state.replay_file)
    found = audit(PromptLedger(run_dir), {g.key for g in buffer.groups}, cfg.rollout.n)
    entries = PromptLedger(run_dir).entries()
    trainer_gap = sum(
        abs(int(r.train.values.get("samples", 0) if r.train else 0)
            - sum(e.trained for e in entries if e.iteration == r.iteration))
        for r in records)
    faulted = ledger_of(run_dir)
    # every iteration draws prompts_per_iteration prompts, each a group "<i>-<k>"
    drawn = {f"{i}-{k}" for i in range(cfg.rl.iterations)
             for k in range(cfg.rl.prompts_per_iteration)}
    lost_prompts = (len(drawn ^ faulted.keys()) + len(found["lost_groups"])
                    + len(found["recorded_twice"])
                    + sum(faulted.get(k) != p for k, p in (baseline or {}).items()))
    return {
        "contiguous": [r.iteration for r in records] == list(range(cfg.rl.iterations)),
        "versions_monotonic": all(a <= b for a, b in zip(versions, versions[1:])),
        "ledger_resolved": not found["lost_groups"] and not found["recorded_twice"],
        "groups": found["groups"], "by_status": found["by_status"],
        "trainer_gap": trainer_gap,
        "lost_prompts": lost_prompts,
        "lost_trajectories": found["lost_trajectories"] + trainer_gap,
    }


def _counter(counter, **labels) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples
               if s.name.endswith("_total") and all(s.labels.get(k) == v
                                                    for k, v in labels.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at", default="", help="MOMENT[@ITERATION],... one per kill (sets "
                   "--kills), in order: " + ", ".join(MOMENTS))
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unfaulted run (no extra_seconds; drawn prompts are checked "
                   "against the iteration count only)")
    p.add_argument("--work-dir", type=Path, default=None)
    args = p.parse_args()
    at = [x for x in args.at.split(",") if x]
    kills = plan(args.iterations, len(at) or args.kills, at, args.seed)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="k1rl-chaos-"))
    work.mkdir(parents=True, exist_ok=True)

    from k1rl.data.tiny_model import init_model

    model = work / "model"
    if not (model / "config.json").exists():
        init_model(model, seed=args.seed, hidden_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_size=256, corpus_size=50)
    cfg = config(work, model, args.iterations, args.seed)
    base_s, baseline = None, None
    if not args.no_baseline:
        base_s, _ = timed_run(fresh_addresses(cfg), work / "unfaulted", [])
        baseline = ledger_of(work / "unfaulted")

    redone, resent = _counter(prometheus.RECOVERIES), _counter(prometheus.CALLS_RESENT)
    retried = _counter(prometheus.STEPS_RETRIED)
    restarts = {s: _counter(prometheus.SERVICE_RESTARTS, service=s) for s in SECTIONS}
    faulted_cfg = fresh_addresses(cfg)
    faulted_s, killer = timed_run(faulted_cfg, work / "faulted", kills)
    checks = check(faulted_cfg, work / "faulted", baseline)
    done = [k for k in kills if "restart_s" in k]
    restart_total = sum(k["restart_s"] for k in done)
    extra = None if base_s is None else faulted_s - base_s
    print(json.dumps({
        "kills": len(done),
        "recovered": len(done) if checks["contiguous"] else 0,
        "lost_trajectories": checks["lost_trajectories"],
        "lost_prompts": checks["lost_prompts"],
        "extra_seconds": None if extra is None else round(extra, 1),
        "restart_seconds": [round(k["restart_s"], 1) for k in done],
        "extra_over_restart": (round(extra / restart_total, 2)
                               if extra is not None and restart_total else None),
        "unfaulted_s": None if base_s is None else round(base_s, 1),
        "faulted_s": round(faulted_s, 1),
        "iterations": args.iterations,
        "redone": _counter(prometheus.RECOVERIES) - redone,
        "retried": _counter(prometheus.STEPS_RETRIED) - retried,
        "resent": _counter(prometheus.CALLS_RESENT) - resent,
        "restarts": {s: _counter(prometheus.SERVICE_RESTARTS, service=s) - n
                     for s, n in restarts.items()},
        "checks": checks,
        "plan": kills,
    }))


if __name__ == "__main__":
    main()
