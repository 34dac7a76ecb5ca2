/*
 * client.c - the measuring client of the dmoverfs benchmark.
 *
 * Drives a dmoverfs mount and the floor server (floor.c) identically, and
 * measures the kernel baselines, in C so that the client costs the same on
 * both sides.  Every mode prints one JSON object on stdout:
 *   {"ops": N, "bytes": B, "ns": T}   (work done in the timed part, and its duration)
 * Set-up (opening sessions, allocating and touching buffers) and a warm-up
 * are outside the timed part; every result is checked once after warm-up.
 *
 *   client small PATH BATCH SECONDS
 *	4 KiB `zero` requests, BATCH per write() and BATCH responses per read()
 *   client big PATH FUNC SIZE SECONDS CLIENTS
 *	one FUNC request of SIZE bytes per write()/read(); with CLIENTS > 1 that
 *	many processes (one session each) run at once and "bytes" is the sum of
 *	their rates times the duration of the first ("ns")
 *   client bounce SIZE SECONDS CHUNK [CLIENTS]
 *	the kernel's cross-process copy: a second process copies SIZE bytes of
 *	this one's memory to another SIZE bytes of it through a CHUNK-byte
 *	bounce buffer, process_vm_readv then process_vm_writev, one thread;
 *	with CLIENTS > 1 that many such pairs at once (summed as in big)
 *   client pvmread SIZE SECONDS CHUNK
 *	a second process reads SIZE bytes of this one with process_vm_readv,
 *	CHUNK bytes a call into a CHUNK-byte buffer (CHUNK == SIZE: one call)
 *   client sessions PATH N
 *	open N sessions with `zero` selected, print "ready N", wait for a line
 *	(or EOF) on stdin, close them
 *   client inflight PATH N SIZE
 *	one session, N `copy` requests of SIZE bytes (all from one SIZE-byte
 *	source to one SIZE-byte destination) in one write(), then read them back
 *   client copyref FUNCPATH SIZE SECONDS CHUNK
 *	one `copy` request of SIZE bytes (separate source and destination) per
 *	write() and its response per read(), on FUNCPATH (MOUNT/func/copy); then,
 *	in this process and for as long, the same copy between the same buffers
 *	through a CHUNK-byte bounce buffer (memcpy in, memcpy out, CHUNK bytes at
 *	a time: what a server worker does with process_vm_readv/writev).  Prints
 *	the requests' result with the reference's as "ref": {"ops": ...}
 *
 * PATH is the clone file (MOUNT/dmoverio).  Exit status 0 on success; a
 * failed request or check prints why and exits 1.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"

#define SMALL_BYTES	4096
#define MAX_BATCH	DMIO_NREQS_MAX
#define MAX_INPUTS	16

struct result {
	uint64_t ops, bytes, ns;
};

static void
die(const char *fmt, const char *arg, int err)
{
	fprintf(stderr, "client: ");
	fprintf(stderr, fmt, arg);
	if (err != 0)
		fprintf(stderr, ": %s", strerror(err));
	fputc('\n', stderr);
	exit(1);
}

static uint64_t
parse_size(const char *s)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 0);

	if (end == s || *end != '\0')
		die("bad number %s", s, 0);
	return v;
}

static uint64_t
parse_seconds_ns(const char *s)
{
	char *end;
	double v = strtod(s, &end);

	if (end == s || *end != '\0' || v < 0)
		die("bad duration %s", s, 0);
	return (uint64_t)(v * 1e9);
}

/* Page-aligned memory, touched so that no page fault lands in a timed part. */
static unsigned char *
alloc_touched(size_t n, int byte)
{
	void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap %s", "buffer", errno);
	memset(p, byte, n);
	return p;
}

static void
fill_pattern(unsigned char *p, size_t n, uint64_t seed)
{
	uint64_t x = seed | 1;

	for (size_t i = 0; i + 8 <= n; i += 8) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		uint64_t v = x * 0x2545F4914F6CDD1Du;
		memcpy(p + i, &v, 8);
	}
	for (size_t i = n & ~(size_t)7; i < n; i++)
		p[i] = (unsigned char)(i * 131u);
}

static void
print_result(const struct result *r)
{
	printf("{\"ops\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"ns\": %" PRIu64 "}\n",
	    r->ops, r->bytes, r->ns);
	fflush(stdout);
}

/* --- running several clients at once --------------------------------------------- */

/* Where a timed part waits until every client is set up (-1: alone). */
struct barrier {
	int ready_fd, go_fd;
};

static const struct barrier alone = { -1, -1 };

static void
barrier_wait(const struct barrier *b)
{
	char c = 'r';

	if (b->ready_fd < 0)
		return;
	if (write(b->ready_fd, &c, 1) != 1 || read(b->go_fd, &c, 1) != 1)
		die("%s", "barrier", errno);
}

typedef struct result one_fn(const void *arg, const struct barrier *b);

/* Wait for n bytes on fd, failing if a child exits badly first. */
static void
collect_bytes(int fd, void *buf, size_t n, const char *what)
{
	char *p = buf;

	while (n > 0) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int st;
		pid_t dead;

		if (poll(&pfd, 1, 100) > 0) {
			ssize_t got = read(fd, p, n);

			if (got <= 0)
				die("%s: a client failed", what, 0);
			p += got;
			n -= (size_t)got;
			continue;
		}
		dead = waitpid(-1, &st, WNOHANG);
		if (dead > 0 && (!WIFEXITED(st) || WEXITSTATUS(st) != 0))
			die("%s: a client failed", what, 0);
	}
}

/*
 * Run fn in n processes at once (in this one when n == 1): all are set up
 * before any starts its timed part.  "bytes" of the result is the sum of the
 * clients' rates times the longest client's duration ("ns").
 */
static struct result
run_parallel(one_fn *fn, const void *arg, unsigned n, const char *what)
{
	int ready[2], go[2], res[2];
	struct result total = { 0, 0, 0 };
	struct result *rs;
	double rate = 0;
	char c = 'g';

	if (n < 1 || n > 64)
		die("%s: clients out of range", what, 0);
	if (n == 1)
		return fn(arg, &alone);
	if (pipe(ready) || pipe(go) || pipe(res))
		die("%s", "pipe", errno);
	for (unsigned i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid == -1)
			die("%s", "fork", errno);
		if (pid == 0) {
			struct barrier b = { ready[1], go[0] };
			struct result r;

			close(ready[0]);
			close(go[1]);
			close(res[0]);
			r = fn(arg, &b);
			_exit(write(res[1], &r, sizeof(r)) == (ssize_t)sizeof(r) ? 0 : 1);
		}
	}
	close(ready[1]);
	close(go[0]);
	close(res[1]);
	rs = calloc(n, sizeof(*rs));
	if (rs == NULL)
		die("%s", "calloc", errno);
	collect_bytes(ready[0], rs, n, what);	/* n ready bytes (into scratch) */
	for (unsigned i = 0; i < n; i++)
		if (write(go[1], &c, 1) != 1)
			die("%s", "barrier", errno);
	collect_bytes(res[0], rs, n * sizeof(*rs), what);
	for (unsigned i = 0; i < n; i++) {
		rate += (double)rs[i].bytes / (double)rs[i].ns;
		total.ops += rs[i].ops;
		if (rs[i].ns > total.ns)
			total.ns = rs[i].ns;
	}
	for (unsigned i = 0; i < n; i++) {
		int st;

		if (wait(&st) == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			die("%s: a client failed", what, 0);
	}
	free(rs);
	total.bytes = (uint64_t)(rate * (double)total.ns);
	return total;
}

/* --- sessions --------------------------------------------------------------- */

static int
open_session(const char *path, const char *func)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd == -1)
		die("open %s", path, errno);
	if (fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, func, strlen(func), 0) == -1)
		die("select function %s", func, errno);
	return fd;
}

static void
write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			die("write %s", "requests", errno);
		}
		p += n;
		len -= (size_t)n;
	}
}

static void
read_all(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len > 0) {
		ssize_t n = read(fd, p, len);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			die("read %s", "responses", errno);
		}
		if (n == 0)
			die("read %s: end of file", "responses", 0);
		p += n;
		len -= (size_t)n;
	}
}

static void
check_responses(const struct dmio_usrresp *resp, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (resp[i].resp_error != 0) {
			char id[32];

			snprintf(id, sizeof(id), "%u", (unsigned)resp[i].resp_id);
			die("request %s failed", id, resp[i].resp_error);
		}
	}
}

/* --- small: 4 KiB zero, BATCH per write and read -------------------------------- */

static int
mode_small(const char *path, size_t batch, uint64_t dur)
{
	struct dmio_usrreq req[MAX_BATCH];
	struct dmio_usrresp resp[MAX_BATCH];
	struct iovec iov[MAX_BATCH];
	unsigned char *buf;
	struct result r = { 0, 0, 0 };
	uint64_t t0, t;
	int fd;

	if (batch < 1 || batch > MAX_BATCH)
		die("batch %s out of range", "", 0);
	fd = open_session(path, "zero");
	buf = alloc_touched(batch * SMALL_BYTES, 0xa5);
	memset(req, 0, sizeof(req));
	for (size_t i = 0; i < batch; i++) {
		iov[i].iov_base = buf + i * SMALL_BYTES;
		iov[i].iov_len = SMALL_BYTES;
		req[i].req_outbuf.dmbuf_iov = &iov[i];
		req[i].req_outbuf.dmbuf_iovcnt = 1;
		req[i].req_id = (uint32_t)i;
	}
	/* Warm-up, then check that the work was done. */
	for (int w = 0; w < 20; w++) {
		write_all(fd, req, batch * sizeof(req[0]));
		read_all(fd, resp, batch * sizeof(resp[0]));
		check_responses(resp, batch);
	}
	for (size_t i = 0; i < batch * SMALL_BYTES; i++)
		if (buf[i] != 0)
			die("%s: output not zeroed", "small", 0);

	t0 = t = now_ns();
	do {
		write_all(fd, req, batch * sizeof(req[0]));
		read_all(fd, resp, batch * sizeof(resp[0]));
		r.ops += batch;
		t = now_ns();
	} while (t - t0 < dur);
	check_responses(resp, batch);
	r.ns = t - t0;
	r.bytes = r.ops * SMALL_BYTES;
	close(fd);
	print_result(&r);
	return 0;
}

/* --- big: one large request per write and read ------------------------------ */

enum kind { K_ZERO, K_FILL8, K_COPY, K_XOR, K_CRC };

struct func {
	enum kind kind;
	unsigned ninputs;
	bool output;
};

static struct func
func_of(const char *name)
{
	struct func f = { K_ZERO, 0, true };

	if (strcmp(name, "zero") == 0)
		return f;
	if (strcmp(name, "fill8") == 0)
		return (struct func){ K_FILL8, 0, true };
	if (strcmp(name, "copy") == 0)
		return (struct func){ K_COPY, 1, true };
	if (strcmp(name, "iscsi-crc32c") == 0)
		return (struct func){ K_CRC, 1, false };
	if (strncmp(name, "xor", 3) == 0) {
		unsigned long n = strtoul(name + 3, NULL, 10);

		if (n >= 2 && n <= MAX_INPUTS)
			return (struct func){ K_XOR, (unsigned)n, true };
	}
	die("unknown function %s", name, 0);
	return f;
}

/* CRC32C, table-driven, for the check. */
static uint32_t
crc32c_sw(uint32_t crc, const unsigned char *p, size_t n)
{
	static uint32_t table[256];

	if (table[1] == 0) {
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;

			for (int b = 0; b < 8; b++)
				c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
			table[i] = c;
		}
	}
	crc = ~crc;
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

static void
check_big(const struct func *f, const char *name, unsigned char *out,
    unsigned char *const *in, size_t size, const struct dmio_usrresp *resp)
{
	if (f->kind == K_CRC) {
		uint32_t got = (uint32_t)resp->resp_immediate[0] | (uint32_t)resp->resp_immediate[1] << 8 |
		    (uint32_t)resp->resp_immediate[2] << 16 | (uint32_t)resp->resp_immediate[3] << 24;

		if (got != crc32c_sw(0, in[0], size))
			die("%s: wrong CRC", name, 0);
		return;
	}
	/* Word by word, no early exit: cheap even for xor16 of 16 MiB. */
	uint64_t bad = 0, fill = 0x5c5c5c5c5c5c5c5cu;
	size_t i;

	for (i = 0; i + 8 <= size; i += 8) {
		uint64_t got, want = 0, v;

		memcpy(&got, out + i, 8);
		if (f->kind == K_FILL8)
			want = fill;
		for (unsigned j = 0; j < f->ninputs; j++) {
			memcpy(&v, in[j] + i, 8);
			want ^= v;
		}
		bad |= got ^ want;
	}
	for (; i < size; i++) {
		unsigned char want = f->kind == K_FILL8 ? 0x5c : 0;

		for (unsigned j = 0; j < f->ninputs; j++)
			want ^= in[j][i];
		bad |= (uint64_t)(out[i] ^ want);
	}
	if (bad != 0)
		die("%s: wrong output", name, 0);
}

/* One client of mode big: set up, signal ready, wait for go, run, report. */
struct big_args {
	const char *path, *name;
	size_t size;
	uint64_t dur;
};

/* One request per write and one response per read, for dur ns: the
 * round trips made and how long they took. */
static struct result
round_trips(int fd, const struct dmio_usrreq *req, uint64_t size, uint64_t dur)
{
	struct dmio_usrresp resp;
	struct result r = { 0, 0, 0 };
	uint64_t t0, t;

	t0 = t = now_ns();
	do {
		write_all(fd, req, sizeof(*req));
		read_all(fd, &resp, sizeof(resp));
		r.ops++;
		t = now_ns();
	} while (t - t0 < dur);
	check_responses(&resp, 1);
	r.ns = t - t0;
	r.bytes = r.ops * size;
	return r;
}

static struct result
big_one(const void *arg, const struct barrier *b)
{
	const struct big_args *a = arg;
	const char *path = a->path, *name = a->name;
	size_t size = a->size;
	uint64_t dur = a->dur;
	struct func f = func_of(name);
	struct iovec out_iov, in_iov[MAX_INPUTS];
	dmio_buffer inbuf[MAX_INPUTS];
	unsigned char *out = NULL, *in[MAX_INPUTS];
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct result r;
	int fd = open_session(path, name);

	memset(&req, 0, sizeof(req));
	if (f.output) {
		out = alloc_touched(size, 0xee);
		out_iov = (struct iovec){ out, size };
		req.req_outbuf = (dmio_buffer){ &out_iov, 1 };
	}
	for (unsigned j = 0; j < f.ninputs; j++) {
		in[j] = alloc_touched(size, 0);
		fill_pattern(in[j], size, 0x9E3779B97F4A7C15u * (j + 1));
		in_iov[j] = (struct iovec){ in[j], size };
		inbuf[j] = (dmio_buffer){ &in_iov[j], 1 };
	}
	if (f.ninputs > 0)
		req.req_inbuf = inbuf;
	if (f.kind == K_FILL8)
		req.req_immediate[0] = 0x5c;
	req.req_id = 7;

	/* Warm-up and check. */
	write_all(fd, &req, sizeof(req));
	read_all(fd, &resp, sizeof(resp));
	check_responses(&resp, 1);
	check_big(&f, name, out, in, size, &resp);

	barrier_wait(b);
	r = round_trips(fd, &req, size, dur);
	close(fd);
	return r;
}

static int
mode_big(const char *path, const char *name, size_t size, uint64_t dur, unsigned clients)
{
	struct big_args a = { path, name, size, dur };
	struct result r = run_parallel(big_one, &a, clients, name);

	print_result(&r);
	return 0;
}

/* --- kernel baselines: a second process moves this one's memory -------------- */

struct peer_job {
	pid_t target;
	unsigned char *src, *dst;
	size_t size, chunk;
	uint64_t dur;
	bool copy;		/* else read only */
	struct barrier barrier;	/* the peer waits here after its warm-up pass */
};

static struct result
peer_run(const struct peer_job *j)
{
	unsigned char *bounce = alloc_touched(j->chunk, 0);
	struct result r = { 0, 0, 0 };
	uint64_t t0, t;
	bool warm = true;

	t0 = t = now_ns();
	for (;;) {
		for (size_t off = 0; off < j->size; off += j->chunk) {
			size_t n = j->size - off < j->chunk ? j->size - off : j->chunk;
			struct iovec l = { bounce, n }, rs = { j->src + off, n };

			if (process_vm_readv(j->target, &l, 1, &rs, 1, 0) != (ssize_t)n)
				die("%s", "process_vm_readv", errno);
			if (j->copy) {
				struct iovec rd = { j->dst + off, n };

				if (process_vm_writev(j->target, &l, 1, &rd, 1, 0) != (ssize_t)n)
					die("%s", "process_vm_writev", errno);
			}
		}
		if (warm) {
			warm = false;
			barrier_wait(&j->barrier);
			t0 = t = now_ns();
			continue;
		}
		r.ops++;
		t = now_ns();
		if (t - t0 >= j->dur)
			break;
	}
	r.ns = t - t0;
	r.bytes = r.ops * j->size;
	return r;
}

struct peer_args {
	size_t size, chunk;
	uint64_t dur;
	bool copy;
};

/* One pair: this process holds the memory, a forked peer moves it. */
static struct result
peer_pair(const void *arg, const struct barrier *b)
{
	const struct peer_args *a = arg;
	const char *what = a->copy ? "bounce" : "pvmread";
	int to_peer[2], from_peer[2];
	struct peer_job job;
	struct result r;
	pid_t pid;
	int st;

	if (pipe(to_peer) || pipe(from_peer))
		die("%s", "pipe", errno);
	/* Fork before allocating: no copy-on-write pages shared with the peer. */
	pid = fork();
	if (pid == -1)
		die("%s", "fork", errno);
	if (pid == 0) {
		if (read(to_peer[0], &job, sizeof(job)) != (ssize_t)sizeof(job))
			_exit(1);
		r = peer_run(&job);
		_exit(write(from_peer[1], &r, sizeof(r)) == (ssize_t)sizeof(r) ? 0 : 1);
	}
	close(to_peer[0]);
	close(from_peer[1]);
	job.target = getpid();
	job.size = a->size;
	job.chunk = a->chunk;
	job.dur = a->dur;
	job.copy = a->copy;
	job.barrier = *b;
	job.src = alloc_touched(a->size, 0);
	fill_pattern(job.src, a->size, 42);
	job.dst = a->copy ? alloc_touched(a->size, 0xee) : NULL;
	if (write(to_peer[1], &job, sizeof(job)) != (ssize_t)sizeof(job))
		die("%s", "pipe", errno);
	if (read(from_peer[0], &r, sizeof(r)) != (ssize_t)sizeof(r))
		die("%s: the peer failed", what, 0);
	if (waitpid(pid, &st, 0) == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		die("%s: the peer failed", what, 0);
	if (a->copy && memcmp(job.src, job.dst, a->size) != 0)
		die("%s: the copy differs", what, 0);
	return r;
}

static int
mode_peer(size_t size, uint64_t dur, size_t chunk, bool copy, unsigned clients)
{
	struct peer_args a = { size, chunk == 0 || chunk > size ? size : chunk, dur, copy };
	struct result r = run_parallel(peer_pair, &a, clients, copy ? "bounce" : "pvmread");

	print_result(&r);
	return 0;
}

/* --- memory figures --------------------------------------------------------- */

static int
mode_sessions(const char *path, size_t n)
{
	struct rlimit rl;
	int *fds = calloc(n ? n : 1, sizeof(int));
	char line[64];

	if (fds == NULL)
		die("%s", "calloc", errno);
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < n + 64) {
		rl.rlim_cur = rl.rlim_max < n + 64 ? rl.rlim_max : n + 64;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	for (size_t i = 0; i < n; i++)
		fds[i] = open_session(path, "zero");
	printf("ready %zu\n", n);
	fflush(stdout);
	if (fgets(line, sizeof(line), stdin) == NULL && ferror(stdin))
		die("%s", "stdin", errno);
	for (size_t i = 0; i < n; i++)
		close(fds[i]);
	free(fds);
	return 0;
}

static int
mode_inflight(const char *path, size_t n, size_t size)
{
	struct dmio_usrreq req[MAX_BATCH];
	struct dmio_usrresp resp[MAX_BATCH];
	struct iovec out_iov, in_iov;
	dmio_buffer inbuf;
	unsigned char *src, *dst;
	struct result r = { 0, 0, 0 };
	uint64_t t0;
	int fd;

	if (n < 1 || n > MAX_BATCH)
		die("inflight: %s requests out of range", "", 0);
	fd = open_session(path, "copy");
	src = alloc_touched(size, 0x11);
	dst = alloc_touched(size, 0);
	out_iov = (struct iovec){ dst, size };
	in_iov = (struct iovec){ src, size };
	inbuf = (dmio_buffer){ &in_iov, 1 };
	memset(req, 0, sizeof(req));
	for (size_t i = 0; i < n; i++) {
		req[i].req_outbuf = (dmio_buffer){ &out_iov, 1 };
		req[i].req_inbuf = &inbuf;
		req[i].req_id = (uint32_t)i;
	}
	t0 = now_ns();
	write_all(fd, req, n * sizeof(req[0]));
	read_all(fd, resp, n * sizeof(resp[0]));
	r.ns = now_ns() - t0;
	check_responses(resp, n);
	if (memcmp(src, dst, size) != 0)
		die("inflight: %s", "the copy differs", 0);
	r.ops = n;
	r.bytes = (uint64_t)n * size;
	close(fd);
	print_result(&r);
	return 0;
}

/* --- copyref: a copy request per write and read, against the client's own copy --- */

#define COPYREF_MAX	((size_t)1 << 30)

/*
 * memcpy through a volatile pointer: the compiler cannot merge the two copies
 * of a piece into one, nor drop the stores into the bounce buffer.
 */
static void *(*volatile copy_bytes)(void *, const void *, size_t) = memcpy;

/* size bytes from src to dst through a chunk-byte bounce buffer. */
static void
bounce_copy(unsigned char *dst, const unsigned char *src, unsigned char *bounce, size_t size, size_t chunk)
{
	for (size_t off = 0; off < size; off += chunk) {
		size_t n = size - off < chunk ? size - off : chunk;

		copy_bytes(bounce, src + off, n);
		copy_bytes(dst + off, bounce, n);
	}
}

static int
mode_copyref(const char *path, uint64_t size_arg, uint64_t dur, uint64_t chunk_arg)
{
	struct iovec out_iov, in_iov;
	dmio_buffer inbuf;
	unsigned char *src, *dst, *bounce;
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct result r = { 0, 0, 0 }, ref = { 0, 0, 0 };
	uint64_t t0, t;
	size_t size, chunk;
	int fd;

	if (size_arg < 1 || size_arg > COPYREF_MAX)
		die("copyref: %s", "size out of range", 0);
	size = (size_t)size_arg;
	chunk = chunk_arg < 1 || chunk_arg > size_arg ? size : (size_t)chunk_arg;
	/* func/copy: a session with `copy` already selected. */
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd == -1)
		die("open %s", path, errno);
	src = alloc_touched(size, 0);
	fill_pattern(src, size, 0x9E3779B97F4A7C15u);
	dst = alloc_touched(size, 0xee);
	bounce = alloc_touched(chunk, 0);
	out_iov = (struct iovec){ dst, size };
	in_iov = (struct iovec){ src, size };
	inbuf = (dmio_buffer){ &in_iov, 1 };
	memset(&req, 0, sizeof(req));
	req.req_outbuf = (dmio_buffer){ &out_iov, 1 };
	req.req_inbuf = &inbuf;
	req.req_id = 10;

	/* Warm-up and check of each side, each into a spoiled destination. */
	for (int w = 0; w < 3; w++) {
		write_all(fd, &req, sizeof(req));
		read_all(fd, &resp, sizeof(resp));
		check_responses(&resp, 1);
	}
	if (resp.resp_id != req.req_id || memcmp(src, dst, size) != 0)
		die("copyref: %s", "the request's copy differs", 0);
	memset(dst, 0xee, size);
	for (int w = 0; w < 3; w++)
		bounce_copy(dst, src, bounce, size, chunk);
	if (memcmp(src, dst, size) != 0)
		die("copyref: %s", "the bounce copy differs", 0);

	r = round_trips(fd, &req, size, dur);

	t0 = t = now_ns();
	do {
		bounce_copy(dst, src, bounce, size, chunk);
		ref.ops++;
		t = now_ns();
	} while (t - t0 < dur);
	ref.ns = t - t0;
	ref.bytes = ref.ops * size;
	close(fd);

	printf("{\"ops\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"ns\": %" PRIu64 ", "
	    "\"ref\": {\"ops\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"ns\": %" PRIu64 "}}\n",
	    r.ops, r.bytes, r.ns, ref.ops, ref.bytes, ref.ns);
	fflush(stdout);
	return 0;
}

static void
usage(void)
{
	fprintf(stderr,
	    "usage: client small PATH BATCH SECONDS\n"
	    "       client big PATH FUNC SIZE SECONDS CLIENTS\n"
	    "       client bounce SIZE SECONDS CHUNK [CLIENTS]\n"
	    "       client pvmread SIZE SECONDS CHUNK\n"
	    "       client sessions PATH N\n"
	    "       client inflight PATH N SIZE\n"
	    "       client copyref FUNCPATH SIZE SECONDS CHUNK\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "small") == 0 && argc == 5)
		return mode_small(argv[2], parse_size(argv[3]), parse_seconds_ns(argv[4]));
	if (strcmp(argv[1], "big") == 0 && argc == 7)
		return mode_big(argv[2], argv[3], parse_size(argv[4]), parse_seconds_ns(argv[5]),
		    (unsigned)parse_size(argv[6]));
	if (strcmp(argv[1], "bounce") == 0 && (argc == 5 || argc == 6))
		return mode_peer(parse_size(argv[2]), parse_seconds_ns(argv[3]), parse_size(argv[4]), true,
		    argc == 6 ? (unsigned)parse_size(argv[5]) : 1);
	if (strcmp(argv[1], "pvmread") == 0 && argc == 5)
		return mode_peer(parse_size(argv[2]), parse_seconds_ns(argv[3]), parse_size(argv[4]), false, 1);
	if (strcmp(argv[1], "sessions") == 0 && argc == 4)
		return mode_sessions(argv[2], parse_size(argv[3]));
	if (strcmp(argv[1], "inflight") == 0 && argc == 5)
		return mode_inflight(argv[2], parse_size(argv[3]), parse_size(argv[4]));
	if (strcmp(argv[1], "copyref") == 0 && argc == 6)
		return mode_copyref(argv[2], parse_size(argv[3]), parse_seconds_ns(argv[4]), parse_size(argv[5]));
	usage();
	return 2;
}
