"""Run untrusted Python (model-generated code) in a subprocess that cannot hurt the evaluator.

    result = run_python("assert 1 + 1 == 2\\n", SandboxLimits(timeout_s=5))
    result.passed, result.status, result.details   # True, "passed", "ran to its end"

A program *passes* when it runs to its last line without an uncaught exception. Leaving early
(``sys.exit(0)``, ``os._exit(0)``) is not passing: the bootstrap writes the verdict on a private
file descriptor only after the program's last line, so the exit status alone proves nothing.

Protection layers, from the kernel's up to Python's (each catches what the one above missed):

1. Process: a new session and process group (``start_new_session``), killed as a whole with
   SIGKILL at the wall-clock timeout and after every run, plus a sweep of ``/proc`` for any
   process still in the child's session (a ``setpgid`` escape; a ``setsid`` escape is caught
   by the PID namespace of layer 4). stdin is ``/dev/null``;
   stdout and stderr go to a file outside the work folder, of which at most
   ``max_output_bytes`` come back.
2. Resource limits, set with ``resource.setrlimit`` in a ``preexec_fn`` (right before exec):
   RLIMIT_AS (memory), RLIMIT_CPU (soft: SIGXCPU, hard one second later: SIGKILL),
   RLIMIT_FSIZE (no file, the captured output included, grows past it), RLIMIT_CORE = 0,
   RLIMIT_NOFILE, and RLIMIT_NPROC = the tasks the sandbox user already has + ``max_processes``.
3. Filesystem: a fresh ``tempfile.mkdtemp`` work folder (the cwd, HOME and TMPDIR), removed
   afterwards; ``python -I -B`` (isolated: no PYTHON* variables, no user site, no script folder
   on sys.path; no .pyc written); a minimal environment (no proxies, no credentials, 1 BLAS
   thread); umask 077.
4. Identity and namespaces, when the system allows them (probed once per interpreter): as root,
   the child drops to ``run_as_user`` ("nobody") if that user can run the interpreter; the child
   gets a new network namespace (nothing but a loopback that is down), a new mount namespace
   in which every mount is read-only and the work folder is a fresh tmpfs of ``disk_mb`` (the
   program reaches it through an inherited descriptor), and a new PID
   namespace in which the program is PID 1 (when it ends or is killed, the kernel kills every
   process it started; the evaluator's processes cannot even be named from inside). Without
   root, a user namespace is what makes the others possible.
5. Python guards (``python_guards``), installed in the child before the program's first line: an
   audit hook (PEP 578), which the program cannot remove, refuses process creation and signals
   (``os.fork``/``forkpty``/``exec*``/``posix_spawn``/``system``, ``subprocess.Popen``, importing
   ``_posixsubprocess`` (multiprocessing's spawn path), ``os.killpg``, ``os.kill`` of any other
   process), every socket event, every ``ctypes`` event (loading a library, calling a foreign
   function), changing resource limits, links and symlinks, and writing,
   creating, renaming, removing or re-permissioning any path outside the work folder (``open``
   for writing, ``os.remove``/``unlink``/``rmdir``/``rename``/``replace``/``truncate``/
   ``chmod``/``chown``/``utime``/``mkdir``/``setxattr``, ``shutil.rmtree``; fd and dir_fd
   arguments are resolved through ``/proc/self/fd``; device files are never opened for
   writing). On top, ``socket.socket``/``create_connection`` and ``os.mknod`` are replaced by
   functions that raise, for a plain error message at the call site. So ``import subprocess``
   and ``import ctypes`` fail in the sandbox; HumanEval programs need neither. numpy, scipy and
   pandas use ctypes when imported, so a program that imports them gets them imported before
   the guards (installed, trusted code); their ctypes calls are refused after that too.

What holds where (``probe_sandbox`` says which case the current process is in):

- Always: the wall-clock timeout and group kill, the temp folder, the memory, CPU, file-size,
  core and open-file limits, the output cap, isolated mode and the Python guards.
- RLIMIT_NPROC (fork bombs): the kernel enforces it unless the child is real root, i.e. for a
  non-root evaluator and for a root evaluator that could drop to ``run_as_user``. For a child
  that stays root only the guards stop a fork bomb (the wall-clock group kill still ends it).
- Files outside the work folder: with the read-only mount namespace the kernel refuses every
  write, root or not (a child that stays root could remount, but only through ``ctypes`` or a
  ``mount`` process, which the guards refuse). A dropped child also meets ordinary file
  permissions. Without the mount namespace, a child running as the evaluator's user (non-root,
  or root that cannot drop) is kept off the evaluator's files only by the guards.
- Disk space: with the mount namespace the program can write ``disk_mb`` in all; without it,
  RLIMIT_FSIZE bounds each file but not their number, so a program could fill the disk that
  holds the temp folder within its timeout.
- Resource limits: a child that stays root could raise them (CAP_SYS_RESOURCE); the guards
  refuse ``resource.setrlimit``/``prlimit``.
- Leftover processes: with the PID namespace none survive the program, whatever they did;
  without it, the group kill and the session sweep miss a process that left the session
  (``setsid``) after forking, which needs a way past the guards.
- Network: with the network namespace nothing is reachable, not even the evaluator's loopback;
  without it (``unshare`` refused, as in some containers) only the guards and the empty proxy
  settings block it.
- Side effect of the PID namespace: the program is PID 1, and the kernel does not deliver to
  PID 1 the signals it sends itself without a handler (``os.kill(os.getpid(), SIGTERM)`` does
  nothing; ``os.abort()`` ends in SIGSEGV), nor SIGXCPU at the soft CPU limit (the hard limit's
  SIGKILL ends it a second later, and the CPU time tells the evaluator it was the limit).
- On the development machine (root; the venv's interpreter under a 0700 ``/root``, so no drop;
  all three namespaces available): read-only filesystem, no network and no leftover processes
  at the kernel level; fork bombs stopped by the guards.

The Python guards are best effort, not a security boundary: a C extension, or a gap in CPython's
audit coverage, gets past them. ``ctypes`` is refused for that reason, but an installed native
module is not. Deliberately adversarial code can also forge the verdict (write to the inherited
result descriptor). The point is to keep model-written code from damaging the evaluator by
accident or crude hostility, not to contain a determined attacker; for that, run the evaluator
itself in a throwaway container or VM.

``preexec_fn`` runs Python between fork and exec, which can deadlock in a threaded program if it
takes a lock another thread held at the fork. Ours takes none: it only makes system calls
(``unshare``/``mount``/``mount_setattr``/``fork`` through libc handles loaded before the fork,
then ``setgroups``/``setgid``/``setuid``, then ``setrlimit``, last because the evaluator may be
far larger than RLIMIT_AS until the exec), and any failure makes ``Popen`` fail instead of
running the program with less protection than probed.

This file is also the child's bootstrap: the child runs ``python -I -B <this file> --run ...``,
which is why it imports only the standard library at the top and imports ``subprocess`` only in
the functions that the evaluator calls (so the child never has ``_posixsubprocess`` loaded).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from typing import Optional

STATUSES = ("passed", "failed", "timeout", "error")

_PASSED_TOKEN = b"passed\n"
_EXIT_FAILED = 1
_EXIT_SANDBOX_BROKEN = 97  # the bootstrap itself could not start the program
_PROGRAM_NAME = "program.py"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock; the whole process group is killed after it
    cpu_s: Optional[int] = None  # RLIMIT_CPU; None: int(timeout_s) + 2, so the wall clock fires first
    memory_mb: int = 1024  # RLIMIT_AS (address space, so a little above the real peak)
    max_processes: int = 8  # RLIMIT_NPROC headroom over the sandbox user's current task count
    file_size_mb: int = 16  # RLIMIT_FSIZE; also bounds the captured output on disk
    disk_mb: int = 64  # size of the work folder (a tmpfs) when the mount namespace is available
    open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 64 * 1024  # stdout+stderr kept in the result (head and tail)
    python_guards: bool = True  # the in-child audit hook; turn off only to test the OS layers
    run_as_user: Optional[str] = "nobody"  # as root: drop to this user when it can run `python`
    python: Optional[str] = None  # the interpreter; None: sys.executable

    def cpu_limit_s(self) -> int:
        return int(self.cpu_s) if self.cpu_s is not None else int(self.timeout_s) + 2


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES; "error" means the sandbox could not run the program at all
    details: str  # one line: why (the exception line, the signal, the limit hit)
    output: str = ""  # captured stdout+stderr, at most max_output_bytes (head ... tail)
    returncode: Optional[int] = None
    duration_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class SandboxCapabilities:
    """What the OS layers can do for this evaluator process (see the module docstring)."""

    evaluator_is_root: bool
    drops_to_user: Optional[str]  # the user the child runs as after dropping root, or None
    network_namespace: bool  # the child gets an empty network namespace
    read_only_filesystem: bool  # every mount but the work folder is read-only for the child
    pid_namespace: bool  # the program is PID 1 of its own PID namespace: its end ends them all
    nproc_enforced: bool  # the kernel enforces RLIMIT_NPROC on the child (not for real root)
    child_uid: int

    def isolation(self) -> str:
        if self.pid_namespace:
            return "network+filesystem+processes"
        if self.read_only_filesystem:
            return "network+filesystem"
        return "network" if self.network_namespace else ""


# ---------------------------------------------------------------------------------------------
# Evaluator side
# ---------------------------------------------------------------------------------------------

# strongest first; the probe keeps the first one the system allows
_ISOLATION_LEVELS = ("network+filesystem+processes", "network+filesystem", "network", "")
_probe_cache: dict = {}
_probe_lock = threading.Lock()  # evaluators run sandboxes from worker threads


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as a program in the sandbox and say whether it ran to its end."""
    started = time.monotonic()
    try:
        capabilities = probe_sandbox(limits)
        drop = _user_ids(capabilities.drops_to_user) if capabilities.drops_to_user else None
        base = tempfile.mkdtemp(prefix="ebft-sandbox-")
    except OSError as err:
        return _error(f"could not prepare the sandbox: {err}", started)
    try:
        return _run_in(base, source, limits, capabilities, drop, started)
    except OSError as err:  # e.g. no space left for the program file
        return _error(f"could not run the sandbox: {err}", started)
    finally:
        _remove_tree(base)


def probe_sandbox(limits: SandboxLimits = SandboxLimits()) -> SandboxCapabilities:
    """Find out (once per interpreter and user) whether the child can drop root and get its own
    network, mount and PID namespaces, by starting a trivial child each way, strongest first."""
    python = limits.python or sys.executable
    is_root = os.geteuid() == 0
    key = (python, limits.run_as_user if is_root else None)
    with _probe_lock:
        if key not in _probe_cache:
            _probe_cache[key] = _probe(python, key[1], is_root)
        return _probe_cache[key]


def _probe(python: str, run_as_user: Optional[str], is_root: bool) -> SandboxCapabilities:
    own_netns = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None
    drops = []
    if run_as_user is not None:
        try:
            drops.append(_user_ids(run_as_user))
        except KeyError:
            pass
    drops.append(None)
    for drop in drops:
        for isolation in _ISOLATION_LEVELS:
            report = _probe_child(python, drop, isolation)
            if report is None:
                continue
            child_netns, root_read_only, work_read_only, pid_one = report
            return SandboxCapabilities(
                evaluator_is_root=is_root,
                drops_to_user=run_as_user if drop is not None else None,
                network_namespace="network" in isolation and child_netns != own_netns,
                read_only_filesystem="filesystem" in isolation and root_read_only and not work_read_only,
                pid_namespace="processes" in isolation and pid_one,
                # the kernel exempts only real root (uid 0 of the initial user namespace)
                nproc_enforced=drop is not None or not is_root,
                child_uid=drop[0] if drop is not None else os.geteuid(),
            )
    raise OSError(f"the sandbox cannot start {python!r} at all")


def _probe_child(python, drop, isolation):
    import subprocess

    work = tempfile.mkdtemp(prefix="ebft-sandbox-probe-")
    try:
        if drop is not None:
            os.chown(work, drop[0], drop[1])
        completed = subprocess.run(
            [python, "-I", "-B", os.path.abspath(__file__), "--probe"],
            cwd=work, env=_child_env(work), stdin=subprocess.DEVNULL, capture_output=True,
            start_new_session=True, preexec_fn=_preexec([], isolation, drop, work, 1), timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        _remove_tree(work)
    fields = completed.stdout.decode(errors="replace").split()
    if completed.returncode != 0 or len(fields) != 4:
        return None
    return fields[0], fields[1] == "1", fields[2] == "1", fields[3] == "1"


def _run_in(base, source, limits, capabilities, drop, started) -> SandboxResult:
    import subprocess

    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    if drop is not None:
        os.chmod(base, 0o711)  # the dropped child must pass through base to its cwd, not list it
        os.chown(work, drop[0], drop[1])
    # The program reaches the child as an inherited descriptor: with a mount namespace its
    # work folder is a fresh tmpfs, where the bootstrap writes it out again.
    program_path = os.path.join(base, "program")
    with open(program_path, "w", encoding="utf-8") as handle:
        handle.write(source)

    mb = 1024 * 1024
    # RLIMIT_NPROC counts every task (thread) of the user, so leave room for what it has (and
    # for the waiting parent of a PID namespace)
    nproc = _tasks_of_user(capabilities.child_uid) + limits.max_processes + 1
    cpu = limits.cpu_limit_s()
    rlimits = _within_current_limits([
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU first, SIGKILL if it is ignored
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb, limits.file_size_mb * mb),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_NPROC, nproc, nproc),
        # last: the child is a copy of the evaluator until exec, maybe far bigger than this
        (resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb),
    ])
    output_path = os.path.join(base, "output")  # outside the work folder: the program cannot
    verdict_path = os.path.join(base, "verdict")  # reach them by path, only through its fds
    with open(output_path, "wb") as output, open(verdict_path, "wb") as verdict, \
            open(program_path, "rb") as program:
        command = [limits.python or sys.executable, "-I", "-B", os.path.abspath(__file__), "--run",
                   str(program.fileno()), str(verdict.fileno()), "1" if limits.python_guards else "0"]
        preexec = _preexec(rlimits, capabilities.isolation(), drop, work, limits.disk_mb)
        try:
            child = subprocess.Popen(
                command, cwd=work, env=_child_env(work), stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, pass_fds=(program.fileno(), verdict.fileno()),
                start_new_session=True, umask=0o077, preexec_fn=preexec,
            )
        except (OSError, subprocess.SubprocessError) as err:
            return _error(f"could not start the sandboxed interpreter: {err}", started)
        try:
            cpu_s = _wait_with_timeout(child, limits.timeout_s)
        finally:
            _kill_session(child.pid)  # also after a normal end: no background process survives
            if child.returncode is None:
                child.wait()
    text = _read_capped(output_path, limits.max_output_bytes)
    output_full = os.path.getsize(output_path) >= limits.file_size_mb * mb
    with open(verdict_path, "rb") as handle:
        ran_to_end = handle.read(len(_PASSED_TOKEN) + 1) == _PASSED_TOKEN
    return _classify(child.returncode, cpu_s, ran_to_end, output_full, text, limits, started)


def _within_current_limits(rlimits):
    """Never ask for more than the evaluator's own hard limits: a child that is not root (or
    has dropped root) may only lower them."""
    bounded = []
    for which, soft, hard in rlimits:
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        bounded.append((which, soft, hard))
    return bounded


def _wait_with_timeout(child, timeout_s: float) -> Optional[float]:
    """Reap the child within the timeout and return the CPU seconds it and the children it
    waited for used (None: still running at the deadline). wait4 rather than Popen.wait, for
    that CPU time: a program that is PID 1 of its namespace ignores SIGXCPU, so the kernel's
    SIGKILL at the hard CPU limit is all that shows, and only the CPU time tells it apart."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.05)


def _classify(returncode, cpu_s, ran_to_end, output_full, text, limits, started) -> SandboxResult:
    def result(status, details):
        return SandboxResult(status == "passed", status, details, text, returncode,
                             time.monotonic() - started)

    if cpu_s is None:
        return result("timeout", f"still running after {limits.timeout_s:g} s (wall clock); killed")
    cpu_limit_hit = cpu_s >= limits.cpu_limit_s() - 0.05
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_limit_hit):
        return result("timeout", f"CPU time limit of {limits.cpu_limit_s()} s reached")
    if returncode == 0 and ran_to_end:
        return result("passed", "ran to its end")
    if output_full:  # Python ignores SIGXFSZ, so the write fails and the program dies of it
        return result("failed", f"its output reached the file size limit ({limits.file_size_mb} MiB)")
    if returncode == _EXIT_SANDBOX_BROKEN:
        return result("error", _last_line(text) or "the sandbox bootstrap failed")
    if returncode is not None and returncode < 0:
        name = _signal_name(-returncode)
        hint = {"SIGXFSZ": " (file size / output limit)", "SIGKILL": " (a limit, or the OOM killer)",
                "SIGSEGV": " (crashed)"}.get(name, "")
        return result("failed", f"killed by {name}{hint}")
    if returncode == 0:
        return result("failed", "exited with status 0 before its last line")
    return result("failed", _last_line(text) or f"exit status {returncode}")


def _error(details, started) -> SandboxResult:
    return SandboxResult(False, "error", details, duration_s=time.monotonic() - started)


def _child_env(work: str) -> dict:
    # No proxies, tokens or cluster settings reach the program; one BLAS thread keeps numpy
    # inside RLIMIT_AS and off the other cores.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "no_proxy": "*", "NO_PROXY": "*",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _preexec(rlimits, isolation, drop, work, disk_mb):
    """The function run in the child between fork and exec. Everything it needs (limits, libc
    entry points, paths) is prepared here, in the evaluator, so the child only makes system
    calls; any failure raises, which makes Popen fail rather than run the program unprotected."""
    namespaces = (_Namespaces(isolation, user_namespace=os.geteuid() != 0, work=work, disk_mb=disk_mb,
                              owner=drop) if isolation else None)

    def preexec():
        if namespaces is not None:  # first: it needs root, and allocates a little
            namespaces.enter()
        if drop is not None:
            os.setgroups([])
            os.setgid(drop[1])
            os.setuid(drop[0])
        # Limits last, right before exec: until then this process is a copy of the evaluator,
        # which may already be past RLIMIT_AS (a trainer with torch loaded), and Python may
        # allocate. Lowering limits needs no privilege, so the drop can come before.
        for which, soft, hard in rlimits:
            resource.setrlimit(which, (soft, hard))

    return preexec


class _Namespaces:
    """A new network namespace (only loopback, down); with "filesystem", a new mount namespace
    in which every mount is read-only and the work folder is a fresh tmpfs of ``disk_mb`` (so the
    program cannot fill the evaluator's disk either); with "processes",
    a new PID namespace whose PID 1 is the program, so that when it ends (or is killed) the
    kernel kills every process it left, even one that escaped its session."""

    CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x40000000, 0x10000000, 0x20000000
    MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
    SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1

    def __init__(self, isolation: str, user_namespace: bool, work: str, disk_mb: int, owner=None):
        import ctypes

        class MountAttr(ctypes.Structure):
            _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clear", "propagation", "userns_fd")]

        libc = ctypes.CDLL(None, use_errno=True)
        self.unshare, self.mount, self.syscall, self.fork = libc.unshare, libc.mount, libc.syscall, libc.fork
        self.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        self.syscall.restype = ctypes.c_long
        self.attrs = {True: MountAttr(self.MOUNT_ATTR_RDONLY, 0, 0, 0),  # read-only
                      False: MountAttr(0, self.MOUNT_ATTR_RDONLY, 0, 0)}  # writable
        self.attr_size = ctypes.sizeof(MountAttr)
        self.c_long, self.c_int, self.c_uint, self.c_size_t = ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
        self.byref = ctypes.byref
        self.filesystem = "filesystem" in isolation
        self.processes = "processes" in isolation
        self.flags = (self.CLONE_NEWNET | (self.CLONE_NEWNS if self.filesystem else 0)
                      | (self.CLONE_NEWPID if self.processes else 0))
        self.user_namespace = user_namespace
        if user_namespace:  # without root, a user namespace is what allows the others
            self.flags |= self.CLONE_NEWUSER
            # our own ids map to themselves: files can be created on the new tmpfs (unmapped
            # ids cannot own inodes there), and the program, not being uid 0 inside, loses
            # the namespace's capabilities at exec (so it cannot remount anything writable)
            self.id_maps = ((b"/proc/self/setgroups", b"deny"),
                            (b"/proc/self/uid_map", f"{os.getuid()} {os.getuid()} 1".encode()),
                            (b"/proc/self/gid_map", f"{os.getgid()} {os.getgid()} 1".encode()))
        self.work = os.fsencode(work)
        options = f"size={int(disk_mb)}m,mode=0700"
        if owner is not None:  # the user the child drops to must own its work folder
            options += f",uid={owner[0]},gid={owner[1]}"
        self.tmpfs_options = options.encode()

    def enter(self) -> None:
        if self.unshare(self.flags) != 0:
            raise OSError("unshare refused")
        if self.user_namespace:
            for path, content in self.id_maps:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, content)
                finally:
                    os.close(fd)
        if self.filesystem:
            self.make_filesystem_read_only()
        if self.processes:
            self.become_namespace_init()

    def become_namespace_init(self) -> None:
        """unshare(CLONE_NEWPID) puts our *children* in the new namespace, so fork once: the
        child goes on to exec the program as PID 1; this process waits and exits the same way.
        libc's fork, not os.fork: Python's at-fork handlers could take locks that other threads
        of the evaluator held when Popen forked."""
        pid = self.fork()
        if pid < 0:
            raise OSError("fork into the PID namespace failed")
        if pid == 0:
            return
        try:  # this process must never return into Popen's child code, which would exec
            # Close everything, Popen's exec-error pipe included: the evaluator then sees the
            # program's exec (or its failure) as if this process had made it.
            os.closerange(3, 1 << 16)
            _, status = os.waitpid(pid, 0)
            if os.WIFEXITED(status):
                os._exit(os.WEXITSTATUS(status))
            number = os.WTERMSIG(status)
            if number != signal.SIGKILL:
                signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)  # die of the same signal, so returncode = -signal
        finally:
            os._exit(_EXIT_SANDBOX_BROKEN)

    def make_filesystem_read_only(self) -> None:
        # private first, so that nothing below propagates back to the evaluator's mounts
        if self.mount(None, b"/", None, self.MS_REC | self.MS_PRIVATE, None) != 0:
            raise OSError("making the mounts private failed")
        # the work folder becomes a tmpfs of its own, then everything turns read-only, then the
        # work folder alone writable again
        if self.mount(b"ebft-sandbox", self.work, b"tmpfs", self.MS_NOSUID | self.MS_NODEV,
                      self.tmpfs_options) != 0:
            raise OSError("mounting a tmpfs on the work folder failed")
        self.set_read_only(b"/", True, self.AT_RECURSIVE)
        self.set_read_only(self.work, False, 0)
        os.chdir(self.work)  # the old cwd is the directory under the new mount

    def set_read_only(self, path: bytes, read_only: bool, flags: int) -> None:
        if self.syscall(self.c_long(self.SYS_MOUNT_SETATTR), self.c_int(self.AT_FDCWD), path,
                        self.c_uint(flags), self.byref(self.attrs[read_only]),
                        self.c_size_t(self.attr_size)) != 0:
            raise OSError("mount_setattr failed")


def _user_ids(name: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _tasks_of_user(uid: int) -> int:
    """Tasks (threads count, as for RLIMIT_NPROC) whose real uid is ``uid``, from /proc."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue  # the process ended while we looked
    return total


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, from /proc/<pid>/stat."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state, ppid, pgrp, session
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(name))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL the child's process group and every process left in its session. The kernel
    kills a whole group atomically with respect to fork, so one round normally suffices; the
    loop is for processes that moved to another group of the session."""
    for _ in range(100):
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        stray = [pid for pid in _session_members(sid) if pid != os.getpid()]
        if not stray:
            return
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function, failed_path, _exc_info):
        try:  # the program may have made a folder read-only or unlistable
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _read_capped(path: str, cap: int) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size <= cap:
            data = handle.read()
        else:  # keep the start and the end (where a traceback is)
            head = handle.read(cap // 2)
            handle.seek(size - cap // 2)
            data = head + f"\n... [{size - 2 * (cap // 2)} bytes cut] ...\n".encode() + handle.read()
    return data.decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------------------------------------
# Child side: the bootstrap (`python -I -B sandbox.py --run PROGRAM_FD VERDICT_FD GUARDS`)
# ---------------------------------------------------------------------------------------------

_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "os.killpg", "pty.spawn",
})  # and os.kill, but for the program's own pid
_REFUSED_EVENTS = frozenset({"resource.setrlimit", "resource.prlimit", "os.link", "os.symlink"})
# _posixsubprocess.fork_exec raises no audit event; subprocess and multiprocessing's spawn and
# forkserver start methods create processes through it.
_REFUSED_IMPORTS = frozenset({"_posixsubprocess"})
# Installed libraries that load native code through ctypes when imported (numpy does), which the
# guards refuse: imported before the guards when the program imports them. Trusted code, as in
# the usual HumanEval harness, which runs everything in the evaluator's own environment.
_IMPORTED_BEFORE_THE_GUARDS = ("numpy", "scipy", "pandas")
# event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
    "os.truncate": ((0, None),), "os.rename": ((0, 2), (1, 3)), "shutil.rmtree": ((0, 1),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _refuse(what: str):
    raise PermissionError(f"sandbox: {what} is not allowed")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        _refuse(f"using descriptor {fd}")


def _resolve(path, dir_fd=None) -> str:
    """Absolute, symlink-free form of a path argument as the system call will see it."""
    if isinstance(path, int):
        return os.path.realpath(_fd_path(path))
    path = os.fsdecode(os.fspath(path))
    if os.path.isabs(path):
        return os.path.realpath(path)
    base = _fd_path(dir_fd) if dir_fd not in (None, -1) else os.getcwd()
    return os.path.realpath(os.path.join(base, path))


def _install_guards(work: str) -> None:
    work = os.path.realpath(work)

    def inside(resolved: str) -> bool:
        return resolved == work or resolved.startswith(work + os.sep)

    def check_write_open(path, mode, flags):
        if isinstance(path, int):
            return  # an fd the program already holds: opened through this check, or inherited
        if mode is None and not os.path.isabs(os.fsdecode(os.fspath(path))):
            # os.open's dir_fd does not reach the audit hook, so a relative path is ambiguous
            _refuse("os.open for writing with a relative path")
        resolved = _resolve(path)
        if resolved == os.devnull:
            return
        if not inside(resolved):
            _refuse(f"writing {resolved}")
        try:
            mode_bits = os.stat(resolved).st_mode
        except FileNotFoundError:
            return  # a new file in the work folder
        if stat.S_ISBLK(mode_bits) or stat.S_ISCHR(mode_bits):  # a disk, a terminal, ...
            _refuse(f"writing the device {resolved}")

    def hook(event, args):
        if event in _PROCESS_EVENTS or event == "os.kill" and args[0] != os.getpid():
            _refuse(f"{event} (no new processes or signals)")
        if event in _REFUSED_EVENTS or event.startswith(("socket.", "ctypes.")):
            _refuse(event)
        if event == "import" and args[0] in _REFUSED_IMPORTS:
            _refuse(f"importing {args[0]} (no new processes)")
        if event == "open":
            path, mode, flags = args
            if flags is not None and flags & _WRITE_FLAGS or mode is not None and any(
                    c in mode for c in "wax+"):
                check_write_open(path, mode, flags)
        elif event in _PATH_EVENTS:
            for path_index, dir_fd_index in _PATH_EVENTS[event]:
                dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
                resolved = _resolve(args[path_index], dir_fd)
                if not inside(resolved):
                    _refuse(f"{event} on {resolved}")

    sys.addaudithook(hook)

    import socket

    def no_network(*_args, **_kwargs):
        _refuse("network access")

    socket.socket = no_network  # friendlier than the audit error at the call site
    socket.create_connection = no_network
    socket.socketpair = no_network

    def no_device_nodes(*_args, **_kwargs):
        _refuse("os.mknod")

    os.mknod = no_device_nodes  # no audit event: a root program could make a disk device


def _child_run(program_fd: int, verdict_fd: int, guards: bool) -> int:
    import builtins
    import traceback
    import types

    try:
        with open(program_fd, encoding="utf-8") as handle:
            source = handle.read()
        with open(_PROGRAM_NAME, "w", encoding="utf-8") as handle:  # for the tracebacks' lines
            handle.write(source)
        program = _PROGRAM_NAME
        main = types.ModuleType("__main__")
        main.__file__ = os.path.abspath(program)
        main.__builtins__ = builtins
        sys.modules["__main__"] = main  # pickling and `import __main__` see the program
        sys.argv = [program]
        if guards:
            _import_allowed_libraries(source)
            _install_guards(os.getcwd())
    except BaseException:
        traceback.print_exc()
        _flush_standard_streams()
        os._exit(_EXIT_SANDBOX_BROKEN)
    try:
        exec(compile(source, main.__file__, "exec"), main.__dict__)
    except SystemExit as exit_request:
        _flush_standard_streams()
        print(f"sandbox: the program called exit({exit_request.code!r}) before its last line",
              file=sys.stderr)
        _flush_standard_streams()
        os._exit(_EXIT_FAILED)
    except BaseException as error:
        _flush_standard_streams()  # what it printed first, so the traceback ends the output
        # from the program's frames on: the bootstrap's own frame is noise
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        _flush_standard_streams()
        os._exit(_EXIT_FAILED)
    _flush_standard_streams()
    os.write(verdict_fd, _PASSED_TOKEN)
    os._exit(0)  # no atexit handlers or non-daemon threads of the program get to run after


def _import_allowed_libraries(source: str) -> None:
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return  # the program fails anyway, with this error, when it runs
    wanted = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            wanted.add(node.module.split(".")[0])
    for name in _IMPORTED_BEFORE_THE_GUARDS:
        if name in wanted:
            try:
                __import__(name)
            except Exception:  # not installed, or broken: the program's own import will say
                pass


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced it
            pass


def _child_main(argv: list) -> int:
    if argv[:1] == ["--probe"]:
        netns = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else "-"
        root_read_only = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
        work_read_only = bool(os.statvfs(".").f_flag & os.ST_RDONLY)
        print(netns, int(root_read_only), int(work_read_only), int(os.getpid() == 1))
        return 0
    if len(argv) == 4 and argv[0] == "--run":
        return _child_run(int(argv[1]), int(argv[2]), argv[3] == "1")
    print(f"usage: {os.path.basename(__file__)} --run PROGRAM_FD VERDICT_FD GUARDS | --probe",
          file=sys.stderr)
    return _EXIT_SANDBOX_BROKEN


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
