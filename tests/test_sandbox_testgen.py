"""CYaRon test generation with k1.5's rules, against a real sandbox service."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from k1rl.config import ConfigError, SandboxConfig
from k1rl.protocol import RunCodeRequest, RunCodeResult
from k1rl.rpc import ThreadLocalClients
from sandbox.testgen import build_tests, generate_inputs, load_generator, load_problem

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")

EXAMPLES = Path(__file__).resolve().parents[1] / "sandbox" / "problems"
# sums past 2^31 wrap: wrong exactly on the cases with big values
INT32_SUM = r"""
#include <cstdio>
int main() { int n, s = 0, x; scanf("%d", &n); while (n--) { scanf("%d", &x); s += x; } printf("%d\n", s); }
"""


@pytest.fixture(scope="module")
def run():
    from k1rl.launch import free_tcp_address
    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=None, workers=2, uid_base=62300,
                        work_root=f"/tmp/k1rl-sandbox-test-{os.getpid()}")
    servers = Servers(cfg).start()
    clients = ThreadLocalClients(servers.rpc.address, timeout_s=300)

    def call(req: RunCodeRequest) -> RunCodeResult:
        return clients.call("run_code", req, RunCodeResult)

    yield call
    clients.close()
    servers.stop()


def problem_copy(tmp_path: Path, cases: int = 24, wrong: int = 0, extra_wrong: int = 0) -> Path:
    """array-sum with ``cases`` cases; ``wrong`` correct references replaced by the int32
    one, ``extra_wrong`` int32 references added."""
    d = tmp_path / "array-sum"
    shutil.copytree(EXAMPLES / "array-sum", d)
    spec = yaml.safe_load((d / "problem.yaml").read_text())
    spec["cases"] = cases
    (d / "problem.yaml").write_text(yaml.safe_dump(spec))
    solutions = sorted((d / "solutions").iterdir())
    for path in solutions[:wrong]:
        path.unlink()
    for i in range(wrong + extra_wrong):
        (d / "solutions" / f"wrong_int32_{i}.cpp").write_text(INT32_SUM)
    return d


def test_generation_is_reproducible_and_seeded_per_case():
    problem = load_problem(EXAMPLES / "max-subarray")
    gen = load_generator(EXAMPLES / "max-subarray")
    first = generate_inputs(gen, problem)
    assert len(first) == 50 and first == generate_inputs(gen, problem)
    assert len(set(first)) > 40


def test_the_shipped_examples_pass_the_rules(run, tmp_path):
    for name in ("array-sum", "max-subarray"):
        d = tmp_path / name
        shutil.copytree(EXAMPLES / name, d)
        result = build_tests(d, run)
        assert result.kept, result.reason
        assert len(result.tests) == result.cases_generated == 50
        assert len(result.passing_references) == len(result.references) == 10


def test_one_wrong_reference_is_outvoted_and_excluded(run, tmp_path):
    result = build_tests(problem_copy(tmp_path, extra_wrong=1), run)
    assert result.kept and len(result.tests) == 24  # 10 agree on every case
    assert "wrong_int32_0.cpp" not in result.passing_references
    assert len(result.passing_references) == 10
    assert result.references["wrong_int32_0.cpp"] < 24  # it fails the big-sum cases


def test_two_wrong_of_ten_drop_the_problem(run, tmp_path):
    result = build_tests(problem_copy(tmp_path, wrong=2), run)
    assert not result.kept
    assert result.reason == "8 references pass every kept case, need 9"


def test_cases_without_seven_agreeing_references_are_dropped(run, tmp_path):
    # 4 of 10 references wrap on big sums: 6 agree there, which is < 7
    result = build_tests(problem_copy(tmp_path, wrong=4), run)
    big = [t for t in result.tests if abs(int(t.expected)) >= 2**31]
    assert not big and 0 < len(result.tests) < 24
    assert result.kept  # on the cases left, all 10 agree


def test_too_few_references_is_a_clear_error(run, tmp_path):
    d = problem_copy(tmp_path)
    for path in sorted((d / "solutions").iterdir())[:2]:
        path.unlink()
    with pytest.raises(ConfigError, match="8 reference solutions, need 10"):
        build_tests(d, run)
