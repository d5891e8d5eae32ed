"""Least privilege for ``serve``: give up root once the sockets exist, and confine the
process to the system calls that serving needs (a seccomp allowlist).

Both happen in :func:`enter`, after every socket is bound and listening and before the
first connection is served: ``accept()`` on a socket that is already listening needs
no privilege, so nothing a front-end or a guest can reach ever runs as root, and the
allowlist has to cover serving only, not starting.  What can be checked beforehand is
checked by :func:`plan`, before anything is created, as ``serve`` does for every other
option.  docs/security.md has the threat model these serve.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import platform
import pwd
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .vhost_user.server import UnixListener

log = logging.getLogger(__name__)


class SandboxError(Exception):
    """The sandbox cannot be set up; the message says why, ``code`` is the exit status
    (2: the command line is wrong, 1: this host or this start failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- the user ------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who the server becomes: the user, its group and its supplementary groups."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def resolve_user(user: str, group: str | None = None) -> Identity:
    """The identity ``--user``/``--group`` name (names or numbers), checked before
    anything is created: an unknown name is an error now, not after the sockets exist.

    Supplementary groups are the user's own (``initgroups``, as QEMU's ``-run-with
    user=`` and systemd's ``User=`` do), so a group QEMU shares with the user works;
    a number with no passwd entry gets its group only, and needs ``--group``.
    """
    try:
        pw: pwd.struct_passwd | None = pwd.getpwnam(user)
    except KeyError:
        pw = None
        if not user.isdigit():
            raise SandboxError(f"--user: {user}: no such user", 2) from None
        try:
            pw = pwd.getpwuid(int(user))
        except KeyError:
            pw = None
    if group is not None:
        gid = _group_id(group)
    elif pw is not None:
        gid = pw.pw_gid
    else:
        raise SandboxError(f"--user: uid {user} has no passwd entry: give --group too", 2)
    uid = pw.pw_uid if pw is not None else int(user)
    if uid == 0:
        raise SandboxError(f"--user: {user} is root: name an unprivileged user", 2)
    name = pw.pw_name if pw is not None else user
    groups = os.getgrouplist(pw.pw_name, gid) if pw is not None else [gid]
    return Identity(name, uid, gid, tuple(sorted(set(groups))))


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise SandboxError(f"--group: {group}: no such group", 2) from None


def hand_over(listeners: Iterable[UnixListener], ident: Identity) -> None:
    """Give the socket files this process created to ``ident`` (mode unchanged).

    Connecting to a unix socket needs write permission on its file, so whoever owns
    it decides who may connect: after this, the server's user, and its group when
    ``--socket-mode`` lets the group in (QEMU in that group); the server itself needs
    the file only to remove it at exit.  The path is opened without following links
    and changed through that descriptor, so what is changed is the socket checked,
    never a file swapped in at the path meanwhile.
    """
    euid = os.geteuid()
    for sock in listeners:
        path = sock.path
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise SandboxError(f"{path}: cannot give the socket to {ident.name}: "
                               f"{e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != euid or st.st_nlink != 1:
                raise SandboxError(f"{path}: no longer the socket this server created; "
                                   "not changing its owner")
            os.chown(f"/proc/self/fd/{fd}", ident.uid, ident.gid)
        except OSError as e:
            raise SandboxError(f"{path}: cannot give the socket to {ident.name}: "
                               f"{e.strerror}") from None
        finally:
            os.close(fd)
        if not _may_unlink(path, ident):
            log.warning("%s: %s cannot remove it at exit (its directory is not writable "
                        "by that user): it stays, and the next start replaces it",
                        path, ident.name)


def _may_unlink(path: str, ident: Identity) -> bool:
    """Whether ``ident`` could unlink ``path`` (which it owns), by the mode bits alone:
    search on every directory the path names, write on its own (ACLs are not looked
    at).  A relative path starts at the working directory, which stays reachable."""
    d = os.path.dirname(path) or "."
    above = [d]
    while os.path.dirname(above[-1]) not in ("", above[-1]):
        above.append(os.path.dirname(above[-1]))
    try:
        return (all(_permits(os.stat(a), ident, 0o1) for a in above)
                and _permits(os.stat(d), ident, 0o3))
    except OSError:
        return False


def _permits(st: os.stat_result, ident: Identity, bits: int) -> bool:
    if st.st_uid == ident.uid:
        shift = 6
    elif st.st_gid in ident.groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def drop_privileges(ident: Identity) -> None:
    """Become ``ident`` for good, and prove it: groups first (only root may set them),
    then the group, then the user; then root must be out of reach (``setuid(0)``
    refused) and no capability left."""
    os.setgroups(list(ident.groups))
    os.setgid(ident.gid)
    os.setuid(ident.uid)
    _no_new_privs()
    if (os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3
            or set(os.getgroups()) != set(ident.groups)):
        raise SandboxError(f"--user: the change to {ident.describe()} did not take "
                           f"(uids {os.getresuid()}, gids {os.getresgid()})")
    for regain in (os.setuid, os.seteuid, os.setgid, os.setegid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise SandboxError(f"--user: still able to regain root after becoming "
                           f"{ident.name} ({regain.__name__}(0) succeeded)")
    caps = {k: v for k, v in _capabilities().items() if v}
    if caps:
        raise SandboxError(f"--user: capabilities left after becoming {ident.name}: "
                           + ", ".join(f"{k} {v:#x}" for k, v in caps.items()))


def _capabilities() -> dict[str, int]:
    """The permitted, effective and ambient capability sets of this process."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k], 16) for k in ("CapPrm", "CapEff", "CapAmb") if k in fields}


_PR_SET_NO_NEW_PRIVS = 38


def _no_new_privs() -> None:
    """No execve() can give privileges back (set-user-ID programs, file capabilities).
    A thread's attribute: this one (the one that serves) and threads it starts later;
    a seccomp filter loaded with TSYNC sets it on every thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")


# -- seccomp -------------------------------------------------------------------------

#: What the server calls once its sockets exist.  Found by tracing ``serve`` (strace -f,
#: every call after the filter is loaded) while it served simulated guests (both
#: engines, --socket-count 2, unix bridges with host clients, a source, a third-party
#: plugin with a thread, a timer, a late import and a handler that raises, the control
#: socket with run-time and fd endpoints, metrics scrapes, the hostile front-ends of
#: tests/test_bad_input.py) and a Linux guest under QEMU, then stopped on SIGTERM;
#: marked below, the few calls reachable in ordinary operation that those runs happened
#: not to make.  Names a system has no such call for are skipped: glibc uses
#: epoll_pwait, ppoll, readlinkat and unlinkat where x86-64 has epoll_wait, poll,
#: readlink and unlink.  tests/test_privilege.py serves the workloads with a miss
#: killing the server.
SYSCALLS: tuple[str, ...] = (
    # memory: guest RAM and ring views (mmap of the front-end's memfds), Python's
    # allocator, thread stacks; brk and mremap (glibc malloc, realloc) not seen
    "mmap", "munmap", "mprotect", "madvise", "brk", "mremap",
    # descriptors: vhost-user messages with SCM_RIGHTS, eventfd reads and writes,
    # replies (sendto), unix bridge clients, the seals of guest memfds (fcntl), the
    # /proc/self/fd link that tells an eventfd, closing what a front-end sent
    "accept4", "recvmsg", "recvfrom", "sendto", "read", "write", "close", "fcntl",
    "getsockname", "readlink", "readlinkat",
    # the control socket (SO_PEERCRED of a client, endpoint fds sent with SCM_RIGHTS),
    # hang-up checks of SEQPACKET peers (poll), the metrics exporter's thread (its
    # selector, the end of a response), batches to fd endpoints (sendmmsg, datagrams.c)
    "getsockopt", "sendmsg", "sendmmsg", "poll", "ppoll", "shutdown",
    # files read late (a module imported by a handler, source lines for a traceback):
    # openat is below, read-only; getdents64 (a directory listing of the import system)
    # not seen here only because nobody could not list this host's /root
    "newfstatat", "lseek", "getdents64",
    "fstat", "stat", "lstat",  # what glibc before 2.33 calls for fstat(), stat(), lstat()
    # the asyncio loop (created after the filter, with its self-pipe socketpair below)
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    # signals: SIGTERM and SIGINT end the server through the loop
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "restart_syscall",
    # threads (a plugin may start one; clone is below), locks, logging's getpid
    "futex", "set_robust_list", "rseq", "gettid", "getpid", "exit",
    # time: the vDSO answers these, except on clock sources it cannot read (not seen);
    # a sleep in a plugin's thread
    "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep",
    # entropy for random, secrets or uuid in a handler (not seen)
    "getrandom",
    # the end: the socket files removed, the process gone
    "unlink", "unlinkat", "exit_group",
)

_CMP_MASKED_EQ = 7  # seccomp.h: enum scmp_compare
_AF_UNIX = 1
_CLONE_THREAD = 0x00010000
_O_ACCMODE, _O_CREAT, _O_TRUNC = 0o3, 0o100, 0o1000  # asm-generic, x86-64 and aarch64
_FIONBIO, _TCGETS = 0x5421, 0x5401  # asm-generic ioctls, x86-64 and aarch64
_PR_SET_NAME = 15
_SO_PASSCRED = 16  # asm-generic socket.h, x86-64 and aarch64

#: Calls allowed only with these arguments: (name, argument, mask, value); several rows
#: of one call allow any of them.  Only threads may be cloned (the server never makes a
#: process; clone3's flags are out of a filter's sight, so it fails with ENOSYS and
#: glibc falls back to clone); files open read-only; socketpair (asyncio's self-pipe)
#: for AF_UNIX only; ioctl for FIONBIO (setblocking) and TCGETS (isatty, on a file a
#: late import opens) only; prctl only to name a thread (what Python 3.14 does);
#: setsockopt only for SO_PASSCRED (how a SEQPACKET peer's empty datagram differs from
#: its hang-up: endpoints/peer.py).
CONDITIONAL: tuple[tuple[str, int, int, int], ...] = (
    ("clone", 0, _CLONE_THREAD, _CLONE_THREAD),
    ("openat", 2, _O_ACCMODE | _O_CREAT | _O_TRUNC, 0),
    ("socketpair", 0, 0xFFFFFFFF, _AF_UNIX),
    ("ioctl", 1, 0xFFFFFFFF, _FIONBIO),
    ("ioctl", 1, 0xFFFFFFFF, _TCGETS),
    ("prctl", 0, 0xFFFFFFFF, _PR_SET_NAME),
    ("setsockopt", 2, 0xFFFFFFFF, _SO_PASSCRED),
)

#: What a call outside the allowlist gets, by ``--seccomp`` mode
MODES = ("kill", "eperm", "log")
_ACT_KILL_PROCESS = 0x80000000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000


def _act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


_ACTIONS = {"kill": _ACT_KILL_PROCESS, "eperm": _act_errno(errno.EPERM), "log": _ACT_LOG}
#: seccomp.h: enum scmp_filter_attr
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
#: AUDIT_ARCH_* (seccomp_arch_native()): the architectures the allowlist is written for
_ARCHES = {0xC000003E: "x86_64", 0xC00000B7: "aarch64"}


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp"""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _Version(ctypes.Structure):
    """struct scmp_version"""

    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint),
                ("micro", ctypes.c_uint)]


def _libseccomp() -> ctypes.CDLL:
    """libseccomp (>= 2.4: kill-process and log actions), on an architecture the
    allowlist is written for; SandboxError naming what is missing otherwise."""
    machine = platform.machine()
    if machine not in ("x86_64", "aarch64"):
        raise SandboxError(f"--seccomp: the allowlist is written for x86_64 and aarch64, "
                           f"not {machine}")
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise SandboxError("--seccomp: libseccomp.so.2 not found (install libseccomp2, "
                           "2.4 or newer)") from None
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    v = lib.seccomp_version().contents
    if (v.major, v.minor) < (2, 4):
        raise SandboxError(f"--seccomp: libseccomp {v.major}.{v.minor}.{v.micro} is too "
                           "old (2.4 or newer)")
    if lib.seccomp_arch_native() not in _ARCHES:
        raise SandboxError(f"--seccomp: this process's system call ABI is not x86_64 "
                           f"or aarch64 (machine {machine})")
    return lib


def _number(lib: ctypes.CDLL, name: str) -> int | None:
    """The native number of system call ``name``; None if this architecture has no such
    call, or this libseccomp does not know the name (a typo, or a call newer than it)."""
    nr = int(lib.seccomp_syscall_resolve_name_arch(lib.seccomp_arch_native(),
                                                   name.encode()))
    return nr if nr >= 0 else None  # -1: unknown; below: not on this architecture


def check_seccomp(mode: str, extra: Sequence[str] = ()) -> None:
    """Fail now, before anything is created, if the filter could not be built."""
    if mode not in MODES:
        raise SandboxError(f"--seccomp: {mode!r} is not one of {', '.join(MODES)}", 2)
    lib = _libseccomp()
    for name in extra:
        if _number(lib, name) is None:
            raise SandboxError(f"--seccomp-allow: {name}: no such system call on "
                               f"{_ARCHES[lib.seccomp_arch_native()]}", 2)
    avail = _read("/proc/sys/kernel/seccomp/actions_avail")
    want = {"kill": "kill_process", "eperm": "errno", "log": "log"}[mode]
    if avail is not None and want not in avail.split():
        raise SandboxError(f"--seccomp {mode}: this kernel has no {want} action "
                           f"(it offers {avail.strip()})")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def install_filter(mode: str, extra: Sequence[str] = ()) -> int:
    """Load the allowlist (:data:`SYSCALLS`, :data:`CONDITIONAL`, ``extra``) into every
    thread of the process, calls outside it getting what ``mode`` says; the number of
    rules.  Irrevocable, and inherited by every thread started later."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(_ACTIONS[mode])
    if not ctx:
        raise SandboxError("--seccomp: seccomp_init failed")
    rules = 0

    def add(action: int, name: str, cmp: _ArgCmp | None = None) -> None:
        nonlocal rules
        nr = _number(lib, name)
        if nr is None:
            log.debug("seccomp: no %s here; not in the filter", name)
            return
        rc = lib.seccomp_rule_add_array(ctx, action, nr, int(cmp is not None),
                                        ctypes.byref(cmp) if cmp is not None else None)
        if rc < 0:
            raise SandboxError(f"--seccomp: rule for {name}: {os.strerror(-rc)}")
        rules += 1

    try:
        for attr, value in ((_ATTR_ACT_BADARCH, _ACT_KILL_PROCESS), (_ATTR_CTL_NNP, 1),
                            (_ATTR_CTL_TSYNC, 1)):
            rc = lib.seccomp_attr_set(ctx, attr, value)
            if rc < 0:
                raise SandboxError(f"--seccomp: filter attribute {attr}: "
                                   f"{os.strerror(-rc)}")
        unconditional = dict.fromkeys((*SYSCALLS, *extra))
        for name in unconditional:
            add(_ACT_ALLOW, name)
        for name, arg, mask, value in CONDITIONAL:
            if name not in unconditional:  # --seccomp-allow NAME: any arguments
                add(_ACT_ALLOW, name, _ArgCmp(arg, _CMP_MASKED_EQ, mask, value))
        add(_act_errno(errno.ENOSYS), "clone3")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SandboxError(f"--seccomp: loading the filter failed: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return rules


# -- both ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What ``serve`` was asked for, checked: the user to become, the seccomp mode and
    the calls to allow beyond :data:`SYSCALLS`."""

    identity: Identity | None = None
    seccomp: str | None = None
    allow: tuple[str, ...] = ()


def plan(user: str | None, group: str | None, seccomp: str | None,
         allow: Sequence[str] = ()) -> Plan:
    """Check the options now, before anything is created (SandboxError otherwise)."""
    if group is not None and user is None:
        raise SandboxError("--group needs --user", 2)
    if allow and seccomp is None:
        raise SandboxError("--seccomp-allow needs --seccomp", 2)
    ident = None
    if user is not None:
        if os.geteuid() != 0:
            raise SandboxError(f"--user {user}: changing user needs root (running as "
                               f"uid {os.geteuid()}); drop --user, or start as root", 2)
        ident = resolve_user(user, group)
    names = tuple(n.strip() for a in allow for n in a.split(",") if n.strip())
    if seccomp is not None:
        check_seccomp(seccomp, names)
    return Plan(ident, seccomp, names)


def enter(p: Plan, listeners: Iterable[UnixListener],
          before_filter: Callable[[], None] | None = None) -> None:
    """Apply ``p``: the socket files to the user, the user, then the filter (last, so
    that changing user needs no call of its own in the allowlist).  ``before_filter``
    runs between the two: as the new user, still able to make any call."""
    if p.identity is not None:
        hand_over(listeners, p.identity)
        drop_privileges(p.identity)
        log.info("running as %s; groups %s", p.identity.describe(),
                 ",".join(map(str, p.identity.groups)))
    if before_filter is not None:
        before_filter()
    if p.seccomp is not None:
        rules = install_filter(p.seccomp, p.allow)
        what = {"kill": "kill the process", "eperm": "fail with EPERM",
                "log": "are allowed and logged by the kernel"}[p.seccomp]
        log.info("seccomp: %d rules; other system calls %s", rules, what)
