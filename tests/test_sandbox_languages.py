"""Every language beyond Python and C++ (Java, Go, Rust, JavaScript, Bash, Ruby) through
a real sandbox service, with each runner: the verdicts, and the attacks of
tests/test_sandbox_attacks.py written in that language (tests/language_programs.py).

A runtime must not weaken the sandbox: whatever the JVM, Go's runtime or V8 need (more
address space, threads, a config dir of the host) is declared in its registry entry,
and their programs are held to the same limits and walls as everyone's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from k1rl.protocol import RunCodeRequest, RunCodeResult, TestCase
from tests.sandbox_engines import RUNNERS, serve
from sandbox import languages
from tests.language_programs import PROGRAMS
from tests.test_sandbox_attacks import _no_process_left, against_a_host_listener

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")

PROJECT = Path(__file__).resolve().parents[1]
# each language's toolchain: `make test` installs them (SANDBOX_LANGUAGE_PACKAGES)
TOOLCHAIN = {"java": "/usr/bin/javac", "go": "/usr/bin/go", "rust": "/usr/bin/rustc",
             "javascript": "/usr/bin/node", "bash": "/usr/bin/bash", "ruby": "/usr/bin/ruby"}
LANGUAGES = [pytest.param(name, marks=pytest.mark.skipif(
    not os.path.exists(tool), reason=f"needs {tool} (make test installs it)"))
    for name, tool in TOOLCHAIN.items()]


@pytest.fixture(scope="module", params=RUNNERS)
def sandbox(request):
    uid_base = {"bwrap": 62600, "podman": 62700, "docker": 62760}[request.param]
    yield from serve(request.param, uid_base, "lang")


def run(sandbox, language: str, program: str, *stdins: str, **kw) -> RunCodeResult:
    client, _ = sandbox
    tests = [TestCase(stdin=s) for s in stdins] or [TestCase()]
    req = RunCodeRequest(language=language, source=PROGRAMS[language][program], tests=tests,
                         **kw)
    return client.call("run_code", req, RunCodeResult, timeout_s=300)


def still_serves(sandbox, language: str) -> None:
    client, _ = sandbox
    r = client.call("run_code", RunCodeRequest(
        language=language, source=PROGRAMS[language]["add"],
        tests=[TestCase(stdin="41", expected="42")]), RunCodeResult, timeout_s=300)
    assert r.verdict == "accepted", r


def test_every_language_is_one_registry_entry_with_its_toolchain_under_usr():
    for name in TOOLCHAIN:
        lang = languages.get(name)
        command = lang.compile or lang.run
        assert command[0].startswith("/usr/bin/"), (name, command)
        assert set(PROGRAMS[name]) >= {"add", "crash", "broken", "loop", "memory", "flood",
                                       "fork", "network", "files"}
    assert languages.get("nodejs") is languages.get("javascript")
    assert languages.get("golang") is languages.get("go")


# ----------------------------------------------------------------- verdicts

@pytest.mark.parametrize("language", LANGUAGES)
def test_a_correct_program_is_accepted_and_a_wrong_answer_caught(sandbox, language):
    client, _ = sandbox
    req = RunCodeRequest(language=language, source=PROGRAMS[language]["add"], tests=[
        TestCase(stdin="41", expected="42"), TestCase(stdin="-8", expected="-7"),
        TestCase(stdin="1", expected="3")])
    r = client.call("run_code", req, RunCodeResult, timeout_s=300)
    assert [t.verdict for t in r.tests] == ["accepted", "accepted", "wrong_answer"], r
    assert r.verdict == "wrong_answer"
    assert (r.compile is not None) == bool(languages.get(language).compile)


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_runtime_error(sandbox, language):
    r = run(sandbox, language, "crash")
    assert r.verdict == "runtime_error", r
    assert r.tests[0].exit_code != 0 and r.tests[0].stderr


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_program_that_does_not_compile(sandbox, language):
    r = run(sandbox, language, "broken", "1", "2")
    if languages.get(language).compile:
        assert r.verdict == "compile_error" and r.compile.output and r.skipped == 2, r
    else:  # interpreters find it when they run it
        assert r.verdict == "runtime_error" and r.tests[0].stderr, r


# ----------------------------------------------------------------- attacks

@pytest.mark.parametrize("language", LANGUAGES)
def test_an_infinite_loop(sandbox, language):
    r = run(sandbox, language, "loop", time_limit_s=1.0)
    assert r.verdict == "time_limit", r
    assert r.tests[0].cpu_s >= 0.9 or r.tests[0].wall_s >= 3.0
    still_serves(sandbox, language)


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_memory_bomb(sandbox, language):
    r = run(sandbox, language, "memory", memory_limit_mb=128, time_limit_s=10)
    assert r.verdict == "memory_limit", r
    assert r.tests[0].memory_kb <= 200 * 1024
    still_serves(sandbox, language)


@pytest.mark.parametrize("language", LANGUAGES)
def test_gigabytes_of_output(sandbox, language):
    r = run(sandbox, language, "flood", output_limit_kb=1024, time_limit_s=5)
    assert r.verdict == "output_limit", r
    still_serves(sandbox, language)


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_fork_bomb(sandbox, language):
    r = run(sandbox, language, "fork", time_limit_s=1.0, wall_limit_s=3.0)
    # the bomb spins until its time is up, its copies fill the memory cgroup first, or
    # its runtime gives up when the process limit refuses it a thread (Go's does)
    assert r.verdict in ("time_limit", "memory_limit", "runtime_error"), r
    assert r.tests[0].wall_s < 10
    still_serves(sandbox, language)
    _no_process_left(sandbox)


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_network_to_a_host_loopback_listener(sandbox, language):
    r, connected = against_a_host_listener(
        lambda port: run(sandbox, language, "network", str(port)))
    assert not connected
    assert r.verdict == "runtime_error" and "CONNECTED" not in r.tests[0].stdout, r
    assert "blocked" in r.tests[0].stdout, r


@pytest.mark.parametrize("language", LANGUAGES)
def test_host_files_are_invisible_and_nothing_outside_scratch_is_writable(
        sandbox, language, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's")
    secret.chmod(0o644)  # readable by anyone on the host: only the sandbox may hide it
    reads = [str(secret), str(PROJECT / "pyproject.toml"), "/etc/shadow"]
    if sandbox[1].service.cfg.runner != "docker":  # see test_sandbox_attacks.host_secrets
        reads.append("/etc/passwd")
    writes = [str(PROJECT / f"pwned-{language}"), f"/usr/pwned-{language}",
              f"/code/pwned-{language}", f"/etc/pwned-{language}", str(tmp_path / "pwned")]
    stdin = "".join(f"R {p}\n" for p in reads) + "".join(f"W {p}\n" for p in writes) + \
        "W /tmp/scratch-is-writable\n"
    r = run(sandbox, language, "files", stdin)
    out = r.tests[0].stdout
    assert r.verdict == "accepted", r
    assert "READ" not in out, out
    assert out.count("WROTE") == 1 and "WROTE /tmp/scratch-is-writable" in out, out
    assert out.count("denied") == len(reads) + len(writes), out
    for p in writes:
        assert not os.path.exists(p), p


# ----------------------------------------------------------------- compile cache

COMPILED = [p for p in LANGUAGES if languages.get(p.values[0]).compile]


@pytest.mark.parametrize("language", COMPILED)
def test_a_program_sent_again_is_not_compiled_again(sandbox, language):
    client, _ = sandbox
    nonce = f"\n// {os.urandom(8).hex()}\n"  # a source no other test has compiled

    def send(program: str, source_tail: str = nonce) -> RunCodeResult:
        req = RunCodeRequest(language=language, source=PROGRAMS[language][program] + source_tail,
                             tests=[TestCase(stdin="41", expected="42")])
        return client.call("run_code", req, RunCodeResult, timeout_s=300)

    first, again = send("add"), send("add")
    assert first.verdict == again.verdict == "accepted"
    assert not first.compile.cached and again.compile.cached
    assert again.compile.time_s < first.compile.time_s
    # a compile error is the same error the next time
    broken, broken_again = send("broken"), send("broken")
    assert broken_again.compile.cached and broken_again.verdict == "compile_error"
    assert broken_again.compile.output == broken.compile.output
    # any change to the source is a new program
    assert not send("add", nonce + "\n").compile.cached
