"""cffi builders of the package's C extensions.

``dmoverfs._server`` is the server's C: the core (``core/``: decoding,
execution, sessions and the one rule for their reads, writes and polls) and
the transport (``server/``: the data plane that owns /dev/fuse), linked with
libfuse, which mounts.  ``dmoverfs._core`` is the core alone, without
libfuse: the tests of the core and the fuzz harness build it.

The declarations given to cffi are read from ``core/dmcore.h`` (the block
between its cdef markers) so the header stays the one source of truth; the
wire-format structs are declared in full so that cffi's own layout checks
fail the import if they ever disagree with ``dev/dmover/dmover_io.h``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import cffi

CSRC = Path(__file__).resolve().parent
CORE = CSRC / "core"
SERVER = CSRC / "server"
INCLUDE = CSRC / "include"

WIRE_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
typedef struct { struct iovec *dmbuf_iov; unsigned int dmbuf_iovcnt; } dmio_buffer;
struct dmio_usrreq {
    dmio_buffer req_outbuf;
    uint8_t req_immediate[8];
    dmio_buffer *req_inbuf;
    uint32_t req_id;
};
struct dmio_usrresp { uint32_t resp_id; int resp_error; uint8_t resp_immediate[8]; };
struct dmio_setfunc { char dsf_name[64]; };
"""

WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter"]


def header_cdef(header: Path) -> str:
    """The declarations between the cdef markers of *header*."""
    match = re.search(r"/\* cdef begin \*/(.*)/\* cdef end \*/", header.read_text(), re.S)
    if match is None:
        raise RuntimeError(f"{header.name} has no cdef block")
    return match.group(1)


def core_sources() -> list[str]:
    """The C files of the core, relative paths as setuptools wants them."""
    return sorted(str(p) for p in CORE.glob("*.c"))


def sanitize_flags() -> list[str]:
    """Sanitizer flags when DMOVERFS_SANITIZE is set (used by scripts/test --sanitize)."""
    if os.environ.get("DMOVERFS_SANITIZE"):
        return ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    return []


def make_builder() -> cffi.FFI:
    """A cffi builder for ``dmoverfs._core``: the core alone (no libfuse)."""
    ffi = cffi.FFI()
    ffi.cdef(WIRE_CDEF + header_cdef(CORE / "dmcore.h"))
    san = sanitize_flags()
    ffi.set_source(
        "dmoverfs._core",
        '#include <dev/dmover/dmover_io.h>\n#include "dmcore.h"\n',
        sources=core_sources(),
        include_dirs=[str(CORE), str(INCLUDE)],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=["-std=gnu11", "-O2", *WARNINGS, *san],
        extra_link_args=san,
        libraries=["pthread", "dl"],
    )
    return ffi


def pkg_config(*args: str) -> list[str]:
    """Flags from pkg-config (libfuse3-dev provides fuse3.pc)."""
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"pkg-config {' '.join(args)} failed: install pkg-config and libfuse3-dev") from exc
    return out.split()


def fuse_include_dirs() -> list[str]:
    """libfuse's header directories (as -isystem: its headers are not ours to lint)."""
    return [flag[2:] for flag in pkg_config("--cflags-only-I", "fuse3")]


def make_server_builder() -> cffi.FFI:
    """A cffi builder for ``dmoverfs._server``: the core and the transport, with libfuse."""
    ffi = cffi.FFI()
    ffi.cdef(WIRE_CDEF + header_cdef(CORE / "dmcore.h") + header_cdef(SERVER / "transport.h"))
    san = sanitize_flags()
    ffi.set_source(
        "dmoverfs._server",
        '#include <dev/dmover/dmover_io.h>\n#include "dmcore.h"\n#include "transport.h"\n',
        sources=[*core_sources(), *server_sources()],
        include_dirs=[str(CORE), str(SERVER), str(INCLUDE)],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=["-std=gnu11", "-O2", *WARNINGS, *san, *(f"-isystem{d}" for d in fuse_include_dirs())],
        extra_link_args=san,
        libraries=["fuse3", "pthread", "dl"],
    )
    return ffi


def server_sources() -> list[str]:
    """The C files of the transport."""
    return sorted(str(p) for p in SERVER.glob("*.c"))


def builders() -> list[cffi.FFI]:
    """Every extension module of the package."""
    return [make_server_builder()]


if __name__ == "__main__":
    for builder in builders():
        builder.compile(verbose=True)
