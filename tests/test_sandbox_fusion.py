"""A SandboxFusion client pointed at k1rl's sandbox (sandbox/fusion.py).

The client below is written the way verl's ``sandbox_fusion`` reward talks to a
SandboxFusion server: a URL ending in ``/run_code``, all eight request fields in a JSON body
(compile and run timeouts equal, a memory limit), and the response classified from its
``status``, ``compile_result`` and ``run_result`` into success / wrong answer / compile
error / timeout / runtime error / sandbox error. Every case runs through a real sandbox
service over HTTP.
"""

from __future__ import annotations

import base64
import os

import pytest
import requests

from k1rl.config import SandboxConfig

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"),
                                reason="needs bubblewrap")


@pytest.fixture(scope="module")
def url():
    from k1rl.launch import free_tcp_address
    from sandbox.server import Servers

    cfg = SandboxConfig(address=free_tcp_address(), http_port=0, workers=2,
                        uid_base=62500, work_root=f"/tmp/k1rl-sandbox-fusion-{os.getpid()}")
    servers = Servers(cfg).start()
    yield f"http://127.0.0.1:{servers.http_port}/run_code"
    servers.stop()


def post(url: str, code: str, language: str = "python", stdin: str | None = None,
         timeout: float = 10, memory_limit_mb: int = 1024, **extra) -> requests.Response:
    payload = {"compile_timeout": timeout, "run_timeout": timeout, "code": code,
               "stdin": stdin, "memory_limit_MB": memory_limit_mb, "language": language,
               "files": {}, "fetch_files": [], **extra}
    return requests.post(url, json=payload, timeout=2 * timeout + 10,
                         headers={"Accept": "application/json"})


def classify(body: dict, expected: str | None) -> str:
    """What a SandboxFusion client makes of a response."""
    status, comp, ran = body["status"], body.get("compile_result"), body.get("run_result")
    if status == "SandboxError":
        return "sandbox_error"
    if status == "Failed":
        if comp and (comp["status"] in ("Error", "TimeLimitExceeded")
                     or (comp["status"] == "Finished" and comp["return_code"] != 0)):
            return "compile_error"
        if ran and ran["status"] == "TimeLimitExceeded":
            return "timeout"
        if ran and (ran["status"] == "Error" or ran["return_code"] != 0):
            return "runtime_error"
        return "unknown_failure"
    if status == "Success" and ran and ran["status"] == "Finished":
        out = ran["stdout"] if ran["stdout"] is not None else ""
        if expected is None or out.rstrip("\n") == expected.rstrip("\n"):
            return "success"
        return "wrong_answer"
    return "unexpected"


SUM = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_a_right_program_is_success_with_its_stdout(url):
    r = post(url, SUM, stdin="2 3\n")
    assert r.status_code == 200
    body = r.json()
    assert classify(body, "5") == "success"
    assert body["compile_result"] is None  # interpreted: no compile step
    run = body["run_result"]
    assert (run["status"], run["return_code"], run["stdout"], run["stderr"]) == \
        ("Finished", 0, "5\n", "")
    assert run["execution_time"] > 0 and body["files"] == {} and body["message"] == ""
    assert classify(body, "6") == "wrong_answer"


def test_a_compile_error_fails_with_the_compilers_message_and_no_run(url):
    body = post(url, "int main() { return x; }", language="cpp").json()
    assert classify(body, None) == "compile_error"
    assert body["status"] == "Failed" and body["run_result"] is None
    assert body["compile_result"]["return_code"] != 0
    assert "x" in body["compile_result"]["stderr"]
    ok = post(url, "#include <cstdio>\nint main(){printf(\"hi\\n\");}", language="cpp").json()
    assert classify(ok, "hi") == "success" and ok["compile_result"]["return_code"] == 0


def test_a_program_past_its_run_timeout_is_a_timeout_with_no_return_code(url):
    body = post(url, "while True: pass", timeout=1).json()
    assert classify(body, None) == "timeout"
    assert body["status"] == "Failed" and body["run_result"]["return_code"] is None


def test_a_crash_is_a_runtime_error_with_its_stderr(url):
    body = post(url, "raise SystemExit(3)").json()
    assert classify(body, None) == "runtime_error" and body["run_result"]["return_code"] == 3
    body = post(url, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)").json()
    assert body["run_result"]["return_code"] in (-11, 139)  # as asyncio or a shell says it
    body = post(url, "1/0").json()
    assert "ZeroDivisionError" in body["run_result"]["stderr"]


def test_hostile_code_stays_inside_through_this_api_too(url):
    body = post(url, "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                     "print('out')").json()
    assert classify(body, "out") == "runtime_error"
    body = post(url, "print(open('/etc/shadow').read())").json()
    assert classify(body, None) == "runtime_error"


def test_memory_limit_and_large_outputs_come_back_whole(url):
    body = post(url, "x = bytearray(300 << 20)\nprint(len(x))", memory_limit_mb=64).json()
    assert classify(body, None) == "runtime_error"
    big = post(url, "print('x' * 200000)").json()  # SandboxFusion returns up to 1 MiB
    assert classify(big, "x" * 200000) == "success"


def test_languages_this_sandbox_lacks_are_a_sandbox_error_and_unknown_ones_refused(url):
    body = post(url, "print 1", language="julia").json()
    assert classify(body, None) == "sandbox_error"
    assert "'julia' is not available" in body["message"] and "python" in body["message"]
    r = post(url, "x", language="brainfuck")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["language"]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_files_are_uploaded_before_the_run_and_fetched_after_it(url):
    code = ("data = open('data.txt').read() + open('in/more.txt').read()\n"
            "open('out.txt', 'w').write(data.upper())\nprint(len(data))")
    body = post(url, code, files={"data.txt": b64("ab"), "in/more.txt": b64("c"),
                                  "skipped.txt": None, "x/IGNORE_THIS_FILE": b64("z")},
                fetch_files=["out.txt", "never-written.txt"]).json()
    assert classify(body, "3") == "success", body
    assert body["files"] == {"out.txt": b64("ABC")}  # a missing file is left out


def test_a_fetched_path_never_follows_a_link_out_of_the_working_dir(url):
    code = ("import os\nos.symlink('/etc/hostname', 'leak.txt')\nos.mkdir('d')\n"
            "os.symlink('/etc', 'd/etc')\nos.mkfifo('pipe')\nprint('ok')")
    body = post(url, code, fetch_files=["leak.txt", "d/etc/hostname", "pipe"]).json()
    assert classify(body, "ok") == "success" and body["files"] == {}, body


def test_paths_outside_the_working_dir_are_refused_by_name(url):
    for field, value in (("files", {"/tmp/flag.txt": b64("x")}), ("fetch_files", ["/etc/x"]),
                         ("files", {"../up.txt": b64("x")}), ("fetch_files", ["a/../../b"]),
                         ("files", {"ok.txt": "not base64!"})):
        r = post(url, SUM, **{field: value})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == field, r.text
    # an unknown field is ignored, as SandboxFusion's server ignores it
    assert classify(post(url, SUM, stdin="1 1", extra_field=1).json(), "2") == "success"


def test_the_compile_timeout_is_honoured(url):
    # std::regex under -O2: seconds of g++ (~7 s here), far past half a second anywhere
    slow = ('#include <bits/stdc++.h>\n#include <regex>\nint main() { std::regex r("a+b*"); '
            'std::cout << std::regex_match("aab", r) << "\\n"; }\n')
    body = post(url, slow, language="cpp", compile_timeout=0.5, run_timeout=5).json()
    assert classify(body, None) == "compile_error"
    assert body["compile_result"]["status"] == "TimeLimitExceeded"
    assert body["compile_result"]["return_code"] is None and body["run_result"] is None


def test_the_health_check_of_sandboxfusion_clients(url):
    r = requests.get(url.replace("/run_code", "/v1/ping"), timeout=10)
    assert r.status_code == 200 and r.json() == "pong"
