"""The C side of dmoverfs for other programs: the header and the preload shim.

An installed wheel carries them inside the package (``dmoverfs/include``,
``dmoverfs/lib/libdmoverio.so``); an editable install (``scripts/setup``)
finds them in the source tree (``csrc/include``, ``csrc/shim/libdmoverio.so``,
built there by the package's build hook). Also what ``dmoverfs exec`` puts in
a program's environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

HEADER = Path("dev") / "dmover" / "dmover_io.h"
SHIM_NAME = "libdmoverio.so"
#: The shim opens this when /dev/dmoverio does not exist (csrc/shim/libdmoverio.c).
DEVICE_ENV = "DMOVERIO_PATH"

_PACKAGE = Path(__file__).resolve().parent
_SOURCE = _PACKAGE.parent / "csrc"


class NativeFileMissing(Exception):
    """The header or the shim is not where an installed dmoverfs keeps it."""


def _first(candidates: list[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise NativeFileMissing(f"{what} not found (looked in {looked}); reinstall dmoverfs (scripts/setup)")


def include_dir() -> Path:
    """The directory to give the compiler with ``-I`` for ``<dev/dmover/dmover_io.h>``."""
    dirs = [_PACKAGE / "include", _SOURCE / "include"]
    return _first([d / HEADER for d in dirs], "the header dev/dmover/dmover_io.h").parents[2]


def cflags() -> str:
    """Compiler flags for programs using the header."""
    return f"-I{include_dir()}"


def preload_library() -> Path:
    """The absolute path of ``libdmoverio.so``."""
    return _first([_PACKAGE / "lib" / SHIM_NAME, _SOURCE / "shim" / SHIM_NAME], SHIM_NAME)


def exec_environment(mountpoint: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """*environ* with the shim preloaded first and ``DMOVERIO_PATH`` at the mount's clone file.

    The shim goes in front of any ``LD_PRELOAD`` already there (once);
    ld.so takes spaces and colons as separators.
    """
    shim = str(preload_library())
    env = dict(environ)
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != shim]
    env["LD_PRELOAD"] = ":".join([shim, *others])
    env[DEVICE_ENV] = str(Path(os.path.abspath(mountpoint)) / "dmoverio")
    return env
