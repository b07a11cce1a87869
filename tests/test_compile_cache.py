"""The compile cache (sandbox/compile_cache.py): a program compiled once is copied, not
compiled, the next time; what it keeps, for how long, and what it never keeps."""

from __future__ import annotations

import os
import stat

from k1rl.protocol import CompileOutcome
from sandbox.compile_cache import CompileCache

OK = CompileOutcome(ok=True, exit_code=0, time_s=0.8, output="")


def compiled_dir(tmp_path, name="build"):
    d = tmp_path / name
    d.mkdir()
    (d / "Main.java").write_text("class Main {}")
    (d / "Main.class").write_bytes(b"\xca\xfe")
    (d / "Main$1.class").write_bytes(b"\xca\xfe\x01")
    (d / "prog").write_bytes(b"\x7fELF")
    os.chmod(d / "prog", 0o755)
    return d


def test_the_key_is_the_language_the_command_and_the_source():
    k = CompileCache.key("java", ["javac", "Main.java"], b"class Main {}")
    assert k == CompileCache.key("java", ["javac", "Main.java"], b"class Main {}")
    assert k != CompileCache.key("java", ["javac", "Main.java"], b"class Main { }")
    assert k != CompileCache.key("java", ["javac", "-g", "Main.java"], b"class Main {}")
    assert k != CompileCache.key("kotlin", ["javac", "Main.java"], b"class Main {}")
    # argv parts cannot run into each other
    assert CompileCache.key("c", ["a", "bc"], b"") != CompileCache.key("c", ["ab", "c"], b"")


def test_outputs_are_restored_with_their_modes_for_the_slot_uid(tmp_path):
    cache = CompileCache(tmp_path / "cache", max_entries=8)
    cache.store("k", compiled_dir(tmp_path), "Main.java", OK)
    into = tmp_path / "slot"
    into.mkdir()
    hit = cache.restore("k", into, os.getuid(), time_s=10)
    assert hit.cached and hit.ok and hit.exit_code == 0
    assert sorted(p.name for p in into.iterdir()) == ["Main$1.class", "Main.class", "prog"]
    assert (into / "Main.class").read_bytes() == b"\xca\xfe"
    assert os.stat(into / "prog").st_mode & stat.S_IXUSR
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700  # no program sees it


def test_a_miss_and_a_compile_slower_than_the_request_allows(tmp_path):
    cache = CompileCache(tmp_path / "cache", max_entries=8)
    assert cache.restore("unknown", tmp_path, os.getuid(), time_s=10) is None
    cache.store("k", compiled_dir(tmp_path), "Main.java", OK)
    # it took 0.8 s: a request allowing 0.5 s compiles again (and times out as it asks)
    assert cache.restore("k", tmp_path / "build", os.getuid(), time_s=0.5) is None


def test_compiles_stopped_by_a_limit_are_not_kept(tmp_path):
    cache = CompileCache(tmp_path / "cache", max_entries=8)
    d = compiled_dir(tmp_path)
    cache.store("timeout", d, "Main.java", CompileOutcome(ok=False, timed_out=True))
    cache.store("killed", d, "Main.java", CompileOutcome(ok=False, exit_code=None))
    assert not (tmp_path / "cache" / "timeout").exists()
    assert not (tmp_path / "cache" / "killed").exists()
    failed = CompileOutcome(ok=False, exit_code=1, output="Main.java:1: error")
    cache.store("error", d, "Main.java", failed)
    assert cache.restore("error", d, os.getuid(), time_s=10).output == failed.output


def test_symlinks_and_directories_are_not_kept(tmp_path):
    cache = CompileCache(tmp_path / "cache", max_entries=8)
    d = compiled_dir(tmp_path)
    (d / "link").symlink_to("/etc/hostname")
    (d / "sub").mkdir()
    cache.store("k", d, "Main.java", OK)
    assert sorted(p.name for p in (tmp_path / "cache" / "k").iterdir()) == \
        [".outcome.json", "Main$1.class", "Main.class", "prog"]


def test_the_least_recently_used_entries_go_first(tmp_path):
    cache = CompileCache(tmp_path / "cache", max_entries=2)
    d = compiled_dir(tmp_path)
    cache.store("a", d, "Main.java", OK)
    os.utime(tmp_path / "cache" / "a", (1, 1))
    cache.store("b", d, "Main.java", OK)
    os.utime(tmp_path / "cache" / "b", (2, 2))
    cache.restore("a", tmp_path / "build", os.getuid(), time_s=10)  # a is used again
    cache.store("c", d, "Main.java", OK)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a", "c"]


def test_a_second_store_of_the_same_program_keeps_the_first(tmp_path):
    cache = CompileCache(tmp_path / "cache", max_entries=8)
    cache.store("k", compiled_dir(tmp_path, "one"), "Main.java", OK)
    other = compiled_dir(tmp_path, "two")
    (other / "prog").write_bytes(b"different")
    cache.store("k", other, "Main.java", OK)
    assert (tmp_path / "cache" / "k" / "prog").read_bytes() == b"\x7fELF"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k"]  # no temp dirs left
