"""The wire format of a session file, as in ``dev/dmover/dmover_io.h``.

Sizes and offsets are those of the native Linux x86-64 ABI; a test checks
them against both the C header (compiled) and the cffi declarations.
"""

from __future__ import annotations

import struct

#: ``struct dmio_usrreq``: outbuf {iov, iovcnt}, immediate[8], inbuf, req_id.
USRREQ = struct.Struct("<QI4x8sQI4x")
#: ``struct dmio_usrresp``: resp_id, resp_error, resp_immediate[8].
USRRESP = struct.Struct("<Ii8s")
#: ``dmio_buffer``: iov pointer, iovcnt.
BUFFER = struct.Struct("<QI4x")
#: ``struct iovec``: base, len.
IOVEC = struct.Struct("<QQ")

REQ_SIZE = USRREQ.size  # 40
RESP_SIZE = USRRESP.size  # 16
MAX_FUNCNAME = 64
#: Requests a session may have outstanding by default (NetBSD's DMIO_NREQS_MAX).
NREQS_MAX = 64
#: NetBSD's IOV_MAX, the cap on segments in one scatter/gather list.
IOV_MAX = 1024

XATTR_FUNCTION = "user.dmover.function"
XATTR_NONBLOCK = "user.dmover.nonblock"
#: Read-only: the server's pid, in decimal. Identifies a dmoverfs session (the preload shim uses it).
XATTR_SERVER = "user.dmover.server"
#: Write-only (a dmoverfs extension): "FD OFFSET ADDR LEN" registers ADDR..ADDR+LEN of the
#: setting process, mapped MAP_SHARED from its descriptor FD at file OFFSET, as shared memory.
XATTR_REGISTER = "user.dmover.register"
#: Write-only: "ADDR LEN" drops the setting process's registration of exactly that range.
XATTR_UNREGISTER = "user.dmover.unregister"
