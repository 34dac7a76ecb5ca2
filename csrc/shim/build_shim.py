"""Building ``libdmoverio.so``, the LD_PRELOAD shim, and its pkg-config file.

Used by the package build hook (``csrc/hatch_build.py``) and by the tests.
The shim is plain C11 with no dependency but libc (and libdl on older
glibc), built warning-free.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent
CSRC = SHIM_DIR.parent
SOURCE = SHIM_DIR / "libdmoverio.c"
INCLUDE = CSRC / "include"
LIBRARY = SHIM_DIR / "libdmoverio.so"

WARNINGS = ["-Wall", "-Wextra", "-Werror"]
FLAGS = ["-std=c11", *WARNINGS, "-O2", "-g", "-fPIC", "-shared", "-fvisibility=hidden"]
LIBS = ["-ldl"]


def compiler() -> str:
    """The C compiler: ``$CC`` or ``cc``."""
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"no C compiler ({name!r}) on PATH: install gcc (scripts/setup does)")
    return path


def command(output: Path, extra: list[str] | None = None) -> list[str]:
    """The compiler command that builds the shim into *output*."""
    return [compiler(), *FLAGS, *(extra or []), f"-I{INCLUDE}", "-o", str(output), str(SOURCE), *LIBS]


def build(output: Path = LIBRARY) -> Path:
    """Compile the shim into *output*, replacing any old one atomically.

    A program may have the old library mapped: it keeps its (now unlinked)
    copy instead of seeing the file change under it.
    """
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    cmd = command(tmp)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or proc.stderr.strip():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def pkg_config(version: str, include_dir: str, preload: str, prefix: str | None = None) -> str:
    """The text of ``dmoverio.pc``; paths may use ``${prefix}`` when *prefix* is given."""
    head = f"prefix={prefix}\n" if prefix is not None else ""
    return (
        f"{head}includedir={include_dir}\n"
        f"preload={preload}\n"
        "\n"
        "Name: dmoverio\n"
        "Description: NetBSD's /dev/dmoverio data mover on Linux through dmoverfs: "
        "<dev/dmover/dmover_io.h> and the libdmoverio.so preload shim\n"
        f"Version: {version}\n"
        "Cflags: -I${includedir}\n"
    )


def installed_pkg_config(version: str) -> str:
    """``dmoverio.pc`` for a wheel: installed as ``<prefix>/lib/pkgconfig``, pointing into the package.

    The package is at ``<prefix>/lib/pythonX.Y/site-packages/dmoverfs`` (a
    virtualenv's layout); ``${pcfiledir}`` keeps the file relocatable.
    """
    site = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/dmoverfs"
    return pkg_config(
        version,
        include_dir=f"${{prefix}}/{site}/include",
        preload=f"${{prefix}}/{site}/lib/libdmoverio.so",
        prefix="${pcfiledir}/../..",
    )


def source_tree_pkg_config(version: str) -> str:
    """``dmoverio.pc`` for an editable install: absolute paths into this source tree."""
    return pkg_config(version, include_dir=str(INCLUDE), preload=str(LIBRARY))


if __name__ == "__main__":
    print(build())
