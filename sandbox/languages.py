"""Languages the sandbox runs: how to compile a source file and how to run the result.

Adding a language is one entry in LANGUAGES (and its Debian package in the Makefile's
SANDBOX_LANGUAGE_PACKAGES and sandbox/Dockerfile): the file name the source is written to,
an optional compile command and the run command. Commands are argv lists, never shell
strings; ``{src}`` and ``{exe}`` are file names inside the work dir, ``{options}`` expands
to the request's compile options and ``{memory_mb}`` to the run's memory limit (for
runtimes that size their own heap). Compilers run inside the same isolation as programs
(a compiler is an attack surface too), with the ``compile_*`` limits below.

Address space: every run has an RLIMIT_AS of its memory limit plus ``address_space_mb``.
The JVM, Go's runtime and V8 reserve gigabytes of address space they never touch, so
their entries raise it; what they do touch is bounded by the memory cgroup (when the host
has one) and by their own heap limit, set from ``{memory_mb}``.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Language:
    name: str
    source_file: str
    run: tuple[str, ...]
    compile: tuple[str, ...] = ()
    # compilers need far more than the programs they build
    compile_time_s: float = 30.0
    compile_memory_mb: int = 1024
    # other names requests may use (matched case-insensitively)
    aliases: tuple[str, ...] = field(default=())
    # address space beyond the memory limit (see the module doc), for runs and compiles
    address_space_mb: int = 64
    compile_address_space_mb: int = 64
    # environment of compiles and runs, beside PATH, HOME=TMPDIR=/tmp and LANG
    env: tuple[tuple[str, str], ...] = ()
    # host paths (glob patterns) the toolchain reads besides /usr, bound read-only
    host_paths: tuple[str, ...] = ()
    # what the runtime prints on stderr when it runs out of memory
    memory_errors: tuple[bytes, ...] = ()

    def compile_argv(self, options: list[str]) -> list[str]:
        return _expand(self.compile, self, options, 0)

    def run_argv(self, memory_mb: int = 0) -> list[str]:
        return _expand(self.run, self, [], memory_mb)


def _expand(template: tuple[str, ...], lang: Language, options: list[str],
            memory_mb: int) -> list[str]:
    argv: list[str] = []
    for item in template:
        if item == "{options}":
            argv += options
        else:
            argv.append(item.format(src=lang.source_file, exe="prog", memory_mb=memory_mb))
    return argv


LANGUAGES: dict[str, Language] = {}


def register(lang: Language) -> Language:
    for name in (lang.name, *lang.aliases):
        if name in LANGUAGES:
            raise ValueError(f"language {name!r} is already registered")
        LANGUAGES[name] = lang
    return lang


def get(name: str) -> Language:
    try:
        return LANGUAGES[name.lower()]
    except KeyError:
        known = ", ".join(sorted({lang.name for lang in LANGUAGES.values()}))
        raise ValueError(f"unknown language {name!r} (known: {known})") from None


def host_paths() -> list[str]:
    """Every registered language's extra host paths that exist here (glob patterns
    expanded: a JDK's config dir is named after its version)."""
    return sorted({match for lang in LANGUAGES.values() for pattern in lang.host_paths
                   for match in glob.glob(pattern)})


register(Language(
    name="python", aliases=("python3", "py"), source_file="main.py",
    # -S: no site-packages scan (faster start, nothing from the host's installs);
    # -B: no .pyc writes into the read-only code dir
    run=("/usr/bin/python3", "-S", "-B", "main.py"),
))
register(Language(
    name="cpp", aliases=("c++", "cxx"), source_file="main.cpp",
    compile=("/usr/bin/g++", "-std=c++17", "-O2", "-pipe", "{options}", "-o", "{exe}", "{src}"),
    run=("./prog",),
))
register(Language(
    name="c", source_file="main.c",
    compile=("/usr/bin/gcc", "-std=c11", "-O2", "-pipe", "{options}", "-o", "{exe}", "{src}",
             "-lm"),
    run=("./prog",),
))
_JVM = ("-XX:+UseSerialGC", "-Xshare:auto", "-XX:ReservedCodeCacheSize=64m",
        "-XX:CompressedClassSpaceSize=64m", "-XX:MaxMetaspaceSize=128m")
register(Language(
    name="java", source_file="Main.java",
    compile=("/usr/bin/javac", *(f"-J{flag}" for flag in _JVM), "-J-Xmx512m", "-encoding",
             "UTF-8", "{options}", "{src}"),
    run=("/usr/bin/java", *_JVM, "-Xmx{memory_mb}m", "-Xss64m", "-cp", ".", "Main"),
    host_paths=("/etc/java-*-openjdk",),
    address_space_mb=2048, compile_address_space_mb=1024,
    memory_errors=(b"java.lang.OutOfMemoryError",),
))
_GO_ENV = (("GOCACHE", "/tmp/go-build"), ("GOPATH", "/tmp/go"), ("GO111MODULE", "off"),
           ("CGO_ENABLED", "0"))
register(Language(
    name="go", aliases=("golang",), source_file="main.go",
    compile=("/usr/bin/go", "build", "{options}", "-o", "{exe}", "{src}"),
    run=("./prog",), env=_GO_ENV,
    address_space_mb=1024, compile_address_space_mb=4096,
    memory_errors=(b"runtime: out of memory",),
))
register(Language(
    name="rust", aliases=("rs",), source_file="main.rs",
    compile=("/usr/bin/rustc", "--edition", "2021", "-O", "{options}", "-o", "{exe}", "{src}"),
    run=("./prog",), compile_address_space_mb=4096,
    memory_errors=(b"memory allocation of",),
))
register(Language(
    name="javascript", aliases=("js", "node", "nodejs"), source_file="main.js",
    run=("/usr/bin/node", "--max-old-space-size={memory_mb}", "main.js"),
    address_space_mb=2048,
    memory_errors=(b"JavaScript heap out of memory",),
))
register(Language(
    name="bash", aliases=("sh", "shell"), source_file="main.sh",
    run=("/usr/bin/bash", "main.sh"),
    memory_errors=(b"cannot allocate",),
))
register(Language(
    name="ruby", aliases=("rb",), source_file="main.rb",
    # no RubyGems: a 4x faster start (~90 -> ~20 ms); the standard library still loads
    run=("/usr/bin/ruby", "--disable=gems", "main.rb"),
    memory_errors=(b"NoMemoryError", b"failed to allocate memory"),
))
