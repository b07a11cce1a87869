"""Code rewards: reward_svc runs the response's program in a real sandbox service."""

from __future__ import annotations

import json
import os

import pytest

from k1rl.config import RewardConfig, SandboxConfig
from k1rl.protocol import RewardItem, RewardRequest
from reward_svc.service import RewardService
from reward_svc.verifiers.code import extract_program

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")

TASK = json.dumps({"language": "python", "tests": [
    {"stdin": "2 3\n", "expected": "5"}, {"stdin": "10 -4\n", "expected": "6"},
    {"stdin": "0 0\n", "expected": "0"}]})
RIGHT = "Read two numbers and add them.\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
HALF = "```python\na, b = map(int, input().split())\nprint(a + b if b > 0 else 0)\n```"
CPP = ("```cpp\n#include <cstdio>\nint main(){long a,b;scanf(\"%ld %ld\",&a,&b);"
       "printf(\"%ld\\n\",a+b);}\n```")


def test_the_last_fenced_block_is_the_program():
    assert extract_program("no code") == (None, "")
    assert extract_program("```py\nx=1\n```\nbetter:\n```c++\nint main(){}\n```") == \
        ("cpp", "int main(){}\n")
    assert extract_program("```\nprint(1)\n```") == (None, "print(1)\n")


@pytest.fixture(scope="module")
def sandbox_address():
    from k1rl.launch import free_tcp_address
    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=None, workers=2, uid_base=62200,
                        work_root=f"/tmp/k1rl-sandbox-test-{os.getpid()}")
    servers = Servers(cfg).start()
    yield servers.rpc.address
    servers.stop()


def score(address: str, responses: list[str], **cfg):
    config = RewardConfig(sandbox_address=address, length_penalty_weight=0.0, **cfg)
    items = [RewardItem(group_id=0, response=r, answer=TASK, response_tokens=10,
                        verifier="code") for r in responses]
    with RewardService(config) as service:
        return service.score(RewardRequest(items=items))


def test_programs_are_rewarded_when_every_test_passes(sandbox_address):
    r = score(sandbox_address, [RIGHT, HALF, CPP, "I would add them.", "```python\n1/0\n```"])
    assert r.correct == [True, False, True, False, False]
    assert r.task_rewards == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert r.errors == []  # wrong programs are wrong answers, not errors


def test_fraction_reward(sandbox_address):
    r = score(sandbox_address, [RIGHT, HALF], code_reward="fraction")
    assert r.task_rewards == pytest.approx([1.0, 2 / 3])
    assert r.correct == [True, False]


def test_an_unreachable_sandbox_is_an_error_not_a_wrong_answer():
    r = score("tcp://127.0.0.1:1", [RIGHT, "no program here"], code_timeout_s=2.0)
    assert r.errors[0].startswith("sandbox unavailable")
    assert r.errors[1] == ""  # no program: judged (wrong) without the sandbox
    assert r.correct == [False, False]


def test_a_bad_task_is_a_data_error(sandbox_address):
    config = RewardConfig(sandbox_address=sandbox_address)
    item = RewardItem(group_id=3, response=RIGHT, answer="{}", response_tokens=1,
                      verifier="code")
    with RewardService(config) as service, pytest.raises(ValueError, match=r"items\[0\]"):
        service.score(RewardRequest(items=[item]))


@pytest.mark.parametrize("level", [1, 2])
def test_the_code_task_family_is_judged_by_running_its_programs(sandbox_address, level):
    from k1rl.data.tasks import generate_tasks

    task = generate_tasks("code", level, 1, seed=5)[0]
    off_by_one = task.target.replace("print(", "print(1 + ")
    items = [RewardItem(group_id=0, response=response, answer=task.answer, response_tokens=9,
                        verifier=task.verifier)
             for response in (task.target, task.target + "\nThe answer is 5.", off_by_one)]
    config = RewardConfig(sandbox_address=sandbox_address, length_penalty_weight=0.0)
    with RewardService(config) as service:
        r = service.score(RewardRequest(items=items))
    assert r.correct == [True, True, False]
    assert r.errors == []


def test_a_program_lost_with_its_sandbox_is_run_again_by_the_restarted_one(tmp_path):
    """The sandbox is SIGKILLed while it runs a program; its launcher restarts it and the
    program is sent again: a right answer, not a sandbox error."""
    import threading

    from k1rl.config import RunConfig
    from k1rl.launch import LocalCluster, free_tcp_address

    cfg = RunConfig()
    metrics_port = int(free_tcp_address().rsplit(":", 1)[1])
    cfg.sandbox = SandboxConfig(address=free_tcp_address(), http_port=None, workers=2,
                                metrics_port=metrics_port, uid_base=62400,
                                work_root=f"/tmp/k1rl-sandbox-restart-{os.getpid()}")
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    slow_task = json.dumps({"language": "python", "time_limit_s": 20,
                            "tests": [{"stdin": "2 3\n", "expected": "5"}]})
    slow = "```python\nimport time\ntime.sleep(3)\nprint(sum(map(int, input().split())))\n```"
    with LocalCluster(tmp_path / "logs") as cluster:
        first = cluster.start("sandbox", "sandbox", ["serve", "--config", str(config)],
                              cfg.sandbox.address)
        cluster.wait_ready(120)
        cluster.supervise(max_restarts=1, poll_s=0.2)
        threading.Thread(target=_kill_while_running, args=(metrics_port, first.proc.pid),
                         daemon=True).start()
        config_ = RewardConfig(sandbox_address=cfg.sandbox.address, length_penalty_weight=0.0)
        item = RewardItem(group_id=0, response=slow, answer=slow_task, response_tokens=10,
                          verifier="code")
        with RewardService(config_) as service:
            result = service.score(RewardRequest(items=[item]))
        assert cluster.restarts == {"sandbox": 1}
    assert result.errors in ([], [""]) and result.correct == [True]


def _kill_while_running(metrics_port: int, pid: int) -> None:
    """SIGKILL ``pid``'s group once its /metrics shows a run_code request in flight."""
    import signal
    import time
    import urllib.request

    running = 'k1rl_rpc_in_flight{method="run_code",service="sandbox"} 1.0'
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            if running in urllib.request.urlopen(url, timeout=1).read().decode():
                os.killpg(pid, signal.SIGKILL)
                return
        except OSError:
            pass
        time.sleep(0.05)
