"""The seccomp filter every sandboxed program runs under: compiled to BPF once and passed
to bwrap, or written as an OCI profile for podman/runc (the same rules).

Default allow, with the kernel's rarely needed and often exploited interfaces refused
(EPERM, so a program gets an error it can handle rather than a mysterious kill): no
tracing or reading other processes' memory, no mounts, namespaces, kernel modules,
keyrings, BPF, perf, io_uring or userfaultfd, no clock or host changes, and no sockets
except Unix ones (the network namespace is empty anyway; this also closes netlink).
Namespaces already keep the program away from the host; the filter shrinks the kernel
surface those namespaces rely on. Built with libseccomp through pyseccomp.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket

import pyseccomp as sc

DENIED = (
    # other processes and the kernel
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "iopl", "ioperm",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "add_key", "request_key", "keyctl",
    # mounts and namespaces (bwrap has finished its set-up when the filter applies)
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at", "fsopen", "fsmount", "fsconfig", "move_mount",
    "open_tree", "fspick", "mount_setattr",
    # the host
    "reboot", "swapon", "swapoff", "sethostname", "setdomainname", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "acct", "syslog", "quotactl", "vhangup",
    "personality",
)


def filter_pipe() -> int:
    """The read end of a pipe holding the filter, for bwrap's ``--seccomp FD`` (which reads
    it once; the caller closes its copy after handing it over)."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, filter_bytes())  # < pipe buffer: the filter is ~1 KB
    finally:
        os.close(write_fd)
    return read_fd


@functools.cache
def filter_bytes() -> bytes:
    """The BPF program, as bwrap --seccomp reads it from a file descriptor."""
    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (ValueError, RuntimeError, OSError):
            pass  # not a syscall on this architecture
    # sockets: Unix only
    f.add_rule(deny, "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    f.add_rule(deny, "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb") as out:
            f.export_bpf(out)
        chunks = []
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    return b"".join(chunks)


def oci_profile() -> str:
    """The same rules as an OCI/Docker seccomp profile (JSON), for podman --security-opt."""
    deny = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules = [{"names": list(DENIED), **deny}]
    for name in ("socket", "socketpair"):
        rules.append({"names": [name], **deny,
                      "args": [{"index": 0, "value": socket.AF_UNIX, "op": "SCMP_CMP_NE"}]})
    return json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}, indent=1)
