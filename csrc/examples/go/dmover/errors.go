package dmover

import (
	"errors"
	"syscall"
)

// Error is a failed operation on a session: what was done, on which path,
// the errno, and what it means here. errors.Is(err, syscall.ESRCH) and the
// like see the errno.
type Error struct {
	Op   string // e.g. `select function "xor3" (fsetxattr user.dmover.function)`
	Path string
	Err  error
}

func (e *Error) Error() string {
	msg := e.Op + " on " + e.Path + ": " + e.Err.Error()
	if hint := hint(e.Op, e.Err); hint != "" {
		msg += " (" + hint + ")"
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// hint says what an errno means for a dmoverfs session.
func hint(op string, err error) string {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return ""
	}
	switch errno {
	case syscall.ENOENT, syscall.ENOTDIR:
		return "is dmoverfs mounted there? dmoverfs mount DIR"
	case syscall.ESRCH:
		return "the mount has no such function; ls MOUNTPOINT/func lists them"
	case syscall.EBUSY:
		return "the session's function is already set"
	case syscall.ENOTSUP, syscall.EPERM:
		if op == "open" {
			return ""
		}
		return "not a dmoverfs session"
	case syscall.ENXIO:
		return "the session has no function, or the server is shutting down"
	case syscall.EAGAIN:
		return "non-blocking session: nothing ready, or the queue is full"
	case syscall.EFAULT:
		return "a request names memory this process has not mapped"
	}
	return ""
}

// SubmitError is a request the server refused when it was written: Index is
// its place in the batch, Accepted the ids of the requests before it, which
// are outstanding as usual.
type SubmitError struct {
	Index    int
	Accepted []uint32
	Err      *Error
}

func (e *SubmitError) Error() string { return e.Err.Error() }

func (e *SubmitError) Unwrap() error { return e.Err }
