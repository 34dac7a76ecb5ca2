// Package dmover is a small client of dmoverfs sessions, written with Go's
// standard library only (package syscall; no golang.org/x).
//
// A session is a file opened in a dmoverfs mount: its function is chosen with
// the user.dmover.function extended attribute (fsetxattr), requests are
// struct dmio_usrreq records written to it, and results are struct
// dmio_usrresp records read back, in completion order. The requests hold
// addresses of this process's memory, so every buffer a request names lives
// in memory mapped with mmap(2), which Go's garbage collector neither moves
// nor frees (see Buffer).
package dmover

import "unsafe"

// Iovec is struct iovec: one segment of a scatter/gather list.
type Iovec struct {
	Base uintptr // address of the segment's first byte
	Len  uint64  // its length in bytes
}

// DmioBuffer is dmio_buffer: a scatter/gather list.
type DmioBuffer struct {
	Iov    uintptr // address of Iovcnt Iovec records
	Iovcnt uint32  // 0 for "no buffer" (an output only)
	_      [4]byte // C pads the struct to its pointer's alignment
}

// Usrreq is struct dmio_usrreq: one request, as written to a session.
type Usrreq struct {
	Outbuf    DmioBuffer // the output region
	Immediate [8]byte    // immediate input, least significant byte first
	Inbuf     uintptr    // address of one DmioBuffer per input
	ID        uint32     // echoed in the response
	_         [4]byte    // C's tail padding
}

// Usrresp is struct dmio_usrresp: one response, as read from a session.
type Usrresp struct {
	ID        uint32  // the request's ID
	Error     int32   // 0 or an errno value
	Immediate [8]byte // immediate result (the CRC of iscsi-crc32c)
}

// Sizes of the wire records, and the names of the session's attributes
// (<dev/dmover/dmover_io.h>).
const (
	IovecSize     = int(unsafe.Sizeof(Iovec{}))
	BufferSize    = int(unsafe.Sizeof(DmioBuffer{}))
	ReqSize       = int(unsafe.Sizeof(Usrreq{}))
	RespSize      = int(unsafe.Sizeof(Usrresp{}))
	MaxFuncName   = 64 // DMIO_MAX_FUNCNAME, the terminating NUL included
	NreqsMax      = 64 // DMIO_NREQS_MAX, the default queue depth
	XattrFunction = "user.dmover.function"
	XattrNonblock = "user.dmover.nonblock"
)

// The compiler checks the sizes: an index out of range fails the build.
var (
	_ = [1]struct{}{}[IovecSize-16]
	_ = [1]struct{}{}[BufferSize-16]
	_ = [1]struct{}{}[ReqSize-40]
	_ = [1]struct{}{}[RespSize-16]
)
