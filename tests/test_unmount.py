"""`dmoverfs unmount` always finishes: a stopped server, a killed one, one that answers; as root and as a user.

A server stopped with SIGSTOP holds the calls its clients made (a read, a
write on a full queue, a poll) and takes no new ones (a read of ``stats``).
The command must return within UNMOUNT_S with the mount gone and every one
of those clients freed with an error, leaving no process in D state: the
clients, the command and anything it started, as /proc/PID/stat shows them
while it runs and after. Whatever happens, the test aborts the connection,
continues the server and kills it (:func:`taken_down`). Without fusectl
mounted, root mounts it to abort, and a user is told that blocked clients
stay blocked (run in namespaces of their own, so the host keeps its fusectl).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import temp_root
from dmoverfs import mounting
from programs import FUSE_WAIT, FUSECTL, Child, Rescue, asleep_in, mount_device, python_program, wait_threads
from users import TempUser, make_user

PY = sys.executable
#: The bound on the whole command, whatever state the server is in.
UNMOUNT_S = 15.0
#: A freed client prints its result and exits within this once the command is done.
FREED_S = 5.0
DEPTH = 2
BLOCKED_KINDS = ("read", "write", "poll")


# -- processes --------------------------------------------------------------------------------


def state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("R", "S", "D", "T", "Z"), or "gone"."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    return text.rpartition(")")[2].split()[0]


def descendants(pid: int) -> list[int]:
    """The children of *pid*, their children, and so on (from /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{current}/task/{tid}/children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found += kids
            todo += kids
    return found


class Watch:
    """The states every process involved was seen in, sampled while the command runs."""

    def __init__(self, pids: list[int]) -> None:
        self.seen: dict[int, list[str]] = {pid: [] for pid in pids}
        #: What the command started (its descendants).
        self.started: set[int] = set()

    def sample(self, root: int) -> None:
        self.seen.setdefault(root, [])
        for pid in descendants(root):
            self.seen.setdefault(pid, [])
            self.started.add(pid)
        for pid, states in self.seen.items():
            now = state(pid)
            if not states or states[-1] != now:
                states.append(now)

    def left_in(self, letter: str) -> dict[int, str]:
        """Processes in state *letter* now."""
        return {pid: letter for pid in self.seen if state(pid) == letter}

    def describe(self) -> str:
        return "; ".join(f"{pid}: {'>'.join(states)}" for pid, states in self.seen.items())


def poll_waiting(wchan: str) -> bool:
    return wchan.startswith(("do_sys_poll", "poll_schedule_timeout", "do_poll"))


def blocked(child: Child, kind: str) -> None:
    """Wait until *child* sleeps in its call (a FUSE request, or poll's wait for a notification)."""
    child.expect("ready", 30)
    predicate = poll_waiting if kind == "poll" else asleep_in(FUSE_WAIT)
    if wait_threads(child.pid, predicate, 1, 10.0) < 1:
        pytest.fail(f"the {kind} client never blocked\n{child.describe()}")


def wait_state(pid: int, letter: str, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while state(pid) != letter:
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


@contextmanager
def taken_down(pid: int, mnt: Path, rescue: Rescue) -> Iterator[Callable[[], None]]:
    """A block in which the server *pid* of *mnt* may be stopped (SIGSTOP) by calling what it yields;
    after it, whatever happened, the mount's connection is aborted, the server continued and killed,
    and the mount detached."""
    pidfd = os.pidfd_open(pid)

    def stop() -> None:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        assert wait_state(pid, "T"), f"the server did not stop: {state(pid)}"

    try:
        yield stop
    finally:
        rescue.abort(mnt)
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                pass
        select.select([pidfd], [], [], 10.0)
        os.close(pidfd)
        if mounting.is_mounted(mnt):
            mounting.lazy_unmount(mnt)


def run_unmount(rescue: Rescue, command: list[str], watch: Watch, env: dict[str, str] | None = None) -> tuple[Child, float]:
    """Start the command, sample every process's state until it exits (or UNMOUNT_S); its time."""
    start = time.monotonic()
    cli = rescue.spawn(command, env=env)
    while cli.proc.poll() is None and time.monotonic() - start < UNMOUNT_S:
        watch.sample(cli.pid)
        time.sleep(0.02)
    took = time.monotonic() - start
    watch.sample(cli.pid)
    if not cli.reap(0.1):
        pytest.fail(f"dmoverfs unmount did not finish within {UNMOUNT_S} s\n{cli.describe()}\nstates: {watch.describe()}")
    return cli, took


def check_freed(clients: dict[str, Child], cli: Child, took: float, mnt: Path, watch: Watch) -> dict[str, str]:
    """The command succeeded in time, the mount is gone, every client's call returned and it exited,
    and nothing involved is left in D state. Returns what each client's calls returned."""
    assert cli.proc.returncode == 0, cli.describe()
    assert took < UNMOUNT_S
    assert mount_device(mnt) is None, "the mount is still in /proc/self/mountinfo"
    results = {}
    for kind, child in clients.items():
        assert child.reap(FREED_S), f"the {kind} client was not freed\n{child.describe()}\nstates: {watch.describe()}"
        results[kind] = outcome(child)
    time.sleep(0.1)  # the command's killed children, if any, have had time to go
    assert not watch.left_in("D"), f"left in D state: {watch.left_in('D')}; states: {watch.describe()}"
    left = {pid: state(pid) for pid in watch.started if state(pid) != "gone"}
    assert not left, f"the command left processes behind: {left}; states: {watch.describe()}"
    return results


def stuck_clients(rescue: Rescue, mnt: Path, kinds: tuple[str, ...], prefix: list[str], env: dict | None) -> dict[str, Child]:
    """One tests/programs/stuck.py client per kind of call, each blocked in it (run after *prefix*)."""
    clients = {}
    for kind in kinds:
        clients[kind] = rescue.spawn([*prefix, *python_program("stuck"), mnt, kind, str(DEPTH)], env=env)
        blocked(clients[kind], kind)
    return clients


def outcome(child: Child) -> str:
    """What a stuck.py client's calls returned, as it printed them ("result -1 ENXIO; after ...")."""
    child.describe()  # reads every line it printed
    return "; ".join(line for line in child.seen if line.startswith(("result", "after")))


#: What the clients of an aborted connection get (README, man page): the calls waiting in the server
#: fail with ECONNABORTED (a poll wakes with POLLERR), the next ones on the session with ENOTCONN.
ABORTED = {
    "read": "result -1 ECONNABORTED; after -1 ENOTCONN",
    "write": "result -1 ECONNABORTED; after -1 ENOTCONN",
    "poll": "result POLLERR 0; after POLLERR 0",
    "stats": "result -1 ECONNABORTED",
}


# -- root ------------------------------------------------------------------------------------


def test_unmount_of_a_stopped_server_frees_everything_within_the_deadline(rescue, server_factory):
    srv = server_factory("--queue-depth", str(DEPTH))
    mnt = srv.mountpoint
    rescue.watch(mnt)
    with taken_down(srv.pid, mnt, rescue) as stop:
        clients = stuck_clients(rescue, mnt, BLOCKED_KINDS, [], None)
        stop()
        clients |= stuck_clients(rescue, mnt, ("stats",), [], None)  # a new request: the server never sees it
        watch = Watch([srv.pid, *(c.pid for c in clients.values())])
        cli, took = run_unmount(rescue, [PY, "-m", "dmoverfs", "unmount", str(mnt)], watch)
        results = check_freed(clients, cli, took, mnt, watch)
        stderr = cli.stderr()
        assert "does not answer" in stderr and "aborting its FUSE connection" in stderr, stderr
        assert results == ABORTED
        # The server was not signalled by the command: it is still there, stopped; continued, it
        # finds its connection gone and exits by itself (server_factory checks its log).
        assert state(srv.pid) == "T"
        srv.proc.send_signal(signal.SIGCONT)
        assert srv.proc.wait(10) == 0
        print(f"unmount of a stopped server took {took:.2f} s; clients got {results}")


def test_unmount_of_a_killed_server_says_the_mount_was_stale(rescue, server_factory):
    srv = server_factory()
    mnt = srv.mountpoint
    srv.proc.kill()
    srv.proc.wait(10)
    assert mounting.is_mounted(mnt)
    result = subprocess.run([PY, "-m", "dmoverfs", "unmount", str(mnt)], capture_output=True, text=True, timeout=UNMOUNT_S)
    assert result.returncode == 0, result.stderr
    assert "is gone (stale mount: Transport endpoint is not connected)" in result.stderr
    assert mount_device(mnt) is None


def test_unmount_of_an_answering_server_stops_it_quietly(rescue, server_factory):
    srv = server_factory("--queue-depth", str(DEPTH))
    mnt = srv.mountpoint
    rescue.watch(mnt, probe=mnt / "stats")
    clients = stuck_clients(rescue, mnt, BLOCKED_KINDS, [], None)
    result = subprocess.run([PY, "-m", "dmoverfs", "unmount", str(mnt)], capture_output=True, text=True, timeout=UNMOUNT_S)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert srv.proc.wait(10) == 0
    for child in clients.values():
        assert child.reap(FREED_S), child.describe()
    # The server's own shutdown: blocked calls end with ENXIO, a poller sees what it asked for.
    first = {kind: outcome(child).split(";")[0] for kind, child in clients.items()}
    assert first == {"read": "result -1 ENXIO", "write": "result -1 ENXIO", "poll": "result POLLIN 0"}


# -- an unprivileged user on a mount of their own -----------------------------------------------


@pytest.fixture(scope="module")
def user() -> Iterator[TempUser]:
    base = temp_root() / f"unmount-{os.getpid()}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    made = make_user(base, "u", mounts=True)
    yield made
    made.remove()
    base.rmdir()


def as_user(user: TempUser) -> list[str]:
    """The command prefix that runs a program as *user* in the same process (so its pid is the program's)."""
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--"]


def test_a_user_unmounts_their_own_stopped_server(rescue, user):
    mnt = user.make_dir(user.home.parent / f"{user.name}-mnt-{secrets.token_hex(2)}")
    log = user.home / "server.log"
    done = user.run([PY, "-m", "dmoverfs", "mount", str(mnt), "--queue-depth", str(DEPTH), "--log-file", str(log)])
    assert done.returncode == 0, done.stderr
    server_pid = int(re.search(r"\(server pid (\d+),", done.stdout).group(1))
    try:
        with taken_down(server_pid, mnt, rescue) as stop:
            connection = rescue.watch(mnt)
            # The connection's abort file is the mount owner's: what lets the command abort it without root.
            assert os.stat(FUSECTL / str(connection) / "abort").st_uid == user.uid
            env = user.env()
            clients = stuck_clients(rescue, mnt, BLOCKED_KINDS, as_user(user), env)
            stop()
            clients |= stuck_clients(rescue, mnt, ("stats",), as_user(user), env)
            watch = Watch([server_pid, *(c.pid for c in clients.values())])
            command = [*as_user(user), PY, "-m", "dmoverfs", "unmount", str(mnt)]
            cli, took = run_unmount(rescue, command, watch, env)
            results = check_freed(clients, cli, took, mnt, watch)
            assert "does not answer" in cli.stderr(), cli.describe()
            assert results == ABORTED
            assert state(server_pid) == "T"
            print(f"a user's unmount of their stopped server took {took:.2f} s; clients got {results}")
    finally:
        log.unlink(missing_ok=True)


# -- no fusectl mounted ---------------------------------------------------------------------------

#: Run in a mount and pid namespace of its own, where fusectl is unmounted first: a stopped server's
#: mount, with a client blocked in a read, unmounted by the command; the mount, the client and the
#: command run after the prefix (as a user, or not). Prints what it saw as JSON.
NO_FUSECTL = """
import json, os, re, select, signal, subprocess, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from dmoverfs import mounting
from programs import FUSE_WAIT, FUSECTL, asleep_in, python_program, wait_threads
mnt, prefix, env = Path({mnt!r}), {prefix!r}, {env!r}
subprocess.run(["umount", str(FUSECTL)], check=True, timeout=30)
seen = {{"fusectl_before": os.path.ismount(FUSECTL)}}
mounted = subprocess.run([*prefix, sys.executable, "-m", "dmoverfs", "mount", str(mnt), "--queue-depth", "2",
                          "--log-file", {log!r}], capture_output=True, text=True, env=env, timeout=60, check=True)
server = int(re.search(r"server pid (\\d+)", mounted.stdout).group(1))  # our orphan: this is the namespace's init
reader = subprocess.Popen([*prefix, *python_program("stuck"), str(mnt), "read", "2"], stdout=subprocess.PIPE, env=env)
try:
    seen["ready"] = reader.stdout.readline().decode().strip()
    seen["blocked"] = wait_threads(reader.pid, asleep_in(FUSE_WAIT), 1, 10.0)
    os.kill(server, signal.SIGSTOP)
    cli = subprocess.run([*prefix, sys.executable, "-m", "dmoverfs", "unmount", str(mnt)], capture_output=True, text=True,
                         env=env, timeout=30)
    seen |= {{"rc": cli.returncode, "stderr": cli.stderr, "fusectl_after": os.path.ismount(FUSECTL)}}
    seen["mounted"] = mounting.is_mounted(mnt)
    freed = select.select([reader.stdout], [], [], 5.0)[0]
    seen["reader"] = os.read(reader.stdout.fileno(), 4096).decode().splitlines() if freed else "still blocked"
finally:
    for signum in (signal.SIGCONT, signal.SIGKILL):
        os.kill(server, signum)
    os.waitpid(server, 0)
    reader.kill()
print(json.dumps(seen))
"""


def without_fusectl(mnt: Path, log: Path, prefix: list[str], env: dict | None) -> dict:
    """Run NO_FUSECTL in namespaces of its own: whatever happens, its processes and mounts die with it."""
    tests = str(Path(__file__).resolve().parent)
    code = NO_FUSECTL.format(tests=tests, mnt=str(mnt), log=str(log), prefix=prefix, env=env)
    command = ["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child", "--mount-proc", PY, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["fusectl_before"] is False and seen["ready"] == "ready" and seen["blocked"] == 1, seen
    assert "does not answer" in seen["stderr"] and seen["mounted"] is False, seen
    return seen


def test_root_mounts_fusectl_to_abort_when_it_is_missing(tmp_path):
    (tmp_path / "mnt").mkdir()
    seen = without_fusectl(tmp_path / "mnt", tmp_path / "log", [], None)
    assert seen["rc"] == 0 and seen["fusectl_after"] is True, seen
    assert seen["reader"] == ["result -1 ECONNABORTED", "after -1 ENOTCONN"], seen


def test_a_user_without_fusectl_is_told_that_blocked_clients_stay_blocked(user):
    mnt = user.make_dir(user.home.parent / f"{user.name}-mnt-{secrets.token_hex(2)}")
    seen = without_fusectl(mnt, user.home / "nofusectl.log", as_user(user), user.env())
    # Detached, but nothing could free the client: the command says so and fails.
    assert seen["rc"] == 1 and seen["fusectl_after"] is False, seen
    assert "fusectl is not mounted" in seen["stderr"] and "stay blocked" in seen["stderr"], seen
    assert seen["reader"] == "still blocked", seen
