"""The sandbox service on ordinary programs: verdicts, checkers, languages, APIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from k1rl.config import SandboxConfig
from k1rl.protocol import Checker, RunCodeRequest, RunCodeResult, TestCase
from tests.sandbox_engines import RUNNERS, serve
from sandbox import languages
from sandbox.checkers import compare

needs_bwrap = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")


# ------------------------------------------------------------------ checkers (pure)


def test_exact_checker_is_byte_exact():
    assert compare(Checker(name="exact"), "3\n", "3\n") == (True, "")
    ok, why = compare(Checker(name="exact"), "3", "3\n")
    assert not ok and "1 characters, expected 2" in why


def test_whitespace_checker_compares_tokens():
    assert compare(Checker(name="whitespace"), "1  2\n3\n\n", "1 2 3")[0]
    ok, why = compare(Checker(name="whitespace"), "1 2 4", "1 2 3")
    assert not ok and "token 3" in why


def test_float_checker_uses_absolute_or_relative_tolerance():
    c = Checker(name="float", abs_tol=1e-6, rel_tol=1e-6)
    assert compare(c, "0.30000000000000004 x", "0.3 x")[0]
    assert compare(c, "1000000.5", "1000000.0")[0]        # relative
    assert not compare(c, "0.31", "0.3")[0]
    assert compare(c, "nan", "nan")[0] and not compare(c, "nan", "0")[0]
    assert not compare(c, "0.3 y", "0.3 x")[0]            # non-numbers must match exactly
    assert not compare(c, "0.3", "0.3 0.4")[0]
    assert not compare(c, "inf", "1e308")[0]


def test_custom_checker_needs_a_program():
    with pytest.raises(ValueError, match="custom checker needs"):
        Checker(name="custom")


def test_languages_registry():
    assert languages.get("Python3") is languages.get("python")
    assert languages.get("c++").compile_argv(["-DX=1"])[:2] == ["/usr/bin/g++", "-std=c++17"]
    assert "-DX=1" in languages.get("cpp").compile_argv(["-DX=1"])
    with pytest.raises(ValueError, match="unknown language 'cobol'"):
        languages.get("cobol")


def test_runners_are_registered_by_name_and_an_unknown_one_fails_at_config_load():
    from k1rl.config import ConfigError, RunConfig
    from sandbox import runners
    from sandbox.bubblewrap import BwrapRunner
    from sandbox.docker_api import DockerRunner
    from sandbox.podman import PodmanRunner

    assert runners.available() == ["bwrap", "docker", "podman"]
    assert (runners.get("bwrap"), runners.get("podman"), runners.get("docker")) == \
        (BwrapRunner, PodmanRunner, DockerRunner)
    with pytest.raises(ConfigError, match=r"sandbox.runner: 'nsjail' — unknown sandbox runner "
                                          r"'nsjail' \(registered: bwrap, docker, podman\)"):
        RunConfig.from_yaml_text("sandbox: {runner: nsjail}")


def test_the_docker_runner_says_when_no_engine_answers_at_its_url(tmp_path):
    from sandbox.docker_api import DockerRunner

    with pytest.raises(RuntimeError, match="no Docker Engine API answers at "
                                           "unix:///nonexistent/docker.sock"):
        DockerRunner(tmp_path / "rootfs", "unix:///nonexistent/docker.sock")


@needs_bwrap
def test_a_runner_is_built_from_the_sandbox_config(tmp_path):
    from sandbox import runners

    runner = runners.create(SandboxConfig(work_root=str(tmp_path)), in_empty_netns=True)
    assert runner.name == "bwrap" and not runner.netns_per_run
    assert runner.root == tmp_path / "rootfs"


# ------------------------------------------------------------------ the service




@pytest.fixture(scope="module", params=RUNNERS)
def sandbox(request):
    uid_base = {"bwrap": 62100, "podman": 62300, "docker": 62360}[request.param]
    yield from serve(request.param, uid_base, "test", http_port=0)


def run(sandbox, **kw) -> RunCodeResult:
    client, _ = sandbox
    return client.call("run_code", RunCodeRequest(**kw), RunCodeResult, timeout_s=300)


SUM = {
    "python": "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
    "cpp": "#include <iostream>\nint main(){long s=0,x;while(std::cin>>x)s+=x;std::cout<<s<<'\\n';}",
    "c": "#include <stdio.h>\nint main(){long s=0,x;while(scanf(\"%ld\",&x)==1)s+=x;"
         "printf(\"%ld\\n\",s);return 0;}",
}
SUM_TESTS = [TestCase(stdin="1 2 3", expected="6"), TestCase(stdin="10\n-4\n", expected="6\n"),
             TestCase(stdin="", expected="0")]


@needs_bwrap
@pytest.mark.parametrize("language", ["python", "cpp", "c"])
def test_a_correct_program_is_accepted_on_every_test(sandbox, language):
    r = run(sandbox, language=language, source=SUM[language], tests=SUM_TESTS)
    assert r.verdict == "accepted" and r.passed == 3, r
    assert (r.compile is None) == (language == "python")
    assert all(t.cpu_s < 1 and t.wall_s < 5 for t in r.tests)
    assert r.tests[0].stdout.strip() == "6"


@needs_bwrap
def test_wrong_answer_on_some_tests(sandbox):
    src = "import sys\nxs = list(map(int, sys.stdin.read().split()))\nprint(max(xs) * 2)\n"
    r = run(sandbox, language="python", source=src, tests=SUM_TESTS[:2])
    assert r.verdict == "wrong_answer"
    assert [t.verdict for t in r.tests] == ["accepted", "wrong_answer"]
    assert "token 1: '20', expected '6'" in r.tests[1].detail


@needs_bwrap
def test_stop_on_first_failure_skips_the_rest(sandbox):
    r = run(sandbox, language="python", source="print(0)", tests=SUM_TESTS,
            stop_on_first_failure=True)
    assert [t.verdict for t in r.tests] == ["wrong_answer"] and r.skipped == 2


@needs_bwrap
def test_compile_error_reports_the_compiler_output_and_runs_nothing(sandbox):
    r = run(sandbox, language="cpp", source="int main() { return undeclared; }", tests=SUM_TESTS)
    assert r.verdict == "compile_error" and not r.tests and r.skipped == 3
    assert "undeclared" in r.compile.output and not r.compile.ok


@needs_bwrap
def test_compile_options_are_passed(sandbox):
    src = "#include <cstdio>\nint main(){ printf(\"%d\\n\", VALUE); }"
    r = run(sandbox, language="cpp", source=src, compile_options=["-DVALUE=41+1"],
            tests=[TestCase(expected="42")])
    assert r.verdict == "accepted", r


@needs_bwrap
@pytest.mark.parametrize("language,src", [
    ("python", "import sys\nsys.exit(3)"),
    ("python", "raise ValueError('boom')"),
    ("cpp", "int main(){ int* p = nullptr; return *p; }"),
    ("c", "#include <stdlib.h>\nint main(){ abort(); }"),
])
def test_runtime_errors(sandbox, language, src):
    r = run(sandbox, language=language, source=src)
    assert r.verdict == "runtime_error", r
    assert r.tests[0].detail.startswith(("exit code", "killed by"))


@needs_bwrap
def test_float_and_custom_checkers_in_the_service(sandbox):
    r = run(sandbox, language="python", source="print(1/3)",
            tests=[TestCase(expected="0.333333")], checker=Checker(name="float", abs_tol=1e-5))
    assert r.verdict == "accepted"
    # a checker that accepts any permutation of the expected numbers
    checker = ("import sys\ninp, exp, out = (open(f).read().split() for f in sys.argv[1:])\n"
               "ok = sorted(exp) == sorted(out)\nprint('ok' if ok else 'not a permutation')\n"
               "sys.exit(0 if ok else 1)\n")
    tests = [TestCase(stdin="3 1 2", expected="1 2 3")]
    good = run(sandbox, language="python", source="print(3, 2, 1)", tests=tests,
               checker=Checker(name="custom", source=checker))
    bad = run(sandbox, language="python", source="print(3, 3, 1)", tests=tests,
              checker=Checker(name="custom", source=checker))
    assert good.verdict == "accepted" and bad.verdict == "wrong_answer"
    assert "not a permutation" in bad.tests[0].detail
    broken = run(sandbox, language="python", source="print(1)", tests=tests,
                 checker=Checker(name="custom", source="raise SystemExit(7)"))
    assert broken.verdict == "sandbox_error" and "checker failed" in broken.tests[0].detail


@needs_bwrap
def b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


@needs_bwrap
def test_input_files_are_in_the_working_dir_and_fetched_files_come_back_per_test(sandbox):
    source = ("import sys\nn = open('in/n.txt').read()\n"
              "open('out.txt', 'w').write(n + sys.stdin.read())\nprint('ok')")
    r = run(sandbox, language="python", source=source, files={"in/n.txt": b64("7")},
            fetch_files=["out.txt"], tests=[TestCase(stdin="a"), TestCase(stdin="b")])
    assert r.verdict == "accepted", r
    assert [t.files for t in r.tests] == [{"out.txt": b64("7a")}, {"out.txt": b64("7b")}]


def test_file_paths_must_stay_in_the_working_dir_and_contents_be_base64():
    from pydantic import ValidationError

    for bad in ("/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "", "d/"):
        with pytest.raises(ValidationError, match="relative to the program's working"):
            RunCodeRequest(language="python", source="", files={bad: ""})
        with pytest.raises(ValidationError, match="relative to the program's working"):
            RunCodeRequest(language="python", source="", fetch_files=[bad])
    with pytest.raises(ValidationError, match="'a.txt'\\]: not base64"):
        RunCodeRequest(language="python", source="", files={"a.txt": "%%%"})


def test_unknown_language_is_a_clear_error_not_a_verdict(sandbox):
    from k1rl.rpc import RemoteError

    with pytest.raises(RemoteError, match="unknown language 'cobol'"):
        run(sandbox, language="cobol", source="DISPLAY 'HI'.")


@needs_bwrap
def test_http_api(sandbox):
    _, servers = sandbox
    base = f"http://127.0.0.1:{servers.http_port}"
    health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=10).read())
    assert health["ready"] and health["workers"] == 2
    assert health["runner"] == servers.service.cfg.runner

    def post(body: bytes):
        req = urllib.request.Request(f"{base}/run_code", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            resp = urllib.request.urlopen(req, timeout=60)
            return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post(json.dumps({"language": "python", "source": "print(input()[::-1])",
                                    "tests": [{"stdin": "abc", "expected": "cba"}]}).encode())
    assert status == 200 and body["verdict"] == "accepted"
    status, body = post(b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = post(json.dumps({"language": "python"}).encode())
    assert status == 400 and body["details"][0]["loc"] == ["source"]
    status, body = post(json.dumps({"language": "cobol", "source": "x"}).encode())
    assert status == 400 and "unknown language" in body["error"]


@needs_bwrap
def test_the_http_api_takes_a_bearer_token_when_given_one(tmp_path):
    from k1rl.launch import free_tcp_address
    from sandbox.server import Servers

    (tmp_path / "token").write_text("s3cret-token\n")
    cfg = SandboxConfig(address=free_tcp_address(), http_port=0, workers=1, uid_base=62400,
                        http_host="0.0.0.0", http_token_file=str(tmp_path / "token"),
                        work_root=f"/tmp/k1rl-sandbox-test-{os.getpid()}-token")
    servers = Servers(cfg).start()
    base = f"http://127.0.0.1:{servers.http_port}"
    body = json.dumps({"language": "python", "source": "print(1)",
                       "tests": [{"stdin": "", "expected": "1"}]}).encode()

    def post(headers: dict[str, str]) -> int:
        req = urllib.request.Request(f"{base}/run_code", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            return urllib.request.urlopen(req, timeout=60).status
        except urllib.error.HTTPError as e:
            assert e.code != 401 or e.headers["WWW-Authenticate"].startswith("Bearer")
            return e.code

    try:
        assert post({}) == 401
        assert post({"Authorization": "Bearer wrong"}) == 401
        assert post({"Authorization": "Basic czNjcmV0LXRva2Vu"}) == 401
        assert post({"Authorization": "Bearer s3cret-token"}) == 200
        # probes need no token
        assert urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
    finally:
        servers.stop()


def test_a_sandbox_api_reachable_from_other_machines_needs_a_token():
    with pytest.raises(ValueError, match="sandbox.http_token_file: the HTTP API on '0.0.0.0'"):
        SandboxConfig(http_host="0.0.0.0")
    assert SandboxConfig(http_host="0.0.0.0", http_port=None).http_port is None  # ZMQ only


@needs_bwrap
def test_cli_run_prints_the_json_response(sandbox, tmp_path):
    client, servers = sandbox
    (tmp_path / "p.cpp").write_text("#include <cstdio>\nint main(){int a;scanf(\"%d\",&a);"
                                    "printf(\"%d\\n\",a*a);}")
    (tmp_path / "in").write_text("12")
    (tmp_path / "out").write_text("144")
    cmd = [sys.executable, "-m", "sandbox", "run", "--language", "cpp",
           "--source", str(tmp_path / "p.cpp"), "--stdin", str(tmp_path / "in"),
           "--expected", str(tmp_path / "out"), "--address", servers.rpc.address]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verdict"] == "accepted"
    # a service that is not there: said at once (the default wait for a result is 300 s),
    # with how to start one or run without one; exit code 1, not a traceback
    dead = [*cmd[:-1], "tcp://127.0.0.1:1"]
    started = time.monotonic()
    done = subprocess.run(dead, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert "nothing answers at tcp://127.0.0.1:1" in done.stderr
    assert "python -m sandbox serve" in done.stderr and "--local" in done.stderr


@needs_bwrap
def test_cli_run_local_runs_the_program_here_under_the_same_isolation(tmp_path):
    (tmp_path / "p.py").write_text("import os, socket\nprint(int(input()) * 2)\n"
                                   "print(os.getuid() != 0)\n"
                                   "socket.create_connection(('1.1.1.1', 53), timeout=1)\n")
    (tmp_path / "in").write_text("21")
    cmd = [sys.executable, "-m", "sandbox", "run", "--language", "python", "--local",
           "--source", str(tmp_path / "p.py"), "--stdin", str(tmp_path / "in"),
           "--address", "tcp://127.0.0.1:1"]  # never asked
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [test] = json.loads(done.stdout)["tests"]
    assert test["stdout"] == "42\nTrue\n"  # ran, not as root
    assert test["verdict"] == "runtime_error"  # and had no network


def test_the_container_runner_gets_the_same_seccomp_rules_as_bwrap():
    import socket

    from sandbox.seccomp import DENIED, oci_profile

    profile = json.loads(oci_profile())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in profile["syscalls"] if "args" not in rule for n in rule["names"]}
    assert denied == set(DENIED)
    assert all(rule["action"] == "SCMP_ACT_ERRNO" for rule in profile["syscalls"])
    # sockets: every family but Unix is refused
    guarded = {rule["names"][0]: rule["args"] for rule in profile["syscalls"] if "args" in rule}
    assert guarded == {name: [{"index": 0, "value": socket.AF_UNIX, "op": "SCMP_CMP_NE"}]
                       for name in ("socket", "socketpair")}


@needs_bwrap
def test_the_c_launcher_and_the_python_fallback_start_runs_alike(tmp_path_factory):
    """Rlimits, uid, groups and cgroup membership of a run, whichever way it starts."""
    from pathlib import Path

    from sandbox import cgroups
    from sandbox.bubblewrap import BwrapRunner
    from sandbox.isolation import Limits, Slot, build_launcher

    root = Path(f"/tmp/k1rl-sandbox-launch-{os.getpid()}")
    root.mkdir(mode=0o711)
    try:
        launcher = build_launcher(root)
        assert launcher is not None and os.access(launcher, os.X_OK)
        assert build_launcher(root) == launcher  # built once
        cgroup = cgroups.create(f"svc{os.getpid()}-wlaunch")
        slot = Slot(0, 62900, root / "w0", cgroup)
        slot.prepare()
        slot.write("main.py", b"import os, resource\nprint(os.getuid(), os.getgid(), "
                              b"os.getgroups(), [resource.getrlimit(getattr(resource, r)) "
                              b"for r in ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', "
                              b"'RLIMIT_NOFILE', 'RLIMIT_NPROC', 'RLIMIT_CORE')])\n")
        # within the address-space limit (264 MB), over the cgroup's memory limit (200 MB)
        slot.write("hog.py", b"x = bytearray(230 << 20)\nx[::4096] = b'1' * len(x[::4096])\n")
        limits = Limits(cpu_s=2.5, wall_s=10, memory_mb=200, output_bytes=1 << 16,
                        processes=20, open_files=32, scratch_mb=16)
        outputs = []
        for with_launcher in (launcher, None):
            runner = BwrapRunner(root / "rootfs", launcher=with_launcher)
            ex = runner.execute(slot, ["/usr/bin/python3", "-S", "main.py"], stdin=b"",
                                limits=limits)
            assert ex.exit_code == 0 and not ex.start_error, ex
            outputs.append(ex.stdout.decode())
            if cgroup is not None:  # born in the slot's cgroup: the OOM killer ends it
                hog = runner.execute(slot, ["/usr/bin/python3", "-S", "hog.py"], stdin=b"",
                                     limits=limits)
                assert hog.oom_killed and hog.exit_code != 0, hog
        assert outputs[0] == outputs[1]
        ids, limits_seen = outputs[0].split(" [(", 1)[0], outputs[0]
        assert ids == "62900 62900 []"
        assert "(3, 4), (276824064, 276824064), (16777216, 16777216), (32, 32), (24, 24), " \
               "(0, 0)" in limits_seen
        if cgroup is not None:
            cgroup.remove()
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
