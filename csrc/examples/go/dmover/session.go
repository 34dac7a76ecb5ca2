package dmover

import (
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Request is one request: an output region (nil for a function without one,
// such as iscsi-crc32c), one region per input, and the immediate. A region
// is a scatter/gather list of segments.
type Request struct {
	Out       []Segment
	In        [][]Segment
	Immediate [8]byte
}

// Result is one response: the request's id, nil or the errno it failed with,
// and the immediate result.
type Result struct {
	ID        uint32
	Err       error
	Immediate [8]byte
}

// CRC is an iscsi-crc32c result: the immediate as a little-endian uint32.
func (r Result) CRC() uint32 { return binary.LittleEndian.Uint32(r.Immediate[:4]) }

// Session is an open dmoverfs session. Its methods may be called from several
// goroutines: one may wait in Results while another submits.
type Session struct {
	fd       int
	path     string
	function string
	nonblock bool

	writeMu sync.Mutex // serialises Submit: the metadata arena is reused
	meta    []byte     // mmap'd: requests, dmio_buffers and iovecs of one write

	mu      sync.Mutex
	nextID  uint32
	pending map[uint32][]*Buffer // outstanding requests and the buffers they name
	closed  bool
}

// Open starts a session on the mount at mountpoint with function selected
// (through the user.dmover.function attribute: NetBSD's DMIO_SETFUNC). With
// nonblock, the descriptor is opened O_NONBLOCK, which dmoverfs honours for
// every read and write: Submit and Results then return what they can do now.
func Open(mountpoint, function string, nonblock bool) (*Session, error) {
	path := filepath.Join(mountpoint, "dmoverio")
	flags := syscall.O_RDWR | syscall.O_CLOEXEC
	if nonblock {
		flags |= syscall.O_NONBLOCK
	}
	fd, err := openRetry(path, flags)
	if err != nil {
		return nil, &Error{Op: "open", Path: path, Err: err}
	}
	s := &Session{fd: fd, path: path, function: function, nonblock: nonblock, pending: map[uint32][]*Buffer{}}
	if err := fsetxattr(fd, XattrFunction, []byte(function)); err != nil {
		syscall.Close(fd)
		op := fmt.Sprintf("select function %q (fsetxattr %s)", function, XattrFunction)
		return nil, &Error{Op: op, Path: path, Err: err}
	}
	return s, nil
}

func openRetry(path string, flags int) (int, error) {
	for {
		fd, err := syscall.Open(path, flags, 0)
		if err != syscall.EINTR {
			return fd, err
		}
	}
}

// Fd is the session's descriptor, for poll, select or epoll.
func (s *Session) Fd() int { return s.fd }

// Function reads the session's function back from its attribute.
func (s *Session) Function() (string, error) {
	value, err := fgetxattr(s.fd, XattrFunction)
	if err != nil {
		return "", &Error{Op: "fgetxattr " + XattrFunction, Path: s.path, Err: err}
	}
	return string(value), nil
}

// Outstanding is the number of requests submitted whose results have not been read.
func (s *Session) Outstanding() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}

// Submit writes the requests in one write(2) and returns their ids. Every
// buffer they name stays held (Buffer.Free fails) until its result is read.
//
// A blocking session waits for room in its queue. A non-blocking one returns
// the ids of the requests accepted (the first len(ids) of reqs) and an error
// wrapping EAGAIN when the queue filled before the end. A request the server
// refuses (EINVAL, EFAULT) gives a *SubmitError; the requests after it were
// not submitted.
func (s *Session) Submit(reqs ...Request) ([]uint32, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	ids, err := s.pack(reqs)
	if err != nil {
		return nil, err
	}
	total := len(reqs) * ReqSize
	done := 0
	for done < total {
		n, err := syscall.Write(s.fd, s.meta[done:total])
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN && s.nonblock {
			return ids[:done/ReqSize], &Error{Op: "write", Path: s.path, Err: err}
		}
		if err != nil {
			index := done / ReqSize
			return ids[:index], &SubmitError{Index: index, Accepted: ids[:index],
				Err: &Error{Op: fmt.Sprintf("write of request %d", index), Path: s.path, Err: err}}
		}
		if n%ReqSize != 0 {
			return ids[:(done+n)/ReqSize], &Error{Op: "write", Path: s.path,
				Err: fmt.Errorf("the server accepted %d bytes, not a whole number of requests", n)}
		}
		s.accept(reqs[done/ReqSize:(done+n)/ReqSize], ids[done/ReqSize:(done+n)/ReqSize])
		done += n
	}
	return ids, nil
}

// pack lays the requests out in the metadata arena: the requests first
// (what write(2) sends), then their dmio_buffers and iovecs, which the
// requests point to. The server copies those during the write, so the arena
// can be reused by the next Submit.
func (s *Session) pack(reqs []Request) ([]uint32, error) {
	size := len(reqs) * ReqSize
	for _, r := range reqs {
		size += len(r.In)*BufferSize + len(r.Out)*IovecSize
		for _, in := range r.In {
			size += len(in) * IovecSize
		}
	}
	if err := s.reserve(size); err != nil {
		return nil, err
	}
	base := uintptr(unsafe.Pointer(&s.meta[0]))
	next := len(reqs) * ReqSize // where the next dmio_buffer or iovec array goes
	ids := s.newIDs(len(reqs))
	for i, r := range reqs {
		wire := (*Usrreq)(unsafe.Pointer(&s.meta[i*ReqSize]))
		*wire = Usrreq{Immediate: r.Immediate, ID: ids[i]}
		var err error
		if wire.Outbuf, next, err = s.putRegion(r.Out, base, next); err != nil {
			return nil, err
		}
		if len(r.In) > 0 {
			wire.Inbuf = base + uintptr(next)
			bufs := next
			next += len(r.In) * BufferSize
			for j, in := range r.In {
				dst := (*DmioBuffer)(unsafe.Pointer(&s.meta[bufs+j*BufferSize]))
				if *dst, next, err = s.putRegion(in, base, next); err != nil {
					return nil, err
				}
			}
		}
	}
	return ids, nil
}

// putRegion writes a region's iovecs at offset next of the arena and returns
// its dmio_buffer and the offset after them.
func (s *Session) putRegion(region []Segment, base uintptr, next int) (DmioBuffer, int, error) {
	if len(region) == 0 {
		return DmioBuffer{}, next, nil
	}
	buf := DmioBuffer{Iov: base + uintptr(next), Iovcnt: uint32(len(region))}
	for _, seg := range region {
		addr, err := seg.address()
		if err != nil {
			return DmioBuffer{}, 0, err
		}
		*(*Iovec)(unsafe.Pointer(&s.meta[next])) = Iovec{Base: addr, Len: uint64(seg.Len)}
		next += IovecSize
	}
	return buf, next, nil
}

// reserve makes the arena at least size bytes.
func (s *Session) reserve(size int) error {
	if len(s.meta) >= size {
		return nil
	}
	if s.meta != nil {
		if err := syscall.Munmap(s.meta); err != nil {
			return err
		}
		s.meta = nil
	}
	meta, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return fmt.Errorf("dmover: mmap of %d bytes of request metadata: %w", size, err)
	}
	s.meta = meta
	return nil
}

// newIDs picks n ids unused by outstanding requests.
func (s *Session) newIDs(n int) []uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]uint32, 0, n)
	taken := map[uint32]bool{}
	for len(ids) < n {
		s.nextID++
		if _, busy := s.pending[s.nextID]; busy || taken[s.nextID] {
			continue
		}
		taken[s.nextID] = true
		ids = append(ids, s.nextID)
	}
	return ids
}

// accept records requests the server accepted, holding their buffers.
func (s *Session) accept(reqs []Request, ids []uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, r := range reqs {
		var held []*Buffer
		for _, seg := range r.Out {
			held = append(held, seg.Buf)
		}
		for _, in := range r.In {
			for _, seg := range in {
				held = append(held, seg.Buf)
			}
		}
		for _, b := range held {
			b.hold(1)
		}
		s.pending[ids[i]] = held
	}
}

// Results reads up to max results, in completion order, which need not be
// the order of submission. A blocking session waits for exactly
// min(max, Outstanding()) of them; a non-blocking one returns those ready, or
// an error wrapping EAGAIN if none is.
func (s *Session) Results(max int) ([]Result, error) {
	if outstanding := s.Outstanding(); !s.nonblock && max > outstanding {
		max = outstanding
	}
	if max <= 0 {
		return nil, &Error{Op: "read", Path: s.path,
			Err: fmt.Errorf("no requests outstanding: a blocking read would never return: %w", syscall.EINVAL)}
	}
	raw := make([]byte, max*RespSize)
	n, err := syscall.Read(s.fd, raw)
	for err == syscall.EINTR { // an interrupted read loses no response: read again
		n, err = syscall.Read(s.fd, raw)
	}
	if err != nil {
		return nil, &Error{Op: "read", Path: s.path, Err: err}
	}
	results := make([]Result, 0, n/RespSize)
	s.mu.Lock()
	defer s.mu.Unlock()
	for off := 0; off+RespSize <= n; off += RespSize {
		resp := (*Usrresp)(unsafe.Pointer(&raw[off]))
		held, known := s.pending[resp.ID]
		if !known {
			return results, &Error{Op: "read", Path: s.path, Err: fmt.Errorf("response to unknown request %d", resp.ID)}
		}
		delete(s.pending, resp.ID)
		for _, b := range held {
			b.hold(-1)
		}
		r := Result{ID: resp.ID, Immediate: resp.Immediate}
		if resp.Error != 0 {
			r.Err = syscall.Errno(resp.Error)
		}
		results = append(results, r)
	}
	return results, nil
}

// Wait polls the session for events (PollIn: a result is ready; PollOut:
// there is room for a request) and returns those that happened, 0 when
// timeout (negative: no limit) ran out first.
func (s *Session) Wait(events int16, timeout time.Duration) (int16, error) {
	revents, err := poll(s.fd, events, timeout)
	if err != nil {
		return 0, &Error{Op: "poll", Path: s.path, Err: err}
	}
	return revents, nil
}

// Close reads back the outstanding results first, so that no request writes
// into a buffer after Close, then closes the session. If that fails (the
// server is gone), the buffers those requests name stay held for good and
// are never unmapped.
func (s *Session) Close() error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if s.closed {
		return nil
	}
	var drainErr error
	for s.Outstanding() > 0 && drainErr == nil {
		if _, drainErr = s.Wait(PollIn, -1); drainErr == nil {
			_, drainErr = s.Results(s.Outstanding())
			if errors.Is(drainErr, syscall.EAGAIN) {
				drainErr = nil
			}
		}
	}
	s.closed = true
	if s.meta != nil {
		syscall.Munmap(s.meta)
		s.meta = nil
	}
	if err := syscall.Close(s.fd); err != nil && drainErr == nil {
		drainErr = &Error{Op: "close", Path: s.path, Err: err}
	}
	return drainErr
}

// Immediate is the immediate of a request from a little-endian integer: the
// fill8 byte, or the iscsi-crc32c CRC so far.
func Immediate(value uint64) (imm [8]byte) {
	binary.LittleEndian.PutUint64(imm[:], value)
	return imm
}
