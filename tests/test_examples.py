"""The C example programs and the C header.

The programs in csrc/examples are compiled warning-free (a missing compiler
is a failure) and run against a real mount; the header's layout is compared
with the Python wire format and the cffi declarations; bash's ``read -t 0``
serves as a select()-based readiness probe on a session descriptor.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import dmio
from dmoverfs import wire
from programs import compiler

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "csrc" / "include"
EXAMPLES = ROOT / "csrc" / "examples"
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", f"-I{INCLUDE}"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]
RUN_TIMEOUT_S = 120  # a guard against hangs, not a performance bound
WAIT_MS = 10_000

FUNCTIONS = ["zero", "fill8", "copy", *(f"xor{n}" for n in range(2, 17)), "iscsi-crc32c"]
CRC_CHECK = 0xE3069283  # CRC32C of b"123456789"


# -- building and running -------------------------------------------------------------


def compile_c(source: Path, output: Path, flags: list[str]) -> Path:
    cmd = [compiler(), *flags, "-o", str(output), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    if proc.stderr.strip():
        pytest.fail(f"{' '.join(cmd)} printed diagnostics:\n{proc.stderr}")
    return output


class Builder:
    """Compiles each example once per module and flag set."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.built: dict[tuple[str, bool], Path] = {}

    def __call__(self, name: str, sanitize: bool = False) -> Path:
        key = (name, sanitize)
        if key not in self.built:
            flags = CFLAGS + (SANITIZE if sanitize else [])
            out = self.directory / (name + ("-san" if sanitize else ""))
            self.built[key] = compile_c(EXAMPLES / f"{name}.c", out, flags)
        return self.built[key]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Builder:
    return Builder(tmp_path_factory.mktemp("examples"))


def run_example(program: Path, mnt: Path | None, *args: str, device: Path | None = None):
    """Run a program with DMOVERIO_PATH pointing at the mount's clone file."""
    if device is None:
        assert mnt is not None
        device = mnt / "dmoverio"
    env = {**os.environ, "DMOVERIO_PATH": str(device)}
    try:
        return subprocess.run([str(program), *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{program.name} {' '.join(args)} did not finish within {RUN_TIMEOUT_S} s:\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}"
        )


def assert_success(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr == "", f"{proc.args} wrote to stderr:\n{proc.stderr}"
    return proc.stdout.splitlines()


# -- hw_bzero ----------------------------------------------------------------------------


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "sanitized"])
def test_hw_bzero(mnt, build, sanitize):
    lines = assert_success(run_example(build("hw_bzero", sanitize), mnt))
    assert lines == [f"hw_bzero: zeroed {256 * 1024 + 13} bytes through {mnt / 'dmoverio'}"]


def test_hw_bzero_reports_a_missing_device(build, tmp_path):
    missing = tmp_path / "no-such-dir" / "dmoverio"
    proc = run_example(build("hw_bzero"), None, device=missing)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr == f"hw_bzero: open on {missing}: No such file or directory\n"


def test_hw_bzero_reports_a_device_that_is_no_data_mover(build):
    """/dev/null opens, but takes no user.* attribute: the program says which step failed."""
    proc = run_example(build("hw_bzero"), None, device=Path("/dev/null"))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr == (
        'hw_bzero: select function "zero" (fsetxattr user.dmover.function) on /dev/null: Operation not permitted\n'
    )


# -- allfuncs ----------------------------------------------------------------------------


def test_allfuncs_covers_every_function_of_the_mount(mnt):
    # NetBSD's functions, all of them; the mount may offer extensions besides.
    assert set(FUNCTIONS) <= set(os.listdir(mnt / "func"))


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "sanitized"])
def test_allfuncs(mnt, build, sanitize):
    lines = assert_success(run_example(build("allfuncs", sanitize), mnt))
    results = [line for line in lines if not line.startswith("iscsi-crc32c ") and not line.startswith("allfuncs:")]
    assert [line.split(":")[0] for line in results] == FUNCTIONS
    for line in results:
        assert ": ok (128 requests, " in line, line
    assert f"iscsi-crc32c check value: ok (0x{CRC_CHECK:08x})" in lines
    assert f"iscsi-crc32c chained: ok (0x{CRC_CHECK:08x})" in lines
    assert lines[-1] == f"allfuncs: all {len(FUNCTIONS)} functions passed"


def test_allfuncs_fails_without_a_device(build, tmp_path):
    proc = run_example(build("allfuncs"), None, device=tmp_path / "absent")
    assert proc.returncode == 1
    assert "zero: FAILED" in proc.stdout.splitlines()
    assert "No such file or directory" in proc.stderr


# -- readiness ---------------------------------------------------------------------------


def readiness_lines(mech: str, depth: int) -> list[str]:
    return [
        f"{mech}: idle session is writable and not readable",
        f"{mech}: readable once a request completed",
        f"{mech}: not writable with {depth} requests outstanding",
        f"{mech}: writable again after reading {depth} responses",
        f"{mech}: ok",
    ]


@pytest.mark.parametrize("mech", ["poll", "select", "epoll"])
def test_readiness(mnt, build, mech):
    lines = assert_success(run_example(build("readiness"), mnt, mech))
    assert lines == readiness_lines(mech, wire.NREQS_MAX)


def test_readiness_all_sanitized(mnt, build):
    lines = assert_success(run_example(build("readiness", sanitize=True), mnt, "all"))
    assert lines == [line for mech in ("poll", "select", "epoll") for line in readiness_lines(mech, wire.NREQS_MAX)]


def test_readiness_with_another_queue_depth(server_factory, build):
    srv = server_factory("--queue-depth", "4")
    lines = assert_success(run_example(build("readiness"), srv.mountpoint, "all", "4"))
    assert lines == [line for mech in ("poll", "select", "epoll") for line in readiness_lines(mech, 4)]


def test_readiness_notices_a_wrong_queue_depth(mnt, build):
    """The program really checks the depth: told 63 on a depth-64 mount, it fails."""
    proc = run_example(build("readiness"), mnt, "poll", "63")
    assert proc.returncode == 1
    assert "poll: FAILED" in proc.stdout.splitlines()
    assert "accepted 64 requests before EAGAIN, expected the queue depth 63" in proc.stderr


def test_readiness_usage(build):
    proc = subprocess.run([str(build("readiness")), "kqueue"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: readiness poll|select|epoll|all")


# -- the header --------------------------------------------------------------------------

LAYOUT_PROGRAM = r"""
#include <dev/dmover/dmover_io.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define SIZE(t) printf("sizeof %s %zu\n", #t, sizeof(t))
#define OFF(t, m) printf("offsetof %s %s %zu\n", #t, #m, offsetof(t, m))

static void dump(const char *name, const void *p, size_t n)
{
	const unsigned char *b = p;
	size_t i;

	printf("bytes %s ", name);
	for (i = 0; i < n; i++)
		printf("%02x", b[i]);
	printf("\n");
}

int main(void)
{
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	unsigned i;

	SIZE(struct iovec);
	SIZE(dmio_buffer);
	SIZE(struct dmio_usrreq);
	SIZE(struct dmio_usrresp);
	SIZE(struct dmio_setfunc);
	OFF(dmio_buffer, dmbuf_iov);
	OFF(dmio_buffer, dmbuf_iovcnt);
	OFF(struct dmio_usrreq, req_outbuf);
	OFF(struct dmio_usrreq, req_outbuf.dmbuf_iovcnt);
	OFF(struct dmio_usrreq, req_immediate);
	OFF(struct dmio_usrreq, req_inbuf);
	OFF(struct dmio_usrreq, req_id);
	OFF(struct dmio_usrresp, resp_id);
	OFF(struct dmio_usrresp, resp_error);
	OFF(struct dmio_usrresp, resp_immediate);
	OFF(struct dmio_setfunc, dsf_name);
	printf("const DMIO_MAX_FUNCNAME %d\n", DMIO_MAX_FUNCNAME);
	printf("const DMIO_NREQS_MAX %d\n", DMIO_NREQS_MAX);
	printf("const DMIO_SETFUNC %lu\n", (unsigned long)DMIO_SETFUNC);
	printf("string DMOVERFS_XATTR_FUNCTION %s\n", DMOVERFS_XATTR_FUNCTION);
	printf("string DMOVERFS_XATTR_NONBLOCK %s\n", DMOVERFS_XATTR_NONBLOCK);

	memset(&req, 0, sizeof(req));
	req.req_outbuf.dmbuf_iov = (struct iovec *)(uintptr_t)0x1122334455667788u;
	req.req_outbuf.dmbuf_iovcnt = 0x99aabbccu;
	for (i = 0; i < 8; i++)
		req.req_immediate[i] = (uint8_t)(0xf0 + i);
	req.req_inbuf = (dmio_buffer *)(uintptr_t)0x0102030405060708u;
	req.req_id = 0xdeadbeefu;
	dump("req", &req, sizeof(req));

	memset(&resp, 0, sizeof(resp));
	resp.resp_id = 0x01020304u;
	resp.resp_error = -22;
	for (i = 0; i < 8; i++)
		resp.resp_immediate[i] = (uint8_t)(0xa0 + i);
	dump("resp", &resp, sizeof(resp));
	return 0;
}
"""

REQ_VALUES = (0x1122334455667788, 0x99AABBCC, bytes(range(0xF0, 0xF8)), 0x0102030405060708, 0xDEADBEEF)
RESP_VALUES = (0x01020304, -22, bytes(range(0xA0, 0xA8)))


def header_layout(directory: Path) -> dict[str, str]:
    """What the header says (sizes, offsets, constants, packed bytes), as printed by a program compiled against it."""
    source = directory / "layout.c"
    source.write_text(LAYOUT_PROGRAM)
    program = compile_c(source, directory / "layout", [*CFLAGS, "-pedantic"])
    proc = subprocess.run([str(program)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True)
    facts = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.rpartition(" ")
        facts[key] = value
    return facts


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return header_layout(tmp_path_factory.mktemp("layout"))


@pytest.mark.parametrize("std", ["c99", "c11", "c17"])
def test_header_compiles_pedantic(tmp_path, std):
    source = tmp_path / "uses_header.c"
    source.write_text(
        "#include <dev/dmover/dmover_io.h>\n"
        "int main(void)\n{\n"
        "\tstruct dmio_usrreq req = { 0 };\n"
        '\tstruct dmio_setfunc dsf = { "zero" };\n'
        "\treturn (int)req.req_id + dsf.dsf_name[4];\n}\n"
    )
    flags = [f"-std={std}", "-pedantic", "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE}"]
    compile_c(source, tmp_path / "uses_header", flags)


def test_header_sizes_match_wire_and_cffi(c_layout):
    from dmoverfs._server import ffi

    for c_name, wire_size, ffi_name in [
        ("struct dmio_usrreq", wire.REQ_SIZE, "struct dmio_usrreq"),
        ("struct dmio_usrresp", wire.RESP_SIZE, "struct dmio_usrresp"),
        ("dmio_buffer", wire.BUFFER.size, "dmio_buffer"),
        ("struct iovec", wire.IOVEC.size, "struct iovec"),
        ("struct dmio_setfunc", wire.MAX_FUNCNAME, "struct dmio_setfunc"),
    ]:
        c_size = int(c_layout[f"sizeof {c_name}"])
        assert c_size == wire_size == ffi.sizeof(ffi_name), c_name
    assert wire.REQ_SIZE == 40 and wire.RESP_SIZE == 16
    assert dmio.REQ.size == wire.REQ_SIZE and dmio.RESP.size == wire.RESP_SIZE


def test_header_offsets_match_wire_and_cffi(c_layout):
    from dmoverfs._server import ffi

    expected_req = {"req_outbuf": 0, "req_outbuf.dmbuf_iovcnt": 8, "req_immediate": 16, "req_inbuf": 24, "req_id": 32}
    for member, offset in expected_req.items():
        assert int(c_layout[f"offsetof struct dmio_usrreq {member}"]) == offset, member
        assert ffi.offsetof("struct dmio_usrreq", *member.split(".")) == offset, member
    expected_resp = {"resp_id": 0, "resp_error": 4, "resp_immediate": 8}
    for member, offset in expected_resp.items():
        assert int(c_layout[f"offsetof struct dmio_usrresp {member}"]) == offset, member
        assert ffi.offsetof("struct dmio_usrresp", member) == offset, member
    for member, offset in {"dmbuf_iov": 0, "dmbuf_iovcnt": 8}.items():
        assert int(c_layout[f"offsetof dmio_buffer {member}"]) == offset, member
        assert ffi.offsetof("dmio_buffer", member) == offset, member


def test_header_bytes_match_wire_and_cffi(c_layout):
    """A request and a response filled in C are byte for byte what Python packs."""
    from dmoverfs._server import ffi

    c_req = bytes.fromhex(c_layout["bytes req"])
    assert wire.USRREQ.pack(*REQ_VALUES) == c_req
    assert dmio.REQ.pack(*REQ_VALUES) == c_req
    req = ffi.new("struct dmio_usrreq *")
    req.req_outbuf.dmbuf_iov = ffi.cast("struct iovec *", REQ_VALUES[0])
    req.req_outbuf.dmbuf_iovcnt = REQ_VALUES[1]
    req.req_immediate = list(REQ_VALUES[2])
    req.req_inbuf = ffi.cast("dmio_buffer *", REQ_VALUES[3])
    req.req_id = REQ_VALUES[4]
    assert ffi.buffer(req)[:] == c_req

    c_resp = bytes.fromhex(c_layout["bytes resp"])
    assert wire.USRRESP.pack(*RESP_VALUES) == c_resp
    assert wire.USRRESP.unpack(c_resp) == RESP_VALUES
    assert dmio.parse(c_resp) == [dmio.Response(*RESP_VALUES)]
    raw = ffi.from_buffer(bytearray(c_resp))
    resp = ffi.cast("struct dmio_usrresp *", raw)
    assert (resp.resp_id, resp.resp_error, bytes(resp.resp_immediate)) == RESP_VALUES


def test_header_constants_match_wire(c_layout):
    assert int(c_layout["const DMIO_MAX_FUNCNAME"]) == wire.MAX_FUNCNAME == 64
    assert int(c_layout["const DMIO_NREQS_MAX"]) == wire.NREQS_MAX == 64
    # Linux's _IOW('D', 0, struct dmio_setfunc): write direction, 64-byte argument.
    assert int(c_layout["const DMIO_SETFUNC"]) == (1 << 30) | (64 << 16) | (ord("D") << 8) | 0
    assert c_layout["string DMOVERFS_XATTR_FUNCTION"] == wire.XATTR_FUNCTION
    assert c_layout["string DMOVERFS_XATTR_NONBLOCK"] == wire.XATTR_NONBLOCK


# -- bash's read -t 0 as a select() probe --------------------------------------------------


def bash(script: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    bash_path = shutil.which("bash")
    if bash_path is None:
        pytest.fail("bash is not on PATH")
    proc = subprocess.run(
        [bash_path, "-c", script],
        env={**os.environ, **(env or {})},
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.stderr == "", proc.stderr
    return proc


def read_t0(fd: int) -> int:
    """The exit status of bash's ``read -t 0 -u FD`` on an inherited session descriptor."""
    proc = bash(f'read -t 0 -u {fd}; echo "status $?"', pass_fds=(fd,))
    assert proc.returncode == 0
    assert proc.stdout.startswith("status ")
    return int(proc.stdout.split()[1])


def test_bash_read_t0_on_an_idle_session_it_opened(mnt):
    script = 'exec 3<>"$MNT/func/zero" || exit 99\nread -t 0 -u 3; echo "idle $?"\nexec 3>&-\n'
    proc = bash(script, env={"MNT": str(mnt)})
    assert (proc.returncode, proc.stdout) == (0, "idle 1\n")


def test_bash_read_t0_sees_a_completed_request(mnt):
    fd = dmio.open_session(mnt, "zero")
    try:
        assert read_t0(fd) == 1  # nothing outstanding: not readable

        buf = np.full(4096, 0xAB, dtype=np.uint8)
        req = dmio.request(5, out=dmio.whole(buf))
        assert dmio.submit(fd, req) == wire.REQ_SIZE
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ready = poller.poll(WAIT_MS)
        assert ready and ready[0][1] & select.POLLIN, "the response never became readable"

        assert read_t0(fd) == 0  # a response is ready
        assert read_t0(fd) == 0  # and read -t 0 did not consume it

        [resp] = dmio.collect(fd, 1)
        assert (resp.req_id, resp.error) == (5, 0)
        assert not buf.any()
        assert read_t0(fd) == 1  # read back: not readable again
    finally:
        os.close(fd)
