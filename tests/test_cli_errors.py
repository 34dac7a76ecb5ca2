"""Every error of the dmoverfs command is a short message saying what to do: never a traceback.

Each case runs the real command (as root, or as a throwaway user) against
real mounts, a stale one included, and checks the exit status, that stderr
is one to three lines without a traceback, and the words that say what is
wrong and what to do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_cli

from conftest import require_fuse, temp_root
from dmoverfs import mounting
from users import TempUser, python_paths

REPO = Path(__file__).resolve().parent.parent


def dmoverfs(*args: str) -> subprocess.CompletedProcess:
    """The command's result, failed or not."""
    return test_cli.dmoverfs(*args, check=False)


def short_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Assert *result* failed with one to three lines holding every one of *words*; return the message."""
    message = result.stderr
    assert result.returncode not in (0, None), (result.returncode, result.stdout, message)
    assert "Traceback" not in message and "Error:" not in message, message
    assert 1 <= len(message.strip().splitlines()) <= 3, message
    for word in words:
        assert word in message, (word, message)
    return message


# -- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["mount", "--queue-depth", "abc"], ["--queue-depth", "'abc' is not a whole number", "--help"]),
        (["mount", "--workers", "-3"], ["--workers", "not a positive number"]),
        (["mount", "--max-sessions", "0x"], ["--max-sessions", "'0x' is not a whole number"]),
        (["mount", "--frobnicate"], ["unrecognized arguments: --frobnicate", "--help"]),
        (["status", "--watch", "soon"], ["--watch", "'soon' is not a number of seconds"]),
        (["status", "--watch", "0"], ["--watch", "not a positive number of seconds"]),
        (["stauts"], ["invalid choice: 'stauts'", "dmoverfs --help"]),
        (["mount", "--queue-depth", "100000"], ["queue depth must be between 1 and 65536"]),
    ],
    ids=["not-a-number", "negative", "bad-hex", "unknown-option", "watch-word", "watch-zero", "typo", "out-of-range"],
)
def test_bad_options(tmp_path, args, words):
    message = short_error(dmoverfs(*args, str(tmp_path / "m")) if args[0] == "mount" else dmoverfs(*args), *words)
    assert "_positive" not in message and "_seconds" not in message and "usage:" not in message
    assert not mounting.is_mounted(tmp_path / "m")


# -- the mount point ------------------------------------------------------------------------------


def test_mount_on_a_regular_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("data")
    short_error(dmoverfs("mount", str(target)), str(target), "is not a directory")
    assert target.read_text() == "data"


def test_mount_on_a_non_empty_directory_is_refused_unless_asked(background, tmp_path):
    background.mkdir()
    (background / "kept").write_text("hidden by a mount")
    short_error(dmoverfs("mount", str(background)), "is not empty", "--nonempty")
    assert not mounting.is_mounted(background)
    mounted = dmoverfs("mount", str(background), "--nonempty", "--log-file", str(tmp_path / "log"))
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert mounting.is_mounted(background) and "stats" in os.listdir(background)
    finally:
        assert dmoverfs("unmount", str(background)).returncode == 0
    assert (background / "kept").read_text() == "hidden by a mount"


def test_already_mounted_and_not_a_mount(mnt, tmp_path):
    short_error(dmoverfs("mount", str(mnt)), "already mounted", f"dmoverfs unmount {mnt}")
    for command in ("status", "unmount"):
        short_error(dmoverfs(command, str(tmp_path)), "not a dmoverfs mount")
    short_error(dmoverfs("exec", "--mountpoint", str(tmp_path), "--", "true"), "not a dmoverfs mount", "dmoverfs mount")


def test_a_stale_mount_is_named_with_the_way_out(server_factory):
    server = server_factory()
    point = server.mountpoint
    server.proc.kill()
    server.proc.wait()
    with pytest.raises(OSError) as info:
        os.listdir(point)
    assert info.value.strerror == "Transport endpoint is not connected"
    for args in (["status", str(point)], ["status", "--sessions", str(point)], ["exec", "--mountpoint", str(point), "true"]):
        short_error(dmoverfs(*args), "server", "is gone", f"dmoverfs unmount {point}")
    short_error(dmoverfs("mount", str(point)), "server is gone", f"dmoverfs unmount {point}")
    assert dmoverfs("unmount", str(point)).returncode == 0
    assert not mounting.is_mounted(point)


# -- output closed early ---------------------------------------------------------------------------


def test_status_watch_into_head_ends_quietly_by_sigpipe(mnt):
    """`dmoverfs status --watch 1 | head` ends as C tools do: killed by SIGPIPE, nothing on stderr."""
    watcher = subprocess.Popen(
        [sys.executable, "-m", "dmoverfs", "status", "--watch", "0.05", "--sessions", str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        head = subprocess.run(["head", "-n", "3"], stdin=watcher.stdout, capture_output=True, timeout=60)
        watcher.stdout.close()  # only head reads the pipe: once it exits, the pipe has no reader
        code = watcher.wait(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    err = watcher.stderr.read().decode()
    watcher.stderr.close()
    assert head.returncode == 0 and len(head.stdout.splitlines()) == 3
    assert code == -signal.SIGPIPE and err == "", (code, err)


# -- as an unprivileged user ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user():
    """A throwaway user who may reach the interpreter and the checkout (and, per test, /dev/fuse)."""
    base = temp_root() / f"cli-errors-{os.getpid()}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    person = TempUser(base, "e")
    try:
        person.grant_reach([*python_paths(), REPO, base])
        yield person
    finally:
        person.remove()
        shutil.rmtree(base, ignore_errors=True)


def as_user(user: TempUser, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``dmoverfs ARGS`` run by *user*, with *env* added to its clean environment."""
    return user.run(["env", *(f"{k}={v}" for k, v in (env or {}).items()), sys.executable, "-m", "dmoverfs", *args])


def test_unwritable_log_directory(user):
    require_fuse()
    user.grant_fuse()
    point = user.home / "mnt"
    state = temp_root() / f"root-owned-state-{os.getpid()}"
    state.mkdir(mode=0o755)  # the user may look, not write
    try:
        result = as_user(user, ["mount", str(point)], env={"XDG_STATE_HOME": str(state)})
        short_error(result, "cannot write the server's log", str(state / "dmoverfs"), "--log-file")
        assert not mounting.is_mounted(point)
    finally:
        shutil.rmtree(state)


def test_root_only_option(user):
    short_error(as_user(user, ["mount", "--dev-link", str(user.home / "mnt2")]), "--dev-link needs root")


def test_dev_fuse_not_accessible(user, tmp_path):
    """/dev/fuse closed to the user (a private mount namespace puts a root-only file in its place)."""
    require_fuse()
    closed = tmp_path / "closed-fuse"
    closed.touch(mode=0o600)
    os.chmod(closed, 0o600)
    point = user.home / "mnt3"
    script = (
        f"mount --bind {closed} /dev/fuse && exec setpriv --reuid={user.uid} --regid={user.gid} --clear-groups "
        f"env -i {' '.join(f'{k}={v}' for k, v in user.env().items())} {sys.executable} -m dmoverfs mount {point}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )
    short_error(result, "/dev/fuse is not accessible", "chmod 0666 /dev/fuse")
    assert not mounting.is_mounted(point)
