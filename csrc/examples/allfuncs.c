/*
 * allfuncs.c - run every data-mover function and check every byte.
 *
 * For each function (zero, fill8, copy, xor2 ... xor16, iscsi-crc32c) this
 * opens a session, selects the function, and submits batches of
 * DMIO_NREQS_MAX requests with one write() each, reading the responses back
 * DMIO_NREQS_MAX at a time with one read().  The output and every input of a
 * request are scatter/gather lists cut at different places, at odd
 * alignments, and one request per batch is large.  Each result is checked
 * against a plain-loop computation done here, and the bytes around every
 * output region must be left untouched.  iscsi-crc32c is also checked on the
 * standard "123456789" vector and on a CRC chained across two requests.
 *
 * The device is $DMOVERIO_PATH when set, else /dev/dmoverio.  Prints one line
 * per function; exits 0 only when everything passed.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BATCH		DMIO_NREQS_MAX	/* requests per write(), responses per read() */
#define NBATCHES	2		/* batches per function */
#define MAX_INPUTS	16
#define MAX_PIECES	5		/* scatter/gather pieces per operand */
#define OUT_PIECES	3
#define GUARD		16		/* untouched bytes around each region */
#define BIG_LEN		300007		/* slot 0 of each batch */
#define SMALL_MIN	64
#define SMALL_MAX	6000
#define ARENA_SIZE	(GUARD + BIG_LEN + BATCH * (SMALL_MAX + GUARD + 8) + GUARD)
#define CRC_CHECK	0xE3069283u	/* CRC32C of "123456789" */

enum kind { K_ZERO, K_FILL8, K_COPY, K_XOR, K_CRC };

struct func {
	char name[DMIO_MAX_FUNCNAME];
	enum kind kind;
	unsigned ninputs;
};

/* One request of a batch and everything it points at. */
struct slot {
	size_t len;
	size_t out_off;			/* offset of the output in arena[0] */
	unsigned char *out;		/* NULL when the function has no output */
	unsigned char *in[MAX_INPUTS];
	struct iovec out_iov[MAX_PIECES];
	struct iovec in_iov[MAX_INPUTS][MAX_PIECES];
	dmio_buffer inbuf[MAX_INPUTS];
	uint8_t fill;			/* fill8's byte */
	uint32_t seed;			/* iscsi-crc32c's CRC so far */
	bool answered;
	struct dmio_usrresp resp;
};

struct batch {
	struct slot slot[BATCH];
	struct dmio_usrreq req[BATCH];
	struct dmio_usrresp resp[BATCH];
	size_t out_used;		/* bytes of arena[0] laid out */
};

static const char *prog = "allfuncs";
static unsigned char *arena[1 + MAX_INPUTS];	/* [0] outputs, [1 + j] input j */
static struct batch batch;
static uint64_t rng_state = 0x9E3779B97F4A7C15u;

/* xorshift64*: deterministic, good enough to scatter cuts and data. */
static uint64_t
rng_next(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1Du;
}

static size_t
rng_below(size_t n)
{
	return (size_t)(rng_next() % n);
}

/* Reference CRC32C (Castagnoli, reflected 0x82F63B78), one bit at a time. */
static uint32_t
crc32c_ref(uint32_t so_far, const unsigned char *p, size_t n)
{
	uint32_t crc = ~so_far;
	size_t i;
	int bit;

	for (i = 0; i < n; i++) {
		crc ^= p[i];
		for (bit = 0; bit < 8; bit++)
			crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
	}
	return ~crc;
}

static uint32_t
le32(const uint8_t b[4])
{
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static void
put_le32(uint8_t b[4], uint32_t v)
{
	b[0] = (uint8_t)v;
	b[1] = (uint8_t)(v >> 8);
	b[2] = (uint8_t)(v >> 16);
	b[3] = (uint8_t)(v >> 24);
}

/* The byte the output arena holds at off outside every output region. */
static unsigned char
guard_byte(size_t off)
{
	return (unsigned char)(0x5A ^ (off * 131u) ^ (off >> 8));
}

static const char *
device_path(void)
{
	const char *path = getenv("DMOVERIO_PATH");

	return (path != NULL && path[0] != '\0') ? path : "/dev/dmoverio";
}

/*
 * Cut the len bytes at base into up to pieces non-empty segments at random
 * places; returns how many segments were made.
 */
static unsigned
cut_region(unsigned char *base, size_t len, unsigned pieces, struct iovec *iov)
{
	size_t points[MAX_PIECES + 1];
	unsigned n = 0, i, j;

	points[n++] = 0;
	for (i = 1; i < pieces; i++) {
		size_t p = 1 + rng_below(len - 1);	/* in (0, len) */

		/* insert in order, dropping duplicates */
		for (j = 0; j < n && points[j] < p; j++)
			continue;
		if (j < n && points[j] == p)
			continue;
		memmove(&points[j + 1], &points[j], (n - j) * sizeof(points[0]));
		points[j] = p;
		n++;
	}
	points[n] = len;
	for (i = 0; i < n; i++) {
		iov[i].iov_base = base + points[i];
		iov[i].iov_len = points[i + 1] - points[i];
	}
	return n;
}

static int
open_session(const char *fname)
{
	int fd = open(device_path(), O_RDWR | O_CLOEXEC);

	if (fd == -1) {
		fprintf(stderr, "%s: open %s: %s\n", prog, device_path(), strerror(errno));
		return -1;
	}
	if (fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, fname, strlen(fname), 0) == -1) {
		fprintf(stderr, "%s: select function %s (fsetxattr %s): %s\n",
		    prog, fname, DMOVERFS_XATTR_FUNCTION, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* Write all requests, looping over short writes. */
static bool
write_requests(int fd, const struct dmio_usrreq *reqs, size_t nreq, const char *fname)
{
	const char *p = (const char *)reqs;
	size_t left = nreq * sizeof(*reqs);

	while (left > 0) {
		ssize_t n = write(fd, p, left);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "%s: %s: write %zu bytes of requests: %s\n",
			    prog, fname, left, strerror(errno));
			return false;
		}
		if (n == 0 || (size_t)n % sizeof(*reqs) != 0) {
			fprintf(stderr, "%s: %s: write of %zu bytes returned %zd, "
			    "not a positive multiple of %zu\n", prog, fname, left, n, sizeof(*reqs));
			return false;
		}
		p += n;
		left -= (size_t)n;
	}
	return true;
}

/* Read exactly nresp responses. */
static bool
read_responses(int fd, struct dmio_usrresp *resps, size_t nresp, const char *fname)
{
	char *p = (char *)resps;
	size_t left = nresp * sizeof(*resps);

	while (left > 0) {
		ssize_t n = read(fd, p, left);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "%s: %s: read %zu bytes of responses: %s\n",
			    prog, fname, left, strerror(errno));
			return false;
		}
		if (n == 0 || (size_t)n % sizeof(*resps) != 0) {
			fprintf(stderr, "%s: %s: read of %zu bytes returned %zd, "
			    "not a positive multiple of %zu\n", prog, fname, left, n, sizeof(*resps));
			return false;
		}
		p += n;
		left -= (size_t)n;
	}
	return true;
}

static uint32_t
make_id(unsigned fi, unsigned b, unsigned s)
{
	return (uint32_t)(fi + 1) << 16 | (uint32_t)b << 8 | (uint32_t)s;
}

static void
fill_random(unsigned char *p, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		p[i] = (unsigned char)(rng_next() >> 56);
}

/* Lay out, fill and describe the requests of batch number b of function f. */
static void
prepare_batch(const struct func *f, unsigned fi, unsigned b)
{
	size_t in_pos[MAX_INPUTS];
	size_t out_pos = GUARD;
	unsigned s, j;

	for (j = 0; j < f->ninputs; j++)
		in_pos[j] = GUARD + 1 + j;	/* inputs start at other alignments than the output */

	for (s = 0; s < BATCH; s++) {
		struct slot *sl = &batch.slot[s];
		struct dmio_usrreq *req = &batch.req[s];

		memset(sl, 0, sizeof(*sl));
		memset(req, 0, sizeof(*req));
		sl->len = (s == 0) ? BIG_LEN - 977 * b : SMALL_MIN + rng_below(SMALL_MAX - SMALL_MIN + 1);

		if (f->kind != K_CRC) {
			out_pos += s % 8;
			sl->out_off = out_pos;
			sl->out = arena[0] + out_pos;
			out_pos += sl->len + GUARD;
			req->req_outbuf.dmbuf_iov = sl->out_iov;
			req->req_outbuf.dmbuf_iovcnt = cut_region(sl->out, sl->len, OUT_PIECES, sl->out_iov);
		}
		for (j = 0; j < f->ninputs; j++) {
			unsigned pieces = 1 + (j + s + b) % MAX_PIECES;

			in_pos[j] += (s * 3 + j) % 8;
			sl->in[j] = arena[1 + j] + in_pos[j];
			in_pos[j] += sl->len + GUARD;
			fill_random(sl->in[j], sl->len);
			sl->inbuf[j].dmbuf_iov = sl->in_iov[j];
			sl->inbuf[j].dmbuf_iovcnt = cut_region(sl->in[j], sl->len, pieces, sl->in_iov[j]);
		}
		if (f->ninputs > 0)
			req->req_inbuf = sl->inbuf;

		if (f->kind == K_FILL8) {
			sl->fill = (uint8_t)(s * 37 + b * 11 + 1);
			req->req_immediate[0] = sl->fill;
		} else if (f->kind == K_CRC) {
			sl->seed = (s % 4 == 0) ? 0 : (uint32_t)rng_next();
			put_le32(req->req_immediate, sl->seed);
		}
		req->req_id = make_id(fi, b, s);
	}

	batch.out_used = out_pos;
	if (f->kind != K_CRC) {
		size_t i;

		for (i = 0; i < out_pos; i++)
			arena[0][i] = guard_byte(i);
	}
}

/* Match the responses read back to their requests by id. */
static bool
match_responses(const struct func *f, unsigned fi, unsigned b)
{
	unsigned i;

	for (i = 0; i < BATCH; i++) {
		const struct dmio_usrresp *r = &batch.resp[i];
		unsigned s = r->resp_id & 0xff;

		if (s >= BATCH || r->resp_id != make_id(fi, b, s)) {
			fprintf(stderr, "%s: %s: response %u has id 0x%x, not one of this batch's\n",
			    prog, f->name, i, (unsigned)r->resp_id);
			return false;
		}
		if (batch.slot[s].answered) {
			fprintf(stderr, "%s: %s: two responses for id 0x%x\n",
			    prog, f->name, (unsigned)r->resp_id);
			return false;
		}
		batch.slot[s].answered = true;
		batch.slot[s].resp = *r;
	}
	return true;
}

/* The reference value of byte k of slot sl's output. */
static unsigned char
expected_byte(const struct func *f, const struct slot *sl, size_t k)
{
	unsigned char x = 0;
	unsigned j;

	switch (f->kind) {
	case K_ZERO:
		return 0;
	case K_FILL8:
		return sl->fill;
	case K_COPY:
		return sl->in[0][k];
	case K_XOR:
		for (j = 0; j < f->ninputs; j++)
			x ^= sl->in[j][k];
		return x;
	case K_CRC:
		break;
	}
	return 0;
}

/* Check one request's result; prints and returns false on the first difference. */
static bool
check_slot(const struct func *f, unsigned s)
{
	const struct slot *sl = &batch.slot[s];
	size_t k;

	if (sl->resp.resp_error != 0) {
		fprintf(stderr, "%s: %s: request id 0x%x (%zu bytes) failed: %s\n", prog, f->name,
		    (unsigned)sl->resp.resp_id, sl->len, strerror(sl->resp.resp_error));
		return false;
	}
	if (f->kind == K_CRC) {
		uint32_t want = crc32c_ref(sl->seed, sl->in[0], sl->len);
		uint32_t got = le32(sl->resp.resp_immediate);

		if (got != want) {
			fprintf(stderr, "%s: %s: request id 0x%x (%zu bytes, seed 0x%08x): "
			    "CRC 0x%08x, expected 0x%08x\n", prog, f->name,
			    (unsigned)sl->resp.resp_id, sl->len, (unsigned)sl->seed,
			    (unsigned)got, (unsigned)want);
			return false;
		}
		return true;
	}
	for (k = 0; k < sl->len; k++) {
		unsigned char want = expected_byte(f, sl, k);

		if (sl->out[k] != want) {
			fprintf(stderr, "%s: %s: request id 0x%x (%zu bytes): output byte %zu "
			    "is 0x%02x, expected 0x%02x\n", prog, f->name,
			    (unsigned)sl->resp.resp_id, sl->len, k, sl->out[k], want);
			return false;
		}
	}
	return true;
}

/* The bytes of the output arena between and around the output regions are untouched. */
static bool
check_guards(const struct func *f)
{
	size_t pos = 0, end;
	unsigned s;

	for (s = 0; s <= BATCH; s++) {
		end = (s < BATCH) ? batch.slot[s].out_off : batch.out_used;
		for (; pos < end; pos++) {
			if (arena[0][pos] != guard_byte(pos)) {
				fprintf(stderr, "%s: %s: byte %zu of the output arena, outside "
				    "every output region, was changed\n", prog, f->name, pos);
				return false;
			}
		}
		if (s < BATCH)
			pos = end + batch.slot[s].len;
	}
	return true;
}

/* Run all batches of function f; returns the bytes moved, or -1 on failure. */
static long long
run_function(const struct func *f, unsigned fi)
{
	long long bytes = 0;
	unsigned b, s;
	int fd;

	fd = open_session(f->name);
	if (fd == -1)
		return -1;
	for (b = 0; b < NBATCHES; b++) {
		prepare_batch(f, fi, b);
		if (!write_requests(fd, batch.req, BATCH, f->name) ||
		    !read_responses(fd, batch.resp, BATCH, f->name) ||
		    !match_responses(f, fi, b))
			goto fail;
		for (s = 0; s < BATCH; s++) {
			if (!check_slot(f, s))
				goto fail;
			bytes += (long long)batch.slot[s].len;
		}
		if (f->kind != K_CRC && !check_guards(f))
			goto fail;
	}
	if (close(fd) == -1) {
		fprintf(stderr, "%s: %s: close: %s\n", prog, f->name, strerror(errno));
		return -1;
	}
	return bytes;
fail:
	close(fd);
	return -1;
}

/* One iscsi-crc32c request on fd; returns true with the CRC in *crc. */
static bool
crc_request(int fd, uint32_t id, uint32_t seed, struct iovec *iov, unsigned iovcnt, uint32_t *crc)
{
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	dmio_buffer in;

	memset(&req, 0, sizeof(req));
	in.dmbuf_iov = iov;
	in.dmbuf_iovcnt = iovcnt;
	req.req_inbuf = &in;
	put_le32(req.req_immediate, seed);
	req.req_id = id;
	if (!write_requests(fd, &req, 1, "iscsi-crc32c") ||
	    !read_responses(fd, &resp, 1, "iscsi-crc32c"))
		return false;
	if (resp.resp_id != id) {
		fprintf(stderr, "%s: iscsi-crc32c: response id 0x%x, expected 0x%x\n",
		    prog, (unsigned)resp.resp_id, (unsigned)id);
		return false;
	}
	if (resp.resp_error != 0) {
		fprintf(stderr, "%s: iscsi-crc32c: request id 0x%x failed: %s\n",
		    prog, (unsigned)id, strerror(resp.resp_error));
		return false;
	}
	*crc = le32(resp.resp_immediate);
	return true;
}

/* "123456789" in three pieces, and the same split over two chained requests. */
static bool
crc_known_answers(void)
{
	static char digits[] = "123456789";
	struct iovec iov[3];
	uint32_t whole, first, chained;
	bool ok = true;
	int fd;

	if (crc32c_ref(0, (const unsigned char *)digits, 9) != CRC_CHECK) {
		fprintf(stderr, "%s: the reference CRC32C itself is wrong\n", prog);
		return false;
	}
	fd = open_session("iscsi-crc32c");
	if (fd == -1)
		return false;

	iov[0] = (struct iovec){ .iov_base = digits, .iov_len = 3 };
	iov[1] = (struct iovec){ .iov_base = digits + 3, .iov_len = 1 };
	iov[2] = (struct iovec){ .iov_base = digits + 4, .iov_len = 5 };
	if (!crc_request(fd, 0xC0DE0001u, 0, iov, 3, &whole)) {
		ok = false;
	} else if (whole != CRC_CHECK) {
		fprintf(stderr, "%s: iscsi-crc32c of \"123456789\" is 0x%08x, expected 0x%08x\n",
		    prog, (unsigned)whole, CRC_CHECK);
		ok = false;
	} else {
		printf("iscsi-crc32c check value: ok (0x%08x)\n", (unsigned)whole);
	}

	/* "1234" with seed 0, then "56789" seeded with that CRC. */
	iov[0] = (struct iovec){ .iov_base = digits, .iov_len = 4 };
	iov[1] = (struct iovec){ .iov_base = digits + 4, .iov_len = 5 };
	if (!crc_request(fd, 0xC0DE0002u, 0, &iov[0], 1, &first) ||
	    !crc_request(fd, 0xC0DE0003u, first, &iov[1], 1, &chained)) {
		ok = false;
	} else if (chained != CRC_CHECK) {
		fprintf(stderr, "%s: iscsi-crc32c chained over two requests is 0x%08x "
		    "(first half 0x%08x), expected 0x%08x\n",
		    prog, (unsigned)chained, (unsigned)first, CRC_CHECK);
		ok = false;
	} else {
		printf("iscsi-crc32c chained: ok (0x%08x)\n", (unsigned)chained);
	}

	if (close(fd) == -1) {
		fprintf(stderr, "%s: iscsi-crc32c: close: %s\n", prog, strerror(errno));
		ok = false;
	}
	return ok;
}

/* zero, fill8, copy, xor2 ... xor16, iscsi-crc32c. */
static unsigned
make_table(struct func *t)
{
	unsigned n = 0, k;

	t[n++] = (struct func){ .name = "zero", .kind = K_ZERO, .ninputs = 0 };
	t[n++] = (struct func){ .name = "fill8", .kind = K_FILL8, .ninputs = 0 };
	t[n++] = (struct func){ .name = "copy", .kind = K_COPY, .ninputs = 1 };
	for (k = 2; k <= MAX_INPUTS; k++) {
		t[n] = (struct func){ .kind = K_XOR, .ninputs = k };
		snprintf(t[n].name, sizeof(t[n].name), "xor%u", k);
		n++;
	}
	t[n++] = (struct func){ .name = "iscsi-crc32c", .kind = K_CRC, .ninputs = 1 };
	return n;
}

static bool
alloc_arenas(void)
{
	unsigned i;

	for (i = 0; i < 1 + MAX_INPUTS; i++) {
		void *p;
		int err = posix_memalign(&p, 64, ARENA_SIZE);

		if (err != 0) {
			fprintf(stderr, "%s: posix_memalign %d bytes: %s\n", prog, ARENA_SIZE, strerror(err));
			return false;
		}
		arena[i] = p;
		memset(arena[i], 0, ARENA_SIZE);
	}
	return true;
}

static void
free_arenas(void)
{
	unsigned i;

	for (i = 0; i < 1 + MAX_INPUTS; i++)
		free(arena[i]);
}

int
main(void)
{
	struct func table[3 + MAX_INPUTS];
	unsigned n, i, failed = 0;

	if (!alloc_arenas())
		return 1;
	n = make_table(table);
	for (i = 0; i < n; i++) {
		long long bytes = run_function(&table[i], i);

		if (bytes < 0) {
			printf("%s: FAILED\n", table[i].name);
			failed++;
		} else {
			printf("%s: ok (%u requests, %lld bytes)\n",
			    table[i].name, NBATCHES * BATCH, bytes);
		}
		fflush(stdout);
	}
	if (!crc_known_answers())
		failed++;
	free_arenas();

	if (failed > 0) {
		printf("allfuncs: %u check(s) FAILED\n", failed);
		return 1;
	}
	printf("allfuncs: all %u functions passed\n", n);
	return 0;
}
