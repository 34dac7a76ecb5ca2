"""Imported by every Python process of a ``scripts/test --sanitize`` run (PYTHONPATH).

The C core is then built with AddressSanitizer, whose runtime must come first
in a process.  A Python process that lacks it re-executes itself with
LD_PRELOAD=$DMOVERFS_SANITIZER_PRELOAD (the runtime, then libstdc++, whose
__cxa_throw the runtime must find for C++ extensions such as matplotlib's);
one that has it drops LD_PRELOAD again, so that the programs it starts
(pgrep, mount, compilers, the C examples) run without it -- the runtime
preloaded into uninstrumented programs can deadlock them (glibc's textdomain
lock, llvm-project issue 49223).  Python children, servers included,
re-execute themselves the same way.
"""

import os
import sys


def _loaded(lib: str) -> bool:
    real = os.path.realpath(lib)
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(real) for line in maps)


def _preload() -> None:
    libs = [p for p in os.environ.get("DMOVERFS_SANITIZER_PRELOAD", "").split(":") if p]
    if not libs:
        return
    rest = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p not in libs]
    if _loaded(libs[0]):
        if rest:
            os.environ["LD_PRELOAD"] = ":".join(rest)
        else:
            os.environ.pop("LD_PRELOAD", None)
        os.environ.pop("_DMOVERFS_SANITIZER_REEXEC", None)
        return
    if os.environ.get("_DMOVERFS_SANITIZER_REEXEC"):
        raise SystemExit(f"sitecustomize: {libs[0]} is still not loaded after re-executing with LD_PRELOAD")
    os.environ["LD_PRELOAD"] = ":".join([*libs, *rest])
    os.environ["_DMOVERFS_SANITIZER_REEXEC"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


_preload()
