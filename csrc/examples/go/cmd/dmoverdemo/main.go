// Command dmoverdemo uses every dmoverfs function through package dmover and
// checks each result against one computed here.
//
//	dmoverdemo run MOUNTPOINT [CHECK...] every function, non-blocking use, errors (or the checks named)
//	dmoverdemo crc32c MOUNTPOINT FILE    the iscsi-crc32c of FILE
//	dmoverdemo xor MOUNTPOINT OUT IN...  OUT = the XOR of the IN files (2 to 16, of one size)
//	dmoverdemo layout                    the wire records' sizes and offsets
package main

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand"
	"os"
	"syscall"
	"time"
	"unsafe"

	"dmoverexample/dmover"
)

const checkValue = 0xE3069283 // CRC32C of "123456789", the published check value

func main() {
	var err error
	switch {
	case len(os.Args) == 2 && os.Args[1] == "layout":
		printLayout()
	case len(os.Args) >= 3 && os.Args[1] == "run":
		err = runChecks(os.Args[2], os.Args[3:])
	case len(os.Args) == 4 && os.Args[1] == "crc32c":
		err = crcFile(os.Args[2], os.Args[3])
	case len(os.Args) >= 6 && len(os.Args) <= 20 && os.Args[1] == "xor":
		err = xorFiles(os.Args[2], os.Args[3], os.Args[4:])
	default:
		fmt.Fprintln(os.Stderr, "usage: dmoverdemo run MOUNTPOINT [CHECK...] | crc32c MOUNTPOINT FILE | xor MOUNTPOINT OUT IN... | layout")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dmoverdemo:", err)
		os.Exit(1)
	}
}

// check is one step of "run": it returns what it checked, or why it failed.
type check struct {
	name string
	run  func(mnt string) (string, error)
}

// runChecks runs the checks named (all if none is) in turn and stops at the first failure.
func runChecks(mnt string, names []string) error {
	checks := []check{{"zero", checkZero}, {"fill8", checkFill8}, {"copy", checkCopy}}
	for n := 2; n <= 16; n++ {
		n := n
		checks = append(checks, check{fmt.Sprintf("xor%d", n), func(mnt string) (string, error) { return checkXor(mnt, n) }})
	}
	checks = append(checks, check{"iscsi-crc32c", checkCRC}, check{"order", checkOrder},
		check{"nonblock", checkNonblock}, check{"errors", checkErrors})
	if len(names) > 0 {
		checks = choose(checks, names)
		if len(checks) != len(names) {
			return fmt.Errorf("no check named %q", unknown(checks, names))
		}
	}
	for _, c := range checks {
		detail, err := c.run(mnt)
		if err != nil {
			fmt.Printf("%s: FAILED\n", c.name)
			return fmt.Errorf("%s: %w", c.name, err)
		}
		fmt.Printf("%s: ok (%s)\n", c.name, detail)
	}
	fmt.Println("dmoverdemo: all checks passed")
	return nil
}

// choose keeps the checks named, in their order.
func choose(checks []check, names []string) []check {
	var chosen []check
	for _, c := range checks {
		for _, name := range names {
			if c.name == name {
				chosen = append(chosen, c)
				break
			}
		}
	}
	return chosen
}

// unknown is the first of names that no check has.
func unknown(checks []check, names []string) string {
	for _, name := range names {
		if len(choose(checks, []string{name})) == 0 {
			return name
		}
	}
	return ""
}

// buffers maps n buffers of size bytes; free unmaps them.
func buffers(n, size int) ([]*dmover.Buffer, func(), error) {
	bufs := make([]*dmover.Buffer, 0, n)
	free := func() {
		for _, b := range bufs {
			if err := b.Free(); err != nil {
				fmt.Fprintln(os.Stderr, "dmoverdemo:", err)
			}
		}
	}
	for i := 0; i < n; i++ {
		b, err := dmover.NewBuffer(size)
		if err != nil {
			free()
			return nil, nil, err
		}
		bufs = append(bufs, b)
	}
	return bufs, free, nil
}

// runBatch submits reqs on a new session of function in one write and reads
// every result, checking that each id comes back once and succeeded.
func runBatch(mnt, function string, reqs []dmover.Request) ([]dmover.Result, error) {
	s, err := dmover.Open(mnt, function, false)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	ids, err := s.Submit(reqs...)
	if err != nil {
		return nil, err
	}
	results, err := s.Results(len(ids))
	if err != nil {
		return nil, err
	}
	return results, matchResults(ids, results)
}

// matchResults checks that results answer ids exactly once each, in any order, without error.
func matchResults(ids []uint32, results []dmover.Result) error {
	want := map[uint32]bool{}
	for _, id := range ids {
		want[id] = true
	}
	for _, r := range results {
		if !want[r.ID] {
			return fmt.Errorf("unexpected or repeated result for request %d", r.ID)
		}
		delete(want, r.ID)
		if r.Err != nil {
			return fmt.Errorf("request %d failed: %w", r.ID, r.Err)
		}
	}
	if len(want) != 0 {
		return fmt.Errorf("%d requests without a result", len(want))
	}
	return nil
}

func checkZero(mnt string) (string, error) {
	return checkFill(mnt, "zero", 0)
}

func checkFill8(mnt string) (string, error) {
	return checkFill(mnt, "fill8", 0x5A)
}

// checkFill fills 8 buffers (of 64 KiB + 3 bytes, each in one write) with
// value, each output cut into two segments.
func checkFill(mnt, function string, value byte) (string, error) {
	const count, size = 8, 64<<10 + 3
	bufs, free, err := buffers(count, size)
	if err != nil {
		return "", err
	}
	defer free()
	reqs := make([]dmover.Request, count)
	for i, b := range bufs {
		copy(b.Bytes(), bytes.Repeat([]byte{^value}, size))
		reqs[i] = dmover.Request{Out: []dmover.Segment{b.Slice(0, 1000), b.Slice(1000, size-1000)}, Immediate: dmover.Immediate(uint64(value))}
	}
	if _, err := runBatch(mnt, function, reqs); err != nil {
		return "", err
	}
	want := bytes.Repeat([]byte{value}, size)
	for i, b := range bufs {
		if !bytes.Equal(b.Bytes(), want) {
			return "", fmt.Errorf("buffer %d is not all 0x%02x", i, value)
		}
	}
	return fmt.Sprintf("%d requests, %d bytes", count, count*size), nil
}

func checkCopy(mnt string) (string, error) {
	const size = 1<<20 + 17
	bufs, free, err := buffers(2, size)
	if err != nil {
		return "", err
	}
	defer free()
	src, dst := bufs[0], bufs[1]
	rand.New(rand.NewSource(1)).Read(src.Bytes())
	// The input in one piece, the output in three.
	out := []dmover.Segment{dst.Slice(0, 4096), dst.Slice(4096, 1<<19), dst.Slice(4096+1<<19, size-4096-1<<19)}
	if _, err := runBatch(mnt, "copy", []dmover.Request{{Out: out, In: [][]dmover.Segment{{src.All()}}}}); err != nil {
		return "", err
	}
	if !bytes.Equal(dst.Bytes(), src.Bytes()) {
		return "", errors.New("the output differs from the input")
	}
	return fmt.Sprintf("1 request, %d bytes", size), nil
}

// checkXor XORs n random inputs of 4 KiB + n bytes, in 4 requests.
func checkXor(mnt string, n int) (string, error) {
	const count = 4
	size := 4096 + n
	bufs, free, err := buffers(count*(n+1), size)
	if err != nil {
		return "", err
	}
	defer free()
	rng := rand.New(rand.NewSource(int64(n)))
	reqs := make([]dmover.Request, count)
	want := make([][]byte, count)
	for i := range reqs {
		out, ins := bufs[i*(n+1)], bufs[i*(n+1)+1:(i+1)*(n+1)]
		want[i] = make([]byte, size)
		reqs[i].Out = []dmover.Segment{out.All()}
		for _, in := range ins {
			rng.Read(in.Bytes())
			for k, v := range in.Bytes() {
				want[i][k] ^= v
			}
			reqs[i].In = append(reqs[i].In, []dmover.Segment{in.All()})
		}
	}
	if _, err := runBatch(mnt, fmt.Sprintf("xor%d", n), reqs); err != nil {
		return "", err
	}
	for i := range reqs {
		if !bytes.Equal(bufs[i*(n+1)].Bytes(), want[i]) {
			return "", fmt.Errorf("output %d is not the XOR of its %d inputs", i, n)
		}
	}
	return fmt.Sprintf("%d requests of %d inputs, %d bytes each", count, n, size), nil
}

// checkCRC checks the published check value, a CRC chained over two
// requests (one input cut into two segments), and 1 MiB of random data
// against hash/crc32's Castagnoli table.
func checkCRC(mnt string) (string, error) {
	const big = 1 << 20
	bufs, free, err := buffers(2, big)
	if err != nil {
		return "", err
	}
	defer free()
	digits, data := bufs[0], bufs[1]
	copy(digits.Bytes(), "123456789")
	whole, err := runBatch(mnt, "iscsi-crc32c", []dmover.Request{
		{In: [][]dmover.Segment{{digits.Slice(0, 4), digits.Slice(4, 5)}}},
	})
	if err != nil {
		return "", err
	}
	if got := whole[0].CRC(); got != checkValue {
		return "", fmt.Errorf("CRC32C of \"123456789\" is 0x%08x, not 0x%08x", got, checkValue)
	}
	first, err := runBatch(mnt, "iscsi-crc32c", []dmover.Request{{In: [][]dmover.Segment{{digits.Slice(0, 4)}}}})
	if err != nil {
		return "", err
	}
	second, err := runBatch(mnt, "iscsi-crc32c", []dmover.Request{
		{In: [][]dmover.Segment{{digits.Slice(4, 5)}}, Immediate: dmover.Immediate(uint64(first[0].CRC()))},
	})
	if err != nil {
		return "", err
	}
	if got := second[0].CRC(); got != checkValue {
		return "", fmt.Errorf("CRC32C chained over \"1234\" and \"56789\" is 0x%08x, not 0x%08x", got, checkValue)
	}
	rand.New(rand.NewSource(3)).Read(data.Bytes())
	random, err := runBatch(mnt, "iscsi-crc32c", []dmover.Request{{In: [][]dmover.Segment{{data.All()}}}})
	if err != nil {
		return "", err
	}
	want := crc32.Checksum(data.Bytes(), crc32.MakeTable(crc32.Castagnoli))
	if got := random[0].CRC(); got != want {
		return "", fmt.Errorf("CRC32C of 1 MiB is 0x%08x, hash/crc32 says 0x%08x", got, want)
	}
	return fmt.Sprintf("check value 0x%08x, chained 0x%08x, 1 MiB 0x%08x", checkValue, checkValue, want), nil
}

// checkOrder submits a 64 MiB copy, then eight 4 KiB ones, in one write and
// matches the results to the requests by id: the small ones usually
// complete before the big one.
func checkOrder(mnt string) (string, error) {
	const big, small, count = 64 << 20, 4096, 8
	bufs, free, err := buffers(2+count, big)
	if err != nil {
		return "", err
	}
	defer free()
	src, dst, outs := bufs[0], bufs[1], bufs[2:]
	rand.New(rand.NewSource(4)).Read(src.Bytes())
	reqs := []dmover.Request{{Out: []dmover.Segment{dst.All()}, In: [][]dmover.Segment{{src.All()}}}}
	for i, out := range outs {
		reqs = append(reqs, dmover.Request{Out: []dmover.Segment{out.Slice(0, small)}, In: [][]dmover.Segment{{src.Slice(i*small, small)}}})
	}
	s, err := dmover.Open(mnt, "copy", false)
	if err != nil {
		return "", err
	}
	defer s.Close()
	ids, err := s.Submit(reqs...)
	if err != nil {
		return "", err
	}
	results, err := s.Results(len(ids))
	if err != nil {
		return "", err
	}
	if err := matchResults(ids, results); err != nil {
		return "", err
	}
	if !bytes.Equal(dst.Bytes(), src.Bytes()) {
		return "", errors.New("the 64 MiB output differs from its input")
	}
	for i, out := range outs {
		if !bytes.Equal(out.Bytes()[:small], src.Bytes()[i*small:(i+1)*small]) {
			return "", fmt.Errorf("small output %d differs from its input", i)
		}
	}
	place := 0
	for i, r := range results {
		if r.ID == ids[0] {
			place = i + 1
		}
	}
	return fmt.Sprintf("the 64 MiB copy, submitted first, came back in place %d of %d", place, len(results)), nil
}

// checkNonblock fills a non-blocking session's queue until EAGAIN, then
// reads every result as poll reports them ready.
func checkNonblock(mnt string) (string, error) {
	s, err := dmover.Open(mnt, "fill8", true)
	if err != nil {
		return "", err
	}
	defer s.Close()
	if fn, err := s.Function(); err != nil || fn != "fill8" {
		return "", fmt.Errorf("the session's function reads back as %q (%v)", fn, err)
	}
	buf, err := dmover.NewBuffer(4096)
	if err != nil {
		return "", err
	}
	defer buf.Free()
	var ids []uint32
	for {
		got, err := s.Submit(dmover.Request{Out: []dmover.Segment{buf.All()}, Immediate: dmover.Immediate(7)})
		ids = append(ids, got...)
		if errors.Is(err, syscall.EAGAIN) {
			break
		}
		if err != nil {
			return "", err
		}
		if len(ids) > 100000 {
			return "", errors.New("the queue never filled")
		}
	}
	if err := buf.Free(); !errors.Is(err, syscall.EBUSY) {
		return "", fmt.Errorf("freeing a buffer named by outstanding requests gave %v, not EBUSY", err)
	}
	queued := len(ids)
	var results []dmover.Result
	for len(results) < queued {
		ready, err := s.Wait(dmover.PollIn, 10*time.Second)
		if err != nil {
			return "", err
		}
		if ready&dmover.PollIn == 0 {
			return "", fmt.Errorf("no result ready within 10 s (%d of %d read)", len(results), queued)
		}
		got, err := s.Results(queued)
		if err != nil && !errors.Is(err, syscall.EAGAIN) {
			return "", err
		}
		results = append(results, got...)
	}
	if err := matchResults(ids, results); err != nil {
		return "", err
	}
	if !bytes.Equal(buf.Bytes(), bytes.Repeat([]byte{7}, 4096)) {
		return "", errors.New("the buffer is not all 0x07")
	}
	return fmt.Sprintf("queue full after %d requests, %d results read after poll", queued, len(results)), nil
}

// checkErrors checks that failures come back with the right errno.
func checkErrors(mnt string) (string, error) {
	_, err := dmover.Open(mnt, "no-such-function", false)
	if !errors.Is(err, syscall.ESRCH) {
		return "", fmt.Errorf("an unknown function gave %v, not ESRCH", err)
	}
	s, err := dmover.Open(mnt, "zero", false)
	if err != nil {
		return "", err
	}
	defer s.Close()
	ids, err := s.Submit(dmover.Request{}) // zero needs an output
	if err != nil {
		return "", err
	}
	results, err := s.Results(len(ids))
	if err != nil {
		return "", err
	}
	if !errors.Is(results[0].Err, syscall.EINVAL) {
		return "", fmt.Errorf("zero without an output gave %v, not EINVAL", results[0].Err)
	}
	return "ESRCH for an unknown function, EINVAL for zero without an output", nil
}

// readFile reads a whole file into a new buffer (of at least one byte).
func readFile(path string) (*dmover.Buffer, int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	b, err := dmover.NewBuffer(len(data) + 1)
	if err != nil {
		return nil, 0, err
	}
	copy(b.Bytes(), data)
	return b, len(data), nil
}

func crcFile(mnt, path string) error {
	b, n, err := readFile(path)
	if err != nil {
		return err
	}
	defer b.Free()
	results, err := runBatch(mnt, "iscsi-crc32c", []dmover.Request{{In: [][]dmover.Segment{{b.Slice(0, n)}}}})
	if err != nil {
		return err
	}
	fmt.Printf("0x%08x\n", results[0].CRC())
	return nil
}

func xorFiles(mnt, outPath string, inPaths []string) error {
	req := dmover.Request{}
	size := -1
	for _, path := range inPaths {
		b, n, err := readFile(path)
		if err != nil {
			return err
		}
		defer b.Free()
		if size >= 0 && n != size {
			return fmt.Errorf("%s has %d bytes, the first input %d", path, n, size)
		}
		size = n
		req.In = append(req.In, []dmover.Segment{b.Slice(0, n)})
	}
	out, err := dmover.NewBuffer(size + 1)
	if err != nil {
		return err
	}
	defer out.Free()
	req.Out = []dmover.Segment{out.Slice(0, size)}
	if _, err := runBatch(mnt, fmt.Sprintf("xor%d", len(inPaths)), []dmover.Request{req}); err != nil {
		return err
	}
	return os.WriteFile(outPath, out.Bytes()[:size], 0o644)
}

// printLayout prints the wire records' layout in the format of the C
// layout program of the test suite, which compares the two.
func printLayout() {
	var req dmover.Usrreq
	var resp dmover.Usrresp
	var buf dmover.DmioBuffer
	fmt.Println("sizeof struct iovec", unsafe.Sizeof(dmover.Iovec{}))
	fmt.Println("sizeof dmio_buffer", unsafe.Sizeof(buf))
	fmt.Println("sizeof struct dmio_usrreq", unsafe.Sizeof(req))
	fmt.Println("sizeof struct dmio_usrresp", unsafe.Sizeof(resp))
	fmt.Println("offsetof dmio_buffer dmbuf_iov", unsafe.Offsetof(buf.Iov))
	fmt.Println("offsetof dmio_buffer dmbuf_iovcnt", unsafe.Offsetof(buf.Iovcnt))
	fmt.Println("offsetof struct dmio_usrreq req_outbuf", unsafe.Offsetof(req.Outbuf))
	fmt.Println("offsetof struct dmio_usrreq req_outbuf.dmbuf_iovcnt", unsafe.Offsetof(req.Outbuf)+unsafe.Offsetof(req.Outbuf.Iovcnt))
	fmt.Println("offsetof struct dmio_usrreq req_immediate", unsafe.Offsetof(req.Immediate))
	fmt.Println("offsetof struct dmio_usrreq req_inbuf", unsafe.Offsetof(req.Inbuf))
	fmt.Println("offsetof struct dmio_usrreq req_id", unsafe.Offsetof(req.ID))
	fmt.Println("offsetof struct dmio_usrresp resp_id", unsafe.Offsetof(resp.ID))
	fmt.Println("offsetof struct dmio_usrresp resp_error", unsafe.Offsetof(resp.Error))
	fmt.Println("offsetof struct dmio_usrresp resp_immediate", unsafe.Offsetof(resp.Immediate))
	fmt.Println("const DMIO_MAX_FUNCNAME", dmover.MaxFuncName)
	fmt.Println("const DMIO_NREQS_MAX", dmover.NreqsMax)
	fmt.Println("string DMOVERFS_XATTR_FUNCTION", dmover.XattrFunction)
	fmt.Println("string DMOVERFS_XATTR_NONBLOCK", dmover.XattrNonblock)
	// The test's C program fills these same values in and dumps its bytes.
	req.Outbuf = dmover.DmioBuffer{Iov: 0x1122334455667788, Iovcnt: 0x99aabbcc}
	for i := range req.Immediate {
		req.Immediate[i] = byte(0xf0 + i)
	}
	req.Inbuf = 0x0102030405060708
	req.ID = 0xdeadbeef
	resp = dmover.Usrresp{ID: 0x01020304, Error: -22}
	for i := range resp.Immediate {
		resp.Immediate[i] = byte(0xa0 + i)
	}
	fmt.Println("bytes req", hex.EncodeToString((*[dmover.ReqSize]byte)(unsafe.Pointer(&req))[:]))
	fmt.Println("bytes resp", hex.EncodeToString((*[dmover.RespSize]byte)(unsafe.Pointer(&resp))[:]))
}
