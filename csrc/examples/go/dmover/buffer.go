package dmover

import (
	"fmt"
	"sync"
	"syscall"
	"unsafe"
)

// Buffer is memory that requests may name: an anonymous mmap(2) mapping.
//
// A request carries the addresses of its buffers as plain numbers, which Go's
// garbage collector does not see, and the server reads and writes them until
// the request's response has been read back. So buffers must neither move
// nor be freed meanwhile. Go's heap promises neither for memory whose only
// reference is an address held elsewhere (runtime.Pinner, which pins heap
// objects, needs Go 1.21, and runtime.KeepAlive only covers one function's
// span). A mapping lies outside the collector's reach: it stays where it is
// until Free unmaps it, and Free refuses while a request still names the
// buffer. The cost is page-sized granularity and an explicit Free.
type Buffer struct {
	mu   sync.Mutex
	mem  []byte
	refs int // outstanding requests naming this buffer
}

// NewBuffer maps size bytes of zeroed memory.
func NewBuffer(size int) (*Buffer, error) {
	if size <= 0 {
		return nil, fmt.Errorf("dmover: buffer size %d: %w", size, syscall.EINVAL)
	}
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, fmt.Errorf("dmover: mmap of %d bytes: %w", size, err)
	}
	return &Buffer{mem: mem}, nil
}

// Bytes is the buffer's memory. Do not use it after Free.
func (b *Buffer) Bytes() []byte { return b.mem }

// Len is the buffer's size in bytes.
func (b *Buffer) Len() int { return len(b.mem) }

// All is a segment covering the whole buffer.
func (b *Buffer) All() Segment { return Segment{b, 0, len(b.mem)} }

// Slice is the segment of n bytes at off.
func (b *Buffer) Slice(off, n int) Segment { return Segment{b, off, n} }

// Free unmaps the buffer. It fails with EBUSY while an outstanding request
// names it: the server may still write there.
func (b *Buffer) Free() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.refs > 0 {
		return fmt.Errorf("dmover: buffer still named by %d outstanding requests: %w", b.refs, syscall.EBUSY)
	}
	if b.mem == nil {
		return nil
	}
	err := syscall.Munmap(b.mem)
	b.mem = nil
	return err
}

// hold records one more (delta 1) or one fewer (-1) outstanding request naming b.
func (b *Buffer) hold(delta int) {
	b.mu.Lock()
	b.refs += delta
	b.mu.Unlock()
}

// Segment is a part of a Buffer: one iovec of a scatter/gather list.
type Segment struct {
	Buf *Buffer
	Off int
	Len int
}

// address returns the segment's first byte, or an error if it lies outside its buffer.
func (s Segment) address() (uintptr, error) {
	if s.Buf == nil || s.Buf.mem == nil {
		return 0, fmt.Errorf("dmover: segment of a missing or freed buffer: %w", syscall.EINVAL)
	}
	if s.Off < 0 || s.Len < 0 || s.Off > len(s.Buf.mem) || s.Len > len(s.Buf.mem)-s.Off {
		return 0, fmt.Errorf("dmover: segment [%d, +%d) outside its %d-byte buffer: %w", s.Off, s.Len, len(s.Buf.mem), syscall.EINVAL)
	}
	return uintptr(unsafe.Pointer(&s.Buf.mem[0])) + uintptr(s.Off), nil
}
