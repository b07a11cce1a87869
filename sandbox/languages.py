"""Languages the sandbox runs: how to compile a source file and how to run the result.

Adding a language is one entry in LANGUAGES (and its toolchain in sandbox/Dockerfile):
the file name the source is written to, an optional compile command and the run
command. Commands are argv lists, never shell strings; ``{src}`` and ``{exe}`` are
file names inside the work dir and ``{options}`` expands to the request's compile
options. Compilers run inside the same isolation as programs (a compiler is an
attack surface too), with the ``compile_*`` limits below.
"""

from __future__ import annotations

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

    def compile_argv(self, options: list[str]) -> list[str]:
        return _expand(self.compile, self, options)

    def run_argv(self) -> list[str]:
        return _expand(self.run, self, [])


def _expand(template: tuple[str, ...], lang: Language, options: list[str]) -> list[str]:
    argv: list[str] = []
    for item in template:
        if item == "{options}":
            argv += options
        else:
            argv.append(item.format(src=lang.source_file, exe="prog"))
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
