"""Pre-warmed sandboxes (sandbox/prewarm.py): each worker sets up its next bubblewrap
sandbox while the current program runs. What a program sees must not change: a warm
sandbox gets the code written after it was set up, nothing of the run before it, and the
run's own limits; runs alternate between the slot's two cgroups."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sandbox import cgroups
from sandbox.bubblewrap import BwrapRunner
from sandbox.isolation import Limits, Slot, become_subreaper, build_launcher

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")

LIMITS = Limits(cpu_s=5, wall_s=10, memory_mb=128, output_bytes=1 << 16, processes=16,
                open_files=32, scratch_mb=16)
PYTHON = ["/usr/bin/python3", "-S", "-B", "main.py"]


@pytest.fixture
def work():
    root = Path(f"/tmp/k1rl-sandbox-prewarm-{os.getpid()}")
    root.mkdir(mode=0o711, exist_ok=True)
    become_subreaper()  # as a pool worker is: bwrap's inits are reaped by it
    made = []

    def slot_and_runner(prewarm: bool = True, spare: bool = True):
        name = f"svc{os.getpid()}-wwarm{len(made)}"
        cgroup = cgroups.create(name)
        spare_cgroup = cgroups.create(name + "-warm") if cgroup is not None and spare else None
        slot = Slot(len(made), 62950 + len(made), root / f"w{len(made)}", cgroup, spare_cgroup)
        slot.prepare()
        runner = BwrapRunner(root / "rootfs", launcher=build_launcher(root), prewarm=prewarm,
                             scratch_mb=LIMITS.scratch_mb)
        made.append((slot, runner))
        return slot, runner

    yield slot_and_runner
    for slot, runner in made:
        if runner._warm is not None:
            runner._warm.discard()
        for c in (slot.cgroup, slot.spare_cgroup):
            if c is not None:
                c.remove()
    shutil.rmtree(root, ignore_errors=True)


def run(runner, slot, source: str, limits: Limits = LIMITS, **kw):
    slot.prepare()
    slot.write("main.py", source.encode())
    return runner.execute(slot, PYTHON, stdin=b"", limits=limits, **kw)


def test_the_next_run_starts_in_the_sandbox_set_up_during_this_one(work):
    slot, runner = work()
    first = run(runner, slot, "print('one')")
    warm = runner._warm
    assert first.stdout == b"one\n" and warm is not None and warm.alive()
    second = run(runner, slot, "print('two')")  # written after the sandbox was set up
    assert second.stdout == b"two\n" and not second.start_error
    assert not warm.alive()  # it ran the second program and is gone
    assert runner._warm is not warm and runner._warm.alive()


def test_a_warm_sandbox_holds_nothing_of_the_run_before(work):
    slot, runner = work()
    run(runner, slot, "open('/tmp/left', 'w').write('x')\nimport os\nos.makedirs('/tmp/d')")
    after = run(runner, slot, "import os\nprint(sorted(os.listdir('/tmp')), os.getpid(), "
                              "sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    # an empty /tmp; bwrap's init (pid 1) and the program (pid 2) alone
    assert after.stdout == b"[] 2 ['1', '2']\n", after


def test_each_run_gets_its_own_limits_in_either_cgroup(work):
    slot, runner = work()
    if slot.cgroup is None:
        pytest.skip("needs a writable /sys/fs/cgroup")
    used = set()
    hog = "x = bytearray(100 << 20)\nx[::4096] = b'1' * len(x[::4096])\nprint('done')"
    for memory_mb in (64, 256, 64, 256):
        ex = run(runner, slot, hog, Limits(**{**LIMITS.__dict__, "memory_mb": memory_mb,
                                               "address_space_mb": 1024}))
        used.add(id(slot.cgroup))
        if memory_mb == 64:  # within the address space, over the cgroup's limit
            assert ex.oom_killed and ex.exit_code != 0, ex
        else:
            assert not ex.oom_killed and ex.stdout == b"done\n", ex
    assert used == {id(slot.cgroup), id(slot.spare_cgroup)}  # the two alternate
    limits = run(runner, slot, "import resource\nprint(resource.getrlimit("
                               "resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_CPU))")
    assert limits.stdout == b"(32, 32) (6, 7)\n"


def test_a_run_of_another_shape_discards_the_warm_sandbox(work):
    slot, runner = work()
    run(runner, slot, "print(1)")
    warm = runner._warm
    # a compile: the code dir writable; the warm sandbox has it read-only
    wrote = run(runner, slot, "open('out', 'w').write('built')", writable_code=True)
    assert wrote.exit_code == 0 and (slot.code / "out").read_text() == "built"
    assert not warm.alive()
    # the sandbox warmed next is for the program's run: read-only again
    denied = run(runner, slot, "open('out', 'w').write('x')")
    assert denied.exit_code != 0 and b"Read-only file system" in denied.stderr


def test_a_warm_sandbox_that_died_is_replaced(work):
    slot, runner = work()
    run(runner, slot, "print(1)")
    runner._warm.discard()
    assert run(runner, slot, "print(2)").stdout == b"2\n"


def test_with_one_cgroup_or_prewarm_off_nothing_waits_between_runs(work):
    for slot, runner in (work(prewarm=False), work(spare=False)):
        assert run(runner, slot, "print(3)").stdout == b"3\n"
        if slot.cgroup is not None or not runner.prewarm:
            assert runner._warm is None
