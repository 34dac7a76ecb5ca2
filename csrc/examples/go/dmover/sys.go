package dmover

import (
	"syscall"
	"time"
	"unsafe"
)

// Readiness events of poll(2).
const (
	PollIn  = 0x1
	PollOut = 0x4
	PollErr = 0x8
	PollHup = 0x10
)

// retry makes a system call until it is not interrupted (EINTR).
func retry(call func() (uintptr, syscall.Errno)) (uintptr, error) {
	for {
		r, errno := call()
		switch errno {
		case 0:
			return r, nil
		case syscall.EINTR:
			continue
		default:
			return 0, errno
		}
	}
}

// fsetxattr is fsetxattr(2), which package syscall lacks (it has the
// path-based Setxattr only).
func fsetxattr(fd int, name string, value []byte) error {
	namePtr, err := syscall.BytePtrFromString(name)
	if err != nil {
		return err
	}
	var valuePtr unsafe.Pointer
	if len(value) > 0 {
		valuePtr = unsafe.Pointer(&value[0])
	}
	_, err = retry(func() (uintptr, syscall.Errno) {
		_, _, errno := syscall.Syscall6(syscall.SYS_FSETXATTR, uintptr(fd), uintptr(unsafe.Pointer(namePtr)),
			uintptr(valuePtr), uintptr(len(value)), 0, 0)
		return 0, errno
	})
	return err
}

// fgetxattr is fgetxattr(2); it returns the attribute's value.
func fgetxattr(fd int, name string) ([]byte, error) {
	namePtr, err := syscall.BytePtrFromString(name)
	if err != nil {
		return nil, err
	}
	value := make([]byte, 256)
	n, err := retry(func() (uintptr, syscall.Errno) {
		n, _, errno := syscall.Syscall6(syscall.SYS_FGETXATTR, uintptr(fd), uintptr(unsafe.Pointer(namePtr)),
			uintptr(unsafe.Pointer(&value[0])), uintptr(len(value)), 0, 0)
		return n, errno
	})
	if err != nil {
		return nil, err
	}
	return value[:n], nil
}

// pollFd is struct pollfd.
type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

// poll waits up to timeout (negative: for ever) for events on fd and returns
// the events that happened (0 when the time ran out).
func poll(fd int, events int16, timeout time.Duration) (int16, error) {
	deadline := time.Now().Add(timeout)
	p := pollFd{fd: int32(fd), events: events}
	_, err := retry(func() (uintptr, syscall.Errno) {
		ms := -1 // recomputed on each try, rounded up so that a wait never ends before its deadline
		if timeout >= 0 {
			ms = int((time.Until(deadline) + time.Millisecond - 1) / time.Millisecond)
			if ms < 0 {
				ms = 0
			}
		}
		n, _, errno := syscall.Syscall(syscall.SYS_POLL, uintptr(unsafe.Pointer(&p)), 1, uintptr(ms))
		return n, errno
	})
	return p.revents, err
}
