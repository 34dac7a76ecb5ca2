/*
 * fuzz_decode.c - libFuzzer harness of the core's request path:
 * dm_sess_setfunc, dm_sess_submit (decode, validate, inline or worker
 * execution) and dm_sess_take, every result checked against an
 * independent model of SPEC.md's rules.  Built with AddressSanitizer and
 * UBSan by scripts/fuzz and tests/test_fuzz.py (see csrc/fuzz/build.sh).
 *
 * The client.  Request pointers are addresses in the memory of the process
 * that opened the session, reached with process_vm_readv/writev.  Here
 * that process is a child of the fuzzer whose whole address space is a
 * window the harness lays out at a fixed address:
 *
 *   WIN + 0x0000  stub page  r-x  the child's code (its content is known)
 *   WIN + 0x1000  hole       ---  never accessible
 *   WIN + 0x2000  arena      rw-  16 KiB
 *   WIN + 0x6000  arena      r--  4 KiB (read-only in the child)
 *   anything else            not mapped
 *
 * The arena is a shared mapping: the fuzzer fills it from each input and
 * reads back what the core wrote.  The child runs a few instructions of
 * machine code in the stub page that unmap everything else of its address
 * space (its copy of the fuzzer, the ASan shadow) and then sleep, so any
 * pointer the fuzzer invents is either in the window, with known content
 * and protection, or certainly unmapped; a stray write can never land in
 * the fuzzer itself.  A second child that has already exited stands for a
 * client that is gone (its pidfd says so).
 *
 * Input:
 *   byte 0   function: 0..21 table index; 22 an invalid index (ESRCH);
 *            23 none set (ENXIO on submit)                         (mod 24)
 *   byte 1   bits 0-1 core: 0, 3 inline (default kernels, no caps);
 *                1 inline, portable kernels, caps on requests and
 *                metadata; 2 one worker, nothing inline but no-op
 *                requests, cap on requests
 *            bit 2  the client is gone
 *            bit 3  a second setfunc (byte 7 mod 19): EBUSY if one is set
 *            bit 4  close the session without taking the last responses
 *   byte 2   queue depth - 1                                       (mod 72)
 *   byte 3   number of requests                                    (mod 128)
 *   byte 4   requests per dm_sess_submit call, 0 = all             (mod 64)
 *   byte 5   responses taken after each call                       (mod 64)
 *   byte 6   the invalid index of function 22 (the table size, -1, INT_MAX, INT_MIN)
 *   byte 7   the second setfunc's function
 *   then     the requests, 40 bytes each (struct dmio_usrreq)
 *   then     the arena image (rest zero)
 *
 * The model judges each request by SPEC.md's rules in the order the
 * implementation applies them (out count, dmio_buffer array readable, input
 * counts, metadata cap, iovec arrays readable, totals, overlap, request
 * cap), windows and queue depth included, predicts each response (EFAULT
 * exactly when a byte to read or write lies outside the readable or
 * writable window), and replays the data movement byte by byte with its
 * own zero/fill/copy/XOR/CRC32C.  Bytes a failed request may have half
 * written become unknown; when a decision depends on an unknown byte (or,
 * with the worker, on a byte a queued request may or may not have written
 * yet) the model stops predicting and the input only runs under the
 * sanitizers.  Inputs whose replay would cost more than the budgets below
 * are cut short before submission.  Any disagreement aborts with a report.
 * Two facts come from the implementation rather than SPEC.md, because they
 * decide observable results: a window of IOV_MAX / (1 + inputs) requests is
 * decoded before any of it runs (a request may rewrite the iovec arrays of
 * a later one), and a request holds offsetof(struct dm_req, in) + one
 * struct dm_list per input + 16 bytes per iovec against the metadata cap.
 * After a refused request the harness goes on with the next one, as a
 * client would after a short write.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dmint.h"	/* the public API, and struct dm_req for the metadata size */

#if !defined(__x86_64__)
#error "the client stub is x86-64 machine code"
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* --- the client's address space --------------------------------------- */

#define PAGE		((uint64_t)4096)
/*
 * The window's place: in none of what an ASan build maps at fixed addresses
 * on x86-64 -- its shadow (up to 0x10007fff7fff) and its allocator's heap
 * (4 TiB from 0x600000000000 with clang 14, from 0x500000000000 with clang
 * 19) -- nor where the kernel puts a PIE executable (0x55...) or libraries
 * and stacks (0x7f...).  The seeds (make_seeds.py) and the dictionary
 * (fuzz_decode.dict) hold its addresses too.
 */
#define WIN		((uint64_t)0x300000000000)
#define STUB		WIN
#define RW		(WIN + 2 * PAGE)
#define RW_SIZE		(4 * PAGE)
#define RO		(RW + RW_SIZE)
#define ARENA_SIZE	(RW_SIZE + PAGE)
#define WIN_SIZE	(RO + PAGE - WIN)
#define TASK_TOP	((uint64_t)0x7ffffffff000)	/* x86-64 user space, 4-level paging */

#define NFUNC		22		/* NetBSD's 19 functions and the 3 extensions */
#define NIOV		1024				/* IOV_MAX */
#define MAX_REQS	128
#define HEADER		8
#define WIRE		40

/* Budgets per input: model bytes moved, overlap pairs compared, iovecs copied. */
#define BUDGET_BYTES	((uint64_t)4 << 20)
#define BUDGET_PAIRS	((uint64_t)4 << 20)
#define BUDGET_IOVS	((uint64_t)1 << 20)

static pid_t child_pid, dead_pid;
static int child_pidfd = -1, dead_pidfd = -1;
static uint8_t *arena;				/* the fuzzer's view of RW..RO+PAGE */
static uint8_t stub_image[PAGE];

/* Its own function table: inputs and whether an output is required. */
static const struct {
	int nin;
	bool out;
} FN[NFUNC] = {
	{ 0, true }, { 0, true }, { 1, true },
	{ 2, true }, { 3, true }, { 4, true }, { 5, true }, { 6, true }, { 7, true },
	{ 8, true }, { 9, true }, { 10, true }, { 11, true }, { 12, true }, { 13, true },
	{ 14, true }, { 15, true }, { 16, true },
	{ 1, false },
	{ 0, true }, { 2, false }, { 1, true },		/* fill64, compare, copy-crc32c */
};
enum { F_ZERO = 0, F_FILL8 = 1, F_COPY = 2, F_CRC = 18, F_FILL64 = 19, F_COMPARE = 20, F_COPY_CRC = 21 };

/* --- the cores ---------------------------------------------------------- */

struct core_cfg {
	const char *name;
	const char *kernels;
	struct dm_config cfg;
	bool worker;			/* everything that moves a byte runs on the (single) worker */
};

static const struct core_cfg cores_cfg[3] = {
	{ "inline", NULL, { .workers = 1, .chunk_bytes = 1088, .inline_bytes = SIZE_MAX }, false },
	{ "inline-portable-capped", "portable", { .workers = 1, .chunk_bytes = 320, .inline_bytes = SIZE_MAX,
	    .max_requests = 6, .max_meta_bytes = 40000 }, false },
	/* Requests of more than two chunks run in slices. */
	{ "worker-capped", NULL, { .workers = 1, .chunk_bytes = 4096, .max_requests = 5, .slice_bytes = 8192 }, true },
};
static dm_core *cores[3];
static uint64_t next_sess_id = 1;

/* --- failure reports ---------------------------------------------------- */

static const uint8_t *cur_data;
static size_t cur_size;

/*
 * The harness's self-test (tests/test_fuzz.py): DMOVERFS_FUZZ_SABOTAGE=byte
 * corrupts a client byte after a run, =resp a response, as a faulty core
 * would; the model must then report a mismatch.
 */
static enum { SABOTAGE_NONE, SABOTAGE_BYTE, SABOTAGE_RESP } sabotage;

static void
fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "\nfuzz_decode: MODEL MISMATCH: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n(input of %zu bytes; header", cur_size);
	for (size_t i = 0; i < HEADER && i < cur_size; i++)
		fprintf(stderr, " %02x", cur_data[i]);
	fprintf(stderr, ")\n");
	abort();
}

static void
die(const char *what)
{
	fprintf(stderr, "fuzz_decode: %s: %s\n", what, strerror(errno));
	abort();
}

/* --- setting up the clients --------------------------------------------- */

static size_t
emit_movabs(uint8_t *p, uint8_t op, uint64_t v)
{
	p[0] = 0x48;		/* REX.W */
	p[1] = op;		/* 0xbf: rdi, 0xbe: rsi */
	memcpy(p + 2, &v, 8);
	return 10;
}

static size_t
emit_syscall(uint8_t *p, uint32_t nr)
{
	p[0] = 0xb8;		/* mov eax, imm32 */
	memcpy(p + 1, &nr, 4);
	p[5] = 0x0f;		/* syscall */
	p[6] = 0x05;
	return 7;
}

/* munmap(0, STUB); munmap(WIN + WIN_SIZE, rest); for (;;) pause(); */
static void
build_stub(uint8_t *p)
{
	size_t n = 0, loop;

	n += emit_movabs(p + n, 0xbf, 0);
	n += emit_movabs(p + n, 0xbe, STUB);
	n += emit_syscall(p + n, SYS_munmap);
	n += emit_movabs(p + n, 0xbf, WIN + WIN_SIZE);
	n += emit_movabs(p + n, 0xbe, TASK_TOP - (WIN + WIN_SIZE));
	n += emit_syscall(p + n, SYS_munmap);
	loop = n;
	n += emit_syscall(p + n, SYS_pause);
	p[n] = 0xeb;		/* jmp rel8 back to loop */
	p[n + 1] = (uint8_t)(int8_t)((int)loop - (int)(n + 2));
}

static void *
map_fixed(uint64_t addr, size_t len, int prot, int flags)
{
	void *p = mmap((void *)(uintptr_t)addr, len, prot, flags, -1, 0);

	if (p == MAP_FAILED || (uintptr_t)p != addr)
		die("mmap of the client window");
	return p;
}

/* Reserve the window; if something of the fuzzer is there, say what. */
static void
reserve_window(void)
{
	void *p = mmap((void *)(uintptr_t)WIN, WIN_SIZE, PROT_NONE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
	char line[512];
	FILE *f;

	if (p != MAP_FAILED && (uintptr_t)p == WIN)
		return;
	fprintf(stderr, "fuzz_decode: cannot map the client window at %#llx: %s; mapped there:\n",
	    (unsigned long long)WIN, p == MAP_FAILED ? strerror(errno) : "the kernel ignored the address");
	if ((f = fopen("/proc/self/maps", "r")) != NULL) {
		while (fgets(line, sizeof(line), f) != NULL) {
			unsigned long long lo, hi;

			if (sscanf(line, "%llx-%llx", &lo, &hi) == 2 && lo < WIN + WIN_SIZE && hi > WIN)
				fputs(line, stderr);
		}
		fclose(f);
	}
	abort();
}

static int
pidfd_open_(pid_t pid)
{
	int fd = (int)syscall(SYS_pidfd_open, pid, 0);

	if (fd < 0)
		die("pidfd_open");
	return fd;
}

/*
 * Unregistering takes the length glibc registered the area with, which it
 * does not export and which is not sizeof(struct rseq): glibc 2.42 registers
 * 32 bytes while its header's struct is 64.  A wrong length is refused
 * (EINVAL) and changes nothing, so try each multiple of the alignment.
 */
static bool
unregister_rseq(void)
{
	void *area = (char *)__builtin_thread_pointer() + __rseq_offset;

	for (uint32_t len = 32; len <= 4096; len += 32) {
		if (syscall(SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) == 0)
			return true;
		if (errno != EINVAL)
			return false;
	}
	return false;
}

/* Does /proc/PID/maps show nothing but the window (and the vsyscall page)? */
static bool
child_ready(pid_t pid)
{
	char path[64], line[512];
	FILE *f;
	bool ok = true;
	int lines = 0;

	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	if ((f = fopen(path, "r")) == NULL)
		return false;
	while (fgets(line, sizeof(line), f) != NULL) {
		unsigned long long lo, hi;

		if (sscanf(line, "%llx-%llx", &lo, &hi) != 2)
			ok = false;
		else if (strstr(line, "[vsyscall]") == NULL && (lo < WIN || hi > WIN + WIN_SIZE))
			ok = false;
		lines++;
	}
	fclose(f);
	return ok && lines > 0;
}

static void
kill_children(void)
{
	if (child_pid > 0) {
		kill(child_pid, SIGKILL);
		waitpid(child_pid, NULL, 0);
		child_pid = 0;
	}
}

static void
start_clients(void)
{
	sigset_t all;

	build_stub(stub_image);
	/* Reserve the window (the hole stays PROT_NONE), then map its parts. */
	reserve_window();
	memcpy(map_fixed(STUB, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED),
	    stub_image, PAGE);
	if (mprotect((void *)(uintptr_t)STUB, PAGE, PROT_READ | PROT_EXEC) != 0)
		die("mprotect of the stub");
	arena = map_fixed(RW, ARENA_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED);

	if ((child_pid = fork()) < 0)
		die("fork");
	if (child_pid == 0) {
		/* Dies with the fuzzer, however the fuzzer ends. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() == 1)
			_exit(1);
		sigfillset(&all);
		sigprocmask(SIG_SETMASK, &all, NULL);
		mprotect((void *)(uintptr_t)RO, PAGE, PROT_READ);
		/* The kernel writes to the thread's rseq area on preemption: a
		 * registration left pointing at unmapped memory earns SIGSEGV. */
		if (__rseq_size > 0 && !unregister_rseq()) {
			fprintf(stderr, "fuzz_decode: cannot unregister the client child's rseq area: %s\n",
			    strerror(errno));
			_exit(1);
		}
		/* A jump, not a call through a function pointer: clang 19's
		 * UBSan checks such a call by reading the 8 bytes before the
		 * callee, here the unmapped page below the window. */
		__asm__ volatile("jmp *%0" : : "r"((uintptr_t)STUB));
		__builtin_unreachable();
	}
	child_pidfd = pidfd_open_(child_pid);
	atexit(kill_children);
	for (int i = 0; !child_ready(child_pid); i++) {
		struct timespec ms = { 0, 1000000 };

		if (i > 5000) {
			fprintf(stderr, "fuzz_decode: the client child never reached its stub\n");
			abort();
		}
		nanosleep(&ms, NULL);
	}

	if ((dead_pid = fork()) < 0)
		die("fork");
	if (dead_pid == 0)
		_exit(0);
	dead_pidfd = pidfd_open_(dead_pid);
	waitpid(dead_pid, NULL, 0);
}

static void
check_child_alive(void)
{
	struct pollfd p = { .fd = child_pidfd, .events = POLLIN };

	if (poll(&p, 1, 0) != 0) {
		fprintf(stderr, "fuzz_decode: the client child died\n");
		abort();
	}
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	/* The model's function table must be the core's. */
	if (dm_func_count() != NFUNC)
		fail("the core has %d functions, the model %d: update fuzz_decode.c", dm_func_count(), NFUNC);
	for (int i = 0; i < NFUNC; i++)
		if (dm_func_ninputs(i) != FN[i].nin || dm_func_has_output(i) != FN[i].out)
			fail("function %d (%s) is not the model's: update fuzz_decode.c", i, dm_func_name(i));
	start_clients();
	for (int i = 0; i < 3; i++) {
		int err = 0;

		if (cores_cfg[i].kernels != NULL)
			setenv("DMOVERFS_KERNELS", cores_cfg[i].kernels, 1);
		else
			unsetenv("DMOVERFS_KERNELS");
		if ((cores[i] = dm_core_new(&cores_cfg[i].cfg, &err)) == NULL) {
			errno = err;
			die("dm_core_new");
		}
	}
	unsetenv("DMOVERFS_KERNELS");
	if (getenv("DMOVERFS_FUZZ_SABOTAGE") != NULL)
		sabotage = strcmp(getenv("DMOVERFS_FUZZ_SABOTAGE"), "byte") == 0 ? SABOTAGE_BYTE : SABOTAGE_RESP;
	return 0;
}

/* --- the model ------------------------------------------------------------ */


struct seg {
	uint64_t base, len;
};

struct mreq {
	uint32_t id;
	uint8_t imm[8];
	uint32_t cnt[1 + 16];		/* [0] output, [1 + i] input i */
	struct seg *list[1 + 16];	/* into the pool */
	uint64_t total;
};

struct expect {
	uint32_t id;
	int err;
	uint8_t imm[8];
	bool imm_known;
};

#define INDET (-1)			/* the model cannot tell */

struct model {
	uint8_t mem[WIN_SIZE];		/* the window as the model sees it */
	uint8_t known[WIN_SIZE];	/* 0: a failed request may have written it */
	uint8_t pend[WIN_SIZE];		/* written by a request still queued to the worker */
	bool dead;
	const struct core_cfg *cc;
	unsigned depth, outstanding;
	uint64_t bytes, pairs, iovs;	/* budgets spent */
	size_t nexp, ntaken;
	struct expect exp[MAX_REQS];
};

static struct model M, saved;
static struct seg pool[(size_t)NIOV * NIOV];
static struct mreq win[NIOV];

static uint32_t
get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return v;
}

static uint64_t
get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

/* Is [a, a + len) inside [lo, lo + size)?  (len > 0; no wrapping.) */
static bool
inside(uint64_t a, uint64_t len, uint64_t lo, uint64_t size)
{
	return a >= lo && a - lo < size && len <= size - (a - lo);
}

static bool
readable(const struct model *m, uint64_t a, uint64_t len)
{
	return !m->dead && (inside(a, len, STUB, PAGE) || inside(a, len, RW, ARENA_SIZE));
}

static bool
writable(const struct model *m, uint64_t a, uint64_t len)
{
	return !m->dead && inside(a, len, RW, RW_SIZE);
}

/* Read len > 0 client bytes at a for the decoder: 0, EFAULT or INDET. */
static int
m_read(const struct model *m, uint64_t a, void *out, size_t len)
{
	size_t off;

	if (!readable(m, a, len))
		return EFAULT;
	off = (size_t)(a - WIN);
	for (size_t i = 0; i < len; i++)
		if (!m->known[off + i] || m->pend[off + i])
			return INDET;
	memcpy(out, m->mem + off, len);
	return 0;
}

/* Sum of a list; EINVAL beyond SSIZE_MAX. */
static int
m_total(const struct seg *l, uint32_t n, uint64_t *total)
{
	uint64_t sum = 0;

	for (uint32_t i = 0; i < n; i++) {
		if (l[i].len > (uint64_t)INT64_MAX || sum + l[i].len > (uint64_t)INT64_MAX)
			return EINVAL;
		sum += l[i].len;
	}
	*total = sum;
	return 0;
}

/* Do [a, a + n) and [c, c + k) share a byte, as sets of integers (n, k > 0)? */
static bool
seg_overlap(uint64_t a, uint64_t n, uint64_t c, uint64_t k)
{
	return a <= c ? c - a < n : a - c < k;
}

/*
 * Judge one request (wire w) of a window by the rules in order.  meta is
 * the metadata the window holds so far.  0 (r filled), an errno, or INDET.
 */
static int
m_decode(struct model *m, int func, const uint8_t *w, struct mreq *r, uint64_t *meta, size_t *pooled)
{
	int nin = FN[func].nin, e;
	uint8_t dmb[16 * 16];
	uint64_t where[1 + 16], ncopy, size, out_total = 0;

	r->cnt[0] = get32(w + 8);
	where[0] = get64(w + 0);
	if (r->cnt[0] > NIOV)
		return EINVAL;
	if (nin > 0 && (e = m_read(m, get64(w + 24), dmb, (size_t)16 * nin)) != 0)
		return e;
	ncopy = r->cnt[0];
	for (int i = 0; i < nin; i++) {
		r->cnt[1 + i] = get32(dmb + 16 * i + 8);
		where[1 + i] = get64(dmb + 16 * i);
		if (r->cnt[1 + i] == 0 || r->cnt[1 + i] > NIOV)
			return EINVAL;
		ncopy += r->cnt[1 + i];
	}
	size = offsetof(struct dm_req, in) + (uint64_t)nin * sizeof(struct dm_list) + ncopy * 16;
	if (m->cc->cfg.max_meta_bytes != 0 && *meta + size > m->cc->cfg.max_meta_bytes)
		return EAGAIN;
	*meta += size;

	/* Every array's readability is settled by the layout; content may not be. */
	for (int i = 0; i <= nin; i++)
		if (r->cnt[i] > 0 && !readable(m, where[i], (uint64_t)r->cnt[i] * 16))
			return EFAULT;
	m->iovs += ncopy;
	if (m->iovs > BUDGET_IOVS)
		return INDET;
	for (int i = 0; i <= nin; i++) {
		r->list[i] = pool + *pooled;
		*pooled += r->cnt[i];
		if (r->cnt[i] > 0 && m_read(m, where[i], r->list[i], (size_t)r->cnt[i] * 16) != 0)
			return INDET;
	}

	if (m_total(r->list[0], r->cnt[0], &out_total) != 0)
		return EINVAL;
	for (int i = 0; i < nin; i++) {
		uint64_t t;

		if (m_total(r->list[1 + i], r->cnt[1 + i], &t) != 0)
			return EINVAL;
		/* Without an output, input 0 sets the size the others must have. */
		if (i == 0 && r->cnt[0] == 0)
			out_total = t;
		else if (t != out_total)
			return EINVAL;
	}
	r->total = out_total;
	if (r->cnt[0] > 0)
		for (int i = 0; i < nin; i++)
			for (uint32_t j = 0; j < r->cnt[1 + i]; j++) {
				const struct seg *v = &r->list[1 + i][j];

				if (v->len == 0)
					continue;
				m->pairs += r->cnt[0];
				for (uint32_t k = 0; k < r->cnt[0]; k++) {
					const struct seg *o = &r->list[0][k];

					if (o->len > 0 && seg_overlap(v->base, v->len, o->base, o->len))
						return EINVAL;
				}
			}
	if (m->pairs > BUDGET_PAIRS)
		return INDET;
	r->id = get32(w + 32);
	memcpy(r->imm, w + 16, 8);
	return 0;
}

struct cursor {
	const struct seg *l;
	uint32_t i;
	uint64_t off;
};

/* The client address of the next byte of the list (total not exceeded). */
static uint64_t
cur_next(struct cursor *c)
{
	uint64_t a;

	while (c->off == c->l[c->i].len) {
		c->i++;
		c->off = 0;
	}
	a = c->l[c->i].base + c->off;
	c->off++;
	return a;
}

static uint32_t
crc32c_byte(uint32_t raw, uint8_t b)
{
	raw ^= b;
	for (int k = 0; k < 8; k++)
		raw = raw >> 1 ^ (0x82f63b78u & (0u - (raw & 1)));
	return raw;
}

/* Run an accepted request in the model; its expected response. */
static void
m_exec(struct model *m, int func, const struct mreq *r, bool queued, struct expect *x)
{
	int nin = FN[func].nin;
	bool ok = true, known_all = true;
	uint32_t raw;

	x->id = r->id;
	x->err = 0;
	x->imm_known = true;
	memcpy(x->imm, r->imm, 8);
	if (FN[func].out != (r->cnt[0] > 0)) {
		x->err = EINVAL;
		memset(x->imm, 0, 8);
		return;
	}
	for (int i = 0; i <= nin && ok; i++)
		for (uint32_t j = 0; j < r->cnt[i] && ok; j++) {
			const struct seg *v = &r->list[i][j];

			if (v->len > 0)
				ok = i == 0 ? writable(m, v->base, v->len) : readable(m, v->base, v->len);
		}
	if (!ok && r->total > 0) {
		/* Whatever of the output lies in the window may be written. */
		x->err = EFAULT;
		memset(x->imm, 0, 8);
		for (uint32_t j = 0; j < r->cnt[0]; j++) {
			const struct seg *v = &r->list[0][j];

			for (uint64_t b = 0; b < v->len && b < WIN_SIZE; b++)
				if (v->base + b >= WIN && v->base + b - WIN < WIN_SIZE)
					m->known[v->base + b - WIN] = 0;
		}
		return;
	}

	{
		struct cursor in[16], out = { r->list[0], 0, 0 };
		uint64_t diff = UINT64_MAX;	/* compare: all ones when equal */

		for (int i = 0; i < nin; i++)
			in[i] = (struct cursor){ r->list[1 + i], 0, 0 };
		raw = ~(uint32_t)get32(r->imm);
		m->bytes += r->total * (uint64_t)(nin + 1);
		for (uint64_t p = 0; p < r->total; p++) {
			uint8_t b[16], v;
			bool k = true;

			for (int i = 0; i < nin; i++) {
				size_t o = (size_t)(cur_next(&in[i]) - WIN);

				b[i] = m->mem[o];
				k = k && m->known[o];
			}
			if (func == F_COMPARE) {
				if (!k) {	/* the first difference may lie here */
					known_all = false;
					break;
				}
				if (b[0] != b[1]) {
					diff = p;
					break;
				}
				continue;
			}
			v = func == F_FILL8 ? r->imm[0] : func == F_FILL64 ? r->imm[p % 8] : 0;
			for (int i = 0; i < nin; i++)
				v ^= b[i];
			if (func == F_CRC || func == F_COPY_CRC) {
				raw = crc32c_byte(raw, v);
				known_all = known_all && k;
			}
			if (FN[func].out) {
				size_t o = (size_t)(cur_next(&out) - WIN);

				m->mem[o] = v;
				m->known[o] = k;
				if (queued)
					m->pend[o] = 1;
			}
		}
		if (func == F_COMPARE) {
			memcpy(x->imm, &diff, 8);
			x->imm_known = known_all;
		}
	}
	if (func == F_CRC || func == F_COPY_CRC) {
		uint32_t crc = ~raw;

		memset(x->imm, 0, 8);
		memcpy(x->imm, &crc, 4);
		x->imm_known = known_all;
	}
}

/* --- one input ------------------------------------------------------------ */

struct input {
	int func;			/* -1: none */
	const struct core_cfg *cc;
	dm_core *core;
	bool dead, twice, close_early;
	unsigned depth;
	size_t nreq, piece, take;
	int bad_index, second;
	const uint8_t *wire;
	const uint8_t *image;
	size_t image_len;
};

static const char *
errname(int e)
{
	static char buf[16];

	switch (e) {
	case 0: return "0";
	case EINVAL: return "EINVAL";
	case EFAULT: return "EFAULT";
	case EAGAIN: return "EAGAIN";
	case ENXIO: return "ENXIO";
	case EPERM: return "EPERM";
	case ENOMEM: return "ENOMEM";
	case ECANCELED: return "ECANCELED";
	default:
		snprintf(buf, sizeof(buf), "errno %d", e);
		return buf;
	}
}

/*
 * Predict one dm_sess_submit of n requests: how many are accepted and the
 * error after them, running the accepted ones in the model.  INDET when
 * the model lost track.
 */
static int
m_submit(struct model *m, int func, const uint8_t *wire, size_t n, size_t *accepted)
{
	size_t done = 0, max;

	*accepted = 0;
	if (func < 0)
		return ENXIO;
	max = NIOV / (1 + (size_t)FN[func].nin);	/* the core's window */
	for (;;) {
		size_t room = m->depth - m->outstanding, want = n - done, k = 0, pooled = 0;
		uint64_t meta = 0;
		int e = 0;

		if (want > room)
			want = room;
		if (want > max)
			want = max;
		if (want == 0)
			return 0;
		/* Decode the window, stopping at the first bad request... */
		for (; k < want; k++) {
			e = m_decode(m, func, wire + (done + k) * WIRE, &win[k], &meta, &pooled);
			if (e == INDET)
				return INDET;
			if (e != 0)
				break;
		}
		/* ...then start the good ones, each against the request cap. */
		for (size_t i = 0; i < k; i++) {
			bool queued;

			if (m->cc->cfg.max_requests != 0 && m->outstanding >= m->cc->cfg.max_requests) {
				*accepted = done + i;
				return EAGAIN;
			}
			queued = m->cc->worker && FN[func].out == (win[i].cnt[0] > 0) && win[i].total > 0;
			m_exec(m, func, &win[i], queued, &m->exp[m->nexp++]);
			m->outstanding++;
			if (m->bytes > BUDGET_BYTES)
				return INDET;
		}
		done += k;
		*accepted = done;
		if (e != 0)
			return e;
		if (done == n)
			return 0;
	}
}

static void
wait_ready(dm_core *c, dm_sess *s, unsigned want)
{
	struct timespec t0, t;
	unsigned out, ready;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		struct pollfd p = { .fd = dm_core_eventfd(c), .events = POLLIN };
		uint64_t ids[64];

		dm_sess_counts(s, &out, &ready);
		if (ready >= want)
			return;
		poll(&p, 1, 100);
		dm_core_drain(c, ids, 64);
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 60)
			fail("the worker never completed: %u of %u ready", ready, want);
	}
}

static void
wait_idle(dm_core *c)
{
	struct timespec t0, t;
	struct dm_core_stats st;
	struct dm_func_stats fs[NFUNC];

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		uint64_t ids[64];

		dm_core_stats(c, &st, fs, NFUNC);
		if (st.outstanding == 0 && st.executing == 0 && st.meta_bytes == 0)
			break;
		dm_core_drain(c, ids, 64);
		sched_yield();
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 60)
			fail("the core never became idle: outstanding %llu executing %llu meta %llu",
			    (unsigned long long)st.outstanding, (unsigned long long)st.executing,
			    (unsigned long long)st.meta_bytes);
	}
	for (int i = 0; i < NFUNC; i++)
		if (fs[i].submitted != fs[i].completed + fs[i].failed)
			fail("function %d: %llu submitted, %llu completed, %llu failed", i,
			    (unsigned long long)fs[i].submitted, (unsigned long long)fs[i].completed,
			    (unsigned long long)fs[i].failed);
}

static bool
resp_matches(const struct dmio_usrresp *a, const struct expect *x)
{
	return a->resp_id == x->id && a->resp_error == x->err &&
	    (!x->imm_known || memcmp(a->resp_immediate, x->imm, 8) == 0);
}

static void
report_resp(const char *what, size_t i, const struct dmio_usrresp *a, const struct expect *x)
{
	fail("%s %zu: got id %u %s imm %016llx, expected id %u %s imm %016llx%s", what, i,
	    a->resp_id, errname(a->resp_error), (unsigned long long)get64(a->resp_immediate),
	    x->id, errname(x->err), (unsigned long long)get64(x->imm), x->imm_known ? "" : " (any)");
}

static struct dmio_usrresp got[MAX_REQS];
static size_t ngot;

/* Take up to max responses and check them against the model. */
static void
take(dm_sess *s, const struct input *in, size_t max, bool tracking)
{
	size_t n = dm_sess_take(s, got + ngot, max);

	if (sabotage == SABOTAGE_RESP && n > 0)
		got[ngot].resp_error ^= 1;

	if (n > max || ngot + n > M.nexp)
		fail("take(%zu) returned %zu with %zu taken of %zu accepted", max, n, ngot, M.nexp);
	if (tracking && !in->cc->worker)	/* inline: in acceptance order */
		for (size_t i = ngot; i < ngot + n; i++)
			if (!resp_matches(&got[i], &M.exp[i]))
				report_resp("response", i, &got[i], &M.exp[i]);
	ngot += n;
	M.outstanding -= (unsigned)n;
}

/* With the worker, completion order is free: match taken responses as a multiset. */
static void
match_multiset(void)
{
	bool used[MAX_REQS] = { false };

	for (int pass = 0; pass < 2; pass++)
		for (size_t i = 0; i < M.nexp; i++) {
			const struct expect *x = &M.exp[i];

			if (x->imm_known != (pass == 0) || used[i])
				continue;
			for (size_t j = 0; j < ngot; j++)
				if (got[j].resp_id != 0xffffffffu && resp_matches(&got[j], x)) {
					got[j].resp_id = 0xffffffffu;	/* consumed */
					used[i] = true;
					break;
				}
		}
	for (size_t j = 0; j < ngot; j++) {
		if (got[j].resp_id != 0xffffffffu)
			fail("response %zu (id %u %s) matches no accepted request", j, got[j].resp_id,
			    errname(got[j].resp_error));
	}
}

static void
check_counts(dm_sess *s, const struct input *in, const char *when)
{
	unsigned out, ready;

	dm_sess_counts(s, &out, &ready);
	if (out != M.outstanding || ready > out || (!in->cc->worker && ready != out))
		fail("%s: counts (%u outstanding, %u ready), model %u outstanding", when, out, ready, M.outstanding);
}

static void
run(const struct input *in)
{
	int err;
	int func = -1;
	bool tracking = true;
	dm_sess *s;

	memset(arena, 0, ARENA_SIZE);
	memcpy(arena, in->image, in->image_len);
	memset(&M, 0, offsetof(struct model, exp));
	memcpy(M.mem, stub_image, PAGE);
	memset(M.known, 1, WIN_SIZE);
	memcpy(M.mem + (RW - WIN), arena, ARENA_SIZE);
	M.dead = in->dead;
	M.cc = in->cc;
	M.depth = in->depth;
	ngot = 0;

	s = dm_sess_new(in->core, next_sess_id++, in->dead ? dead_pid : child_pid,
	    fcntl(in->dead ? dead_pidfd : child_pidfd, F_DUPFD_CLOEXEC, 3), in->depth);
	if (s == NULL)
		die("dm_sess_new");

	if (in->func >= 0) {
		if ((err = dm_sess_setfunc(s, in->func)) != 0)
			fail("setfunc(%d) = %s", in->func, errname(err));
		func = in->func;
	} else if (in->func == -1 && (err = dm_sess_setfunc(s, in->bad_index)) != ESRCH)
		fail("setfunc(%d) = %s, expected ESRCH", in->bad_index, errname(err));
	if (in->twice) {
		err = dm_sess_setfunc(s, in->second);
		if (err != (func >= 0 ? EBUSY : 0))
			fail("second setfunc(%d) = %s with function %d", in->second, errname(err), func);
		if (func < 0)
			func = in->second;
	}

	for (size_t pos = 0; pos < in->nreq && tracking;) {
		size_t n = in->nreq - pos, acc, want, took;
		int pe;

		if (in->piece != 0 && n > in->piece)
			n = in->piece;
		memcpy(&saved, &M, sizeof(M));
		pe = m_submit(&M, func, in->wire + pos * WIRE, n, &acc);
		if (pe == INDET) {
			if (M.bytes > BUDGET_BYTES || M.pairs > BUDGET_PAIRS || M.iovs > BUDGET_IOVS) {
				memcpy(&M, &saved, sizeof(M));	/* too costly: not submitted */
				break;
			}
			tracking = false;
		}
		want = tracking ? acc : 0;
		acc = dm_sess_submit(s, in->wire + pos * WIRE, n, &err);
		if (tracking && (acc != want || err != pe))
			fail("submit of %zu at %zu: accepted %zu (%s), model %zu (%s)", n, pos, acc,
			    errname(err), want, errname(pe));
		if (acc > n)
			fail("submit of %zu accepted %zu", n, acc);
		if (!tracking) {
			M.outstanding = saved.outstanding + (unsigned)acc;
			M.nexp = saved.nexp + acc;
		}
		if (in->cc->worker) {
			wait_ready(in->core, s, M.outstanding);
			memset(M.pend, 0, sizeof(M.pend));
		}
		check_counts(s, in, "after submit");
		took = ngot;
		take(s, in, in->take, tracking);
		check_counts(s, in, "after take");
		/* Go on after a refused request, as a client would; stop when
		 * nothing can move any more. */
		pos += acc + (err != 0);
		if (err == ENXIO || (acc == 0 && err == 0 && ngot == took))
			break;
	}

	if (!in->close_early) {
		wait_ready(in->core, s, M.outstanding);
		take(s, in, MAX_REQS, tracking);
		check_counts(s, in, "at the end");
		if (M.outstanding != 0)
			fail("%u responses never came", M.outstanding);
	} else if (in->cc->worker) {
		/* Requests still on the worker are cancelled: their output is unknown. */
		for (size_t i = 0; i < WIN_SIZE; i++)
			if (M.pend[i])
				M.known[i] = 0;
	}
	dm_sess_close(s);
	wait_idle(in->core);

	if (!tracking)
		return;
	if (in->cc->worker)
		match_multiset();
	if (sabotage == SABOTAGE_BYTE)
		arena[0] ^= 1;
	if (memcmp(arena, M.mem + (RW - WIN), ARENA_SIZE) != 0)
		for (size_t i = 0; i < ARENA_SIZE; i++) {
			size_t o = (size_t)(RW - WIN) + i;

			if (M.known[o] && arena[i] != M.mem[o])
				fail("client byte at %#llx is %#x, expected %#x", (unsigned long long)(RW + i),
				    arena[i], M.mem[o]);
		}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in;
	unsigned f;

	if (size < HEADER)
		return 0;
	cur_data = data;
	cur_size = size;
	check_child_alive();

	f = data[0] % (NFUNC + 2);
	in.func = f < NFUNC ? (int)f : f == NFUNC ? -1 : -2;
	in.cc = &cores_cfg[(data[1] & 3) == 3 ? 0 : data[1] & 3];
	in.core = cores[in.cc - cores_cfg];
	in.dead = data[1] & 4;
	in.twice = data[1] & 8;
	in.close_early = data[1] & 16;
	in.depth = 1 + data[2] % 72;
	in.nreq = data[3] % MAX_REQS;
	if (in.nreq > (size - HEADER) / WIRE)
		in.nreq = (size - HEADER) / WIRE;
	in.piece = data[4] % 64;
	in.take = data[5] % 64;
	in.bad_index = (const int[]){ NFUNC, -1, INT_MAX, INT_MIN }[data[6] & 3];
	in.second = data[7] % NFUNC;
	in.wire = data + HEADER;
	in.image = in.wire + in.nreq * WIRE;
	in.image_len = size - HEADER - in.nreq * WIRE;
	if (in.image_len > ARENA_SIZE)
		in.image_len = ARENA_SIZE;
	run(&in);
	return 0;
}
