"""The ``dmoverfs`` command: mount, unmount, status; cflags, preload, exec for C programs."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from dmoverfs import __version__, mount_helper, mounting, paths
from dmoverfs.tunables import Tunables


class _Parser(argparse.ArgumentParser):
    """argparse with short errors: what is wrong and where to look, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n(see: {self.prog} --help)\n")


def _positive(text: str) -> int:
    """A whole number of at least 1 (decimal, or 0x hexadecimal)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number (at least 1)")
    return value


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _mountpoint(args: argparse.Namespace) -> Path:
    return Path(os.path.abspath(args.mountpoint or paths.default_mountpoint()))


def _not_negative(text: str) -> int:
    value = int(text, 0)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _tunables(args: argparse.Namespace) -> Tunables:
    given = {name: getattr(args, name) for name in mount_helper.NUMERIC}
    given = {k: v for k, v in given.items() if v is not None}
    return Tunables.shared(**given) if args.allow_other else Tunables(**given)


def _server_args(args: argparse.Namespace) -> list[str]:
    """The options of this ``mount`` to hand to the background server."""
    out: list[str] = []
    for name in mount_helper.NUMERIC:
        value = getattr(args, name)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    if args.allow_other:
        out.append("--allow-other")
    if args.debug:
        out.append("--debug")
    if args.dev_link:
        out.append("--dev-link")
    if args.nonempty:
        out.append("--nonempty")
    for name in args.backend or ():
        out += ["--backend", name]
    for name in args.no_backend or ():
        out += ["--no-backend", name]
    return out


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = _mountpoint(args)
    tunables = _tunables(args)
    try:
        tunables.validate()
    except ValueError as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    try:
        if args.dev_link:
            mounting.check_dev_link(mountpoint)
        mounting.check_mountpoint(mountpoint, args.nonempty)
        mounting.check_fuse_device()
    except mounting.MountError as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    if args.foreground:
        from dmoverfs import backends
        from dmoverfs.server.main import serve  # imports pyfuse3 and the C core only here

        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.INFO,
            format="%(asctime)s dmoverfs[%(process)d] %(levelname)s %(name)s: %(message)s",
        )
        try:
            if args.dev_link:
                # Made before serving: it answers once the mount does, before "ready".
                mounting.make_dev_link(mountpoint)
            if args.ready_fd is None:  # under a systemd Type=notify unit: READY=1 once the mount answers
                args.ready_fd = mount_helper.systemd_ready_fd(mountpoint)
            try:
                registry = backends.make_registry(args.backend or (), args.no_backend or ())
            except backends.BackendError as exc:
                raise SystemExit(f"dmoverfs: {exc}") from None
            serve(
                str(mountpoint),
                tunables,
                allow_other=args.allow_other,
                debug=args.debug,
                ready_fd=args.ready_fd,
                registry=registry,
            )
        except OSError as exc:
            raise SystemExit(f"dmoverfs: {exc.strerror or exc}") from None
        except mounting.MountError as exc:
            raise SystemExit(f"dmoverfs: {exc}") from None
        finally:
            if args.dev_link:
                mounting.remove_dev_link(mountpoint)
        return 0
    log_file = Path(args.log_file) if args.log_file else paths.default_log_file(mountpoint)
    try:
        pid = mounting.spawn_server(mountpoint, _server_args(args), log_file).pid
    except mounting.MountError as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    print(f"dmoverfs mounted at {mountpoint} (server pid {pid}, log {log_file})")
    if args.dev_link:
        print(f"{mounting.DEV_LINK} -> {mounting.dev_link_target(mountpoint)}")
    print(f"unmount with: dmoverfs unmount {mountpoint}")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    mountpoint = _mountpoint(args)
    try:
        mounting.unmount(mountpoint)
    except mounting.MountError as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    print(f"dmoverfs unmounted from {mountpoint}")
    return 0


def _read_stats(mountpoint: Path) -> dict:
    try:
        with open(mountpoint / "stats", "rb") as f:
            return json.loads(f.read())
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise SystemExit(_stale(mountpoint)) from None
        raise SystemExit(f"dmoverfs: cannot read {mountpoint / 'stats'}: {exc.strerror}") from None


def _stale(mountpoint: Path) -> str:
    return f"dmoverfs: the server of {mountpoint} is gone (a stale mount); clear it with: dmoverfs unmount {mountpoint}"


def _require_mount(mountpoint: Path) -> None:
    """Exit with a message unless a live dmoverfs mount sits at *mountpoint*."""
    if not mounting.is_mounted(mountpoint):
        raise SystemExit(f"dmoverfs: {mountpoint} is not a dmoverfs mount; mount one with: dmoverfs mount {mountpoint}")
    if mounting.is_stale(mountpoint):
        raise SystemExit(_stale(mountpoint))


def cmd_status(args: argparse.Namespace) -> int:
    from dmoverfs.status import format_sessions, format_table

    mountpoint = _mountpoint(args)
    _require_mount(mountpoint)
    while True:
        data = _read_stats(mountpoint)
        if args.json:
            text = json.dumps(data, indent=2)
        else:
            text = format_sessions(data) if args.sessions else format_table(data)
        if args.watch:
            print("\x1b[H\x1b[2J" + text, flush=True)
            time.sleep(args.watch)
            continue
        print(text)
        return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dmoverfs.tools import bench

    return bench.main(args)


def cmd_backends(args: argparse.Namespace) -> int:
    """List the installed back-ends: speed and functions (or why one cannot load)."""
    from dmoverfs import backends

    failed = False
    for item in backends.installed():
        if isinstance(item, backends.BackendError):
            print(f"dmoverfs: {item}", file=sys.stderr)
            failed = True
            continue
        print(f"{item.name}: speed {item.speed:.3g} B/s, {len(item.functions)} function(s)")
        print(backends.describe(item))
    return 1 if failed else 0


def cmd_cflags(args: argparse.Namespace) -> int:
    from dmoverfs import native

    try:
        print(native.cflags())
    except native.NativeFileMissing as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    return 0


def cmd_preload(args: argparse.Namespace) -> int:
    from dmoverfs import native

    try:
        print(native.preload_library())
    except native.NativeFileMissing as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    """Run a program with the shim preloaded and DMOVERIO_PATH at the mount; replaces this process."""
    from dmoverfs import native

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("dmoverfs exec: no program given (dmoverfs exec [--mountpoint DIR] -- PROGRAM [ARGS...])")
    mountpoint = _mountpoint(args)
    _require_mount(mountpoint)
    try:
        env = native.exec_environment(mountpoint, os.environ)
    except native.NativeFileMissing as exc:
        raise SystemExit(f"dmoverfs: {exc}") from None
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"dmoverfs exec: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmoverfs", description="NetBSD's /dev/dmoverio data mover as a FUSE file system.")
    parser.add_argument("--version", action="version", version=f"dmoverfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="mount dmoverfs (returns when the mount is ready)")
    mount.add_argument("mountpoint", nargs="?", help=f"where to mount (default {paths.default_mountpoint()})")
    mount.add_argument("--queue-depth", type=_positive, help="requests outstanding per session (default 64)")
    mount.add_argument("--workers", type=_positive, help="C worker threads for large requests")
    mount.add_argument("--max-sessions", type=_positive, help="sessions open at once (ENFILE beyond)")
    mount.add_argument("--max-requests", type=_positive, help="requests outstanding over all sessions (EAGAIN beyond)")
    mount.add_argument("--max-meta-bytes", type=_positive, help="request metadata held over all sessions (EAGAIN beyond)")
    mount.add_argument("--max-user-sessions", type=_positive, help="sessions one user may have open (ENFILE beyond)")
    mount.add_argument("--max-user-requests", type=_positive, help="requests one user may have outstanding (EAGAIN beyond)")
    mount.add_argument("--max-user-meta-bytes", type=_positive, help="request metadata one user may hold (EAGAIN beyond)")
    mount.add_argument(
        "--slice-bytes", type=_not_negative, help="bytes of a request a worker runs before it turns to others (0: whole)"
    )
    mount.add_argument("--allow-other", action="store_true", help="let other users open sessions (FUSE allow_other)")
    mount.add_argument("--foreground", action="store_true", help="serve in this process instead of the background")
    mount.add_argument("--debug", action="store_true", help="log every FUSE request")
    mount.add_argument("--log-file", help="log of the background server")
    mount.add_argument("--dev-link", action="store_true", help="make /dev/dmoverio a link to the mount while it is up (root)")
    mount.add_argument("--nonempty", action="store_true", help="mount over a directory that is not empty (hiding its files)")
    mount.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="use only the named back-ends (repeatable; 'builtin' is the C core; see: dmoverfs backends)",
    )
    mount.add_argument("--no-backend", action="append", metavar="NAME", help="do not use back-end NAME (repeatable)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(func=cmd_mount)

    unmount = sub.add_parser("unmount", aliases=["umount"], help="stop the server and unmount (stale mounts too)")
    unmount.add_argument("mountpoint", nargs="?")
    unmount.set_defaults(func=cmd_unmount)

    status = sub.add_parser("status", help="show the counters of a mount")
    status.add_argument("mountpoint", nargs="?")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--watch", type=_seconds, metavar="SECONDS", help="refresh every SECONDS")
    status.add_argument("--sessions", action="store_true", help="one row per open session: opener, function, queue, counters")
    status.set_defaults(func=cmd_status)

    backends_cmd = sub.add_parser("backends", help="list the installed back-ends, their speed and functions")
    backends_cmd.set_defaults(func=cmd_backends)

    cflags = sub.add_parser("cflags", help="print the compiler flags for <dev/dmover/dmover_io.h>")
    cflags.set_defaults(func=cmd_cflags)
    preload = sub.add_parser("preload", help="print the path of libdmoverio.so, the LD_PRELOAD shim")
    preload.set_defaults(func=cmd_preload)
    run = sub.add_parser(
        "exec",
        help="run a NetBSD dmoverio program: the shim preloaded, DMOVERIO_PATH at the mount",
        usage="dmoverfs exec [--mountpoint DIR] -- PROGRAM [ARGS...]",
    )
    run.add_argument("--mountpoint", help=f"the mount to use (default {paths.default_mountpoint()})")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments")
    run.set_defaults(func=cmd_exec)

    from dmoverfs.tools.bench import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="benchmark against a C floor server and the kernel's copy (writes a table, JSON, PNG)")
    bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmoverfs`` command."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if mount_helper.is_helper_form(argv, mount_helper.subcommands(parser)):
        argv = mount_helper.mount_argv(argv)  # `dmoverfs SOURCE DIR -o OPTS`, as mount.fuse3 runs it
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _die_of_sigpipe()
    except OSError as exc:  # anything not foreseen above: one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dmoverfs {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _die_of_sigpipe() -> NoReturn:
    """The reader of our output went away (``dmoverfs status --watch 1 | head``): end as a C tool does, by SIGPIPE."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached


if __name__ == "__main__":
    sys.exit(main())
