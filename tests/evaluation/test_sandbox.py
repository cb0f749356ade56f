"""The sandbox for generated code: correct programs pass, wrong ones fail with the reason, and
hostile ones (infinite loop, fork bomb, file deletion, huge allocation, network, output flood, disk filling,
escaping background process) neither hurt the evaluator nor leave processes behind.

Every test runs its sandboxes under a temporary root of its own (``tempfile.tempdir``), so a
leftover process can be recognised by its working directory; the ``sandbox_root`` fixture checks
that none is alive afterwards and that no new process of this session came from the test (see
``leaked_processes``: the runner that started pytest may start processes of its own meanwhile).
Tests that switch the Python guards off only run where a kernel layer stands in for them.
"""

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ebft_megatron.evaluation.sandbox import SandboxLimits, probe_sandbox, run_python

GENEROUS = 60.0  # wall-clock limit where the timeout is not the point (loaded 2-core machines)


def live_processes():
    """pid -> (parent pid, session id, cwd) of every live (not zombie) process we can see."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):
                continue
            found[int(name)] = (int(fields[1]), int(fields[3]), os.readlink(f"/proc/{name}/cwd"))
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked, or not ours to inspect
    return found


def processes_under(root):
    return sorted(pid for pid, (_, _, cwd) in live_processes().items() if cwd.startswith(root))


def session_processes(table=None):
    """The pids of this pytest session's processes (in ``table``, else as they are now)."""
    sid = os.getsid(0)
    return {pid for pid, (_, session, _) in (live_processes() if table is None else table).items()
            if session == sid}


def leaked_processes(before):
    """Processes of this session, new since ``before``, that came from this pytest process: its
    descendants, and orphans the kernel handed to a process outside the session (PID 1 or a
    subreaper). A new process whose line of parents reaches an older session member other than us
    belongs to whatever started pytest (a CI runner's monitor, a shell's job), not to the test."""
    table, sid, me = live_processes(), os.getsid(0), os.getpid()

    def from_the_test(pid):
        seen = set()
        while pid not in seen:
            seen.add(pid)
            parent = table[pid][0]
            if parent == me:
                return True
            if parent in before:
                return False
            if parent not in table or table[parent][1] != sid:
                return True
            pid = parent
        return False

    return sorted(pid for pid in session_processes(table) - before if from_the_test(pid))


@pytest.fixture
def sandbox_root(monkeypatch):
    root = tempfile.mkdtemp(prefix="ebft-sandbox-test-")
    os.chmod(root, 0o755)  # a sandbox that drops to "nobody" must reach its work folder
    monkeypatch.setattr(tempfile, "tempdir", root)
    before = session_processes()
    try:
        yield root
        assert processes_under(root) == [], "a sandboxed process outlived its run"
        assert leaked_processes(before) == [], "a process started by the test outlived it"
        assert [name for name in os.listdir(root) if name.startswith("ebft-sandbox-")] == [], \
            "a sandbox work folder was not removed"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def limits(**overrides):
    return SandboxLimits(**{"timeout_s": GENEROUS, **overrides})


def nproc_enforcing_limits(**overrides):
    """Limits under which the kernel enforces RLIMIT_NPROC (the child is not real root): this
    process's interpreter, or a system one that "nobody" can run when we are root and ours sits
    in a private folder. None when there is no such interpreter."""
    for python in (None, "/usr/bin/python3"):
        if python is not None and not os.access(python, os.X_OK):
            continue
        candidate = limits(python=python, **overrides)
        if probe_sandbox(candidate).nproc_enforced:
            return candidate
    return None


def test_a_program_that_runs_to_its_end_passes_in_a_fresh_minimal_environment(sandbox_root, monkeypatch):
    monkeypatch.setenv("EBFT_SANDBOX_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    program = (
        "import json, os, sys\n"
        "open('scratch.txt', 'w').write('the work folder is writable')\n"
        "print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ), 'isolated': sys.flags.isolated}))\n"
    )
    result = run_python(program, limits())
    assert (result.passed, result.status, result.returncode) == (True, "passed", 0), result
    seen = json.loads(result.output)
    assert seen["cwd"].startswith(sandbox_root) and not os.path.exists(seen["cwd"])
    assert seen["isolated"] == 1
    assert seen["env"]["HOME"] == seen["env"]["TMPDIR"] == seen["cwd"]
    assert "EBFT_SANDBOX_TEST_SECRET" not in seen["env"] and "https_proxy" not in seen["env"]


@pytest.mark.parametrize("program, reason", [
    ("assert 1 + 1 == 3, 'arithmetic'\n", "AssertionError: arithmetic"),
    ("def broken(:\n", "SyntaxError"),
    ("import sys\nsys.exit(0)\nraise AssertionError('never reached')\n", "exit(0) before its last line"),
    ("import os\nos._exit(0)\n", "status 0 before its last line"),
])
def test_a_failing_program_fails_with_its_reason(sandbox_root, program, reason):
    result = run_python(program, limits())
    assert (result.passed, result.status) == (False, "failed")
    assert reason in result.details


def test_an_infinite_loop_times_out_and_is_killed(sandbox_root):
    started = time.monotonic()
    result = run_python("while True:\n    pass\n", limits(timeout_s=1.5))
    assert (result.passed, result.status) == (False, "timeout")
    assert "1.5 s" in result.details
    assert time.monotonic() - started < 30


def test_the_cpu_limit_stops_a_busy_program_before_the_wall_clock(sandbox_root):
    result = run_python("while True:\n    pass\n", limits(cpu_s=1))
    assert (result.passed, result.status) == (False, "timeout")
    assert "CPU time limit" in result.details


def test_a_fork_bomb_is_refused_by_the_guards(sandbox_root):
    result = run_python("import os\nwhile True:\n    os.fork()\n", limits())
    assert (result.passed, result.status) == (False, "failed")
    assert "PermissionError" in result.details and "os.fork" in result.details


def test_without_the_guards_a_fork_bomb_is_bounded_by_rlimit_nproc(sandbox_root):
    bounded = nproc_enforcing_limits(timeout_s=2.5, python_guards=False, max_processes=6)
    if bounded is None:
        pytest.skip("no interpreter here runs the child as a user for whom RLIMIT_NPROC holds")
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(processes_under(sandbox_root)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # every process forks for ever; a refused fork is retried, as a real bomb would
        result = run_python(
            "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        time.sleep(0.01)\n", bounded)
    finally:
        done.set()
        watcher.join()
    assert (result.passed, result.status) == (False, "timeout")
    # The kernel holds the user to the tasks it had + max_processes + 1; the waiting parent of
    # the PID namespace (which stays root) may come on top.
    assert 2 <= peak[0] <= bounded.max_processes + 2


def sentinel_folder(root):
    folder = Path(root) / "evaluator-files"
    folder.mkdir()
    (folder / "sentinel.txt").write_text("keep me")
    return folder


def test_deleting_or_changing_files_outside_the_work_folder_is_refused(sandbox_root):
    folder = sentinel_folder(sandbox_root)
    sentinel = folder / "sentinel.txt"
    attempts = {
        "remove": f"os.remove({str(sentinel)!r})",
        "unlink relative": "os.unlink('../../evaluator-files/sentinel.txt')",
        "rmtree": f"shutil.rmtree({str(folder)!r})",
        "truncate by open": f"open({str(sentinel)!r}, 'w')",
        "append by os.open": f"os.open({str(sentinel)!r}, os.O_WRONLY | os.O_APPEND)",
        "rename away": f"os.rename({str(sentinel)!r}, 'stolen.txt')",
        "chmod": f"os.chmod({str(sentinel)!r}, 0)",
        "pathlib write": f"pathlib.Path({str(sentinel)!r}).write_text('overwritten')",
        "symlink then write": f"os.symlink({str(sentinel)!r}, 'link'); open('link', 'w')",
        "new file outside": f"open({str(folder / 'planted.py')!r}, 'w')",
    }
    program = "import json, os, pathlib, shutil\nrefused = {}\n"
    for name, statement in attempts.items():
        program += (f"try:\n    {statement}\n    refused[{name!r}] = False\n"
                    f"except PermissionError:\n    refused[{name!r}] = True\n")
    program += f"print(json.dumps(refused))\nos.remove({str(sentinel)!r})\n"
    result = run_python(program, limits())
    assert (result.passed, result.status) == (False, "failed")
    assert "PermissionError" in result.details
    assert json.loads(result.output.splitlines()[0]) == {name: True for name in attempts}
    assert sentinel.read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == ["sentinel.txt"]


def test_without_the_guards_the_kernel_still_protects_files_outside(sandbox_root):
    caps = probe_sandbox(limits())
    if not (caps.read_only_filesystem or caps.drops_to_user):
        pytest.skip("neither a read-only mount namespace nor a user to drop to on this system")
    sentinel = sentinel_folder(sandbox_root) / "sentinel.txt"
    result = run_python(f"import os\nos.remove({str(sentinel)!r})\n", limits(python_guards=False))
    assert (result.passed, result.status) == (False, "failed")
    assert "Read-only file system" in result.details or "not permitted" in result.details
    assert sentinel.read_text() == "keep me"


@pytest.mark.parametrize("program", [
    "blob = bytearray(64 * 1024 ** 3)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 ** 2))\n",
])
def test_a_huge_allocation_fails_inside_the_sandbox(sandbox_root, program):
    result = run_python(program, limits(memory_mb=256))
    assert (result.passed, result.status) == (False, "failed")
    assert "MemoryError" in result.details


@pytest.mark.parametrize("guards", [True, False])
def test_a_network_connection_fails(sandbox_root, guards):
    if not guards and not probe_sandbox(limits()).network_namespace:
        pytest.skip("no network namespace on this system: only the guards block the network")
    with socket.socket() as listener:  # a server in the evaluator the program tries to reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"
                   f".sendall(b'exfiltrated')\n")
        result = run_python(program, limits(python_guards=guards))
        assert (result.passed, result.status) == (False, "failed")
        assert ("network access is not allowed" if guards else "unreachable") in result.details
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_process_creation_and_signals_are_refused_by_the_guards(sandbox_root):
    attempts = {
        "subprocess": "import subprocess; subprocess.run(['true'])",
        "os.system": "os.system('true')",
        "os.posix_spawn": "os.posix_spawn('/bin/true', ['true'], {})",
        "exec": "os.execv('/bin/true', ['true'])",
        "multiprocessing": "import multiprocessing; multiprocessing.Process(target=print).start()",
        "kill the evaluator": "os.kill(os.getppid(), 9)",
        "ctypes": "import ctypes; ctypes.CDLL(None).fork()",
        "raise a limit": "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    }
    program = "import json, os\nrefused = {}\n"
    for name, statement in attempts.items():
        program += (f"try:\n    {statement}\n    refused[{name!r}] = False\n"
                    f"except PermissionError:\n    refused[{name!r}] = True\n")
    program += "print(json.dumps(refused))\n"
    result = run_python(program, limits())
    assert result.passed, result
    assert json.loads(result.output) == {name: True for name in attempts}


def test_numpy_works_but_its_ctypes_does_not_open_a_way_out(sandbox_root):
    program = (
        "import json, ctypes\nimport numpy as np\nrefused = {}\n"
        "for name, attempt in {'dlopen': lambda: ctypes.CDLL(None),\n"
        "                      'foreign call': lambda: ctypes.memmove(ctypes.create_string_buffer(4), b'abcd', 4),\n"
        "                      'pythonapi': lambda: ctypes.pythonapi.Py_IsInitialized()}.items():\n"
        "    try:\n        attempt()\n        refused[name] = False\n"
        "    except PermissionError:\n        refused[name] = True\n"
        "print(json.dumps(refused))\n"
        "assert float(np.mean([1.0, 3.0])) == 2.0\n"
    )
    result = run_python(program, limits())
    assert result.passed, result
    assert json.loads(result.output) == {"dlopen": True, "foreign call": True, "pythonapi": True}


def test_filling_the_disk_stops_at_the_work_folder_size(sandbox_root):
    if not probe_sandbox(limits()).read_only_filesystem:
        pytest.skip("no mount namespace here: RLIMIT_FSIZE bounds each file, not the folder")
    program = "for i in range(100):\n    open(f'fill{i}', 'wb').write(bytes(2 * 1024 ** 2))\n"
    result = run_python(program, limits(disk_mb=8, file_size_mb=4))
    assert (result.passed, result.status) == (False, "failed")
    assert "No space left on device" in result.details


def test_an_output_flood_is_cut_at_the_file_size_limit(sandbox_root):
    result = run_python("while True:\n    print('x' * 1000)\n", limits(file_size_mb=1, max_output_bytes=4096))
    assert (result.passed, result.status) == (False, "failed")
    assert "file size limit" in result.details
    assert len(result.output) < 4096 + 100


def test_a_background_process_that_left_the_session_dies_with_the_program(sandbox_root):
    if not probe_sandbox(limits()).pid_namespace:
        pytest.skip("no PID namespace here: a process that left the session is out of reach")
    # Guards off so that it can fork at all; a single fork is harmless even as root.
    program = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        print('grandchild alive', flush=True)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "time.sleep(0.5)\n"
    )
    result = run_python(program, limits(python_guards=False))
    assert result.passed, result
    assert "grandchild alive" in result.output
    # the sandbox_root fixture checks that the grandchild is gone
