/*
 * netbsd_funcs.c - every data-mover function, selected with
 * ioctl(DMIO_SETFUNC) on /dev/dmoverio, as a NetBSD program does it.
 *
 * For each function this opens /dev/dmoverio, selects the function with
 * DMIO_SETFUNC, submits one request whose output and inputs are
 * scatter/gather lists cut at different places, and checks the result
 * against a plain loop computed here (CRC32C bit by bit).  iscsi-crc32c is
 * also checked on the standard "123456789" vector.
 *
 * Written against NetBSD's interfaces only; on Linux run it through the
 * libdmoverio.so shim:  dmoverfs exec -- ./netbsd_funcs [FUNCTION...]
 * Prints one line per function; exits 0 only when all passed.
 */
#include <sys/types.h>
#include <sys/ioctl.h>
#include <sys/uio.h>

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LEN		(64 * 1024 + 3)	/* bytes per operand */
#define MAX_INPUTS	16
#define PIECES		3		/* scatter/gather pieces per operand */
#define CRC_CHECK	0xE3069283u	/* CRC32C of "123456789" */

static const char *const all_functions[] = {
	"zero", "fill8", "copy",
	"xor2", "xor3", "xor4", "xor5", "xor6", "xor7", "xor8", "xor9",
	"xor10", "xor11", "xor12", "xor13", "xor14", "xor15", "xor16",
	"iscsi-crc32c",
};

static unsigned char out[LEN], expect[LEN], in[MAX_INPUTS][LEN];
static struct iovec out_iov[PIECES], in_iov[MAX_INPUTS][PIECES];
static dmio_buffer inbuf[MAX_INPUTS];
static uint32_t rng = 2463534242u;

static uint32_t
next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return rng;
}

static uint32_t
crc32c(uint32_t crc, const unsigned char *p, size_t len)
{
	size_t i;
	int bit;

	crc = ~crc;
	for (i = 0; i < len; i++) {
		crc ^= p[i];
		for (bit = 0; bit < 8; bit++)
			crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
	}
	return ~crc;
}

/* Cut len bytes at base into PIECES iovecs, at places that depend on salt. */
static void
cut(struct iovec *iov, unsigned char *base, size_t len, unsigned salt)
{
	size_t a = (len / 5) + salt * 97 % 1000;
	size_t b = a + (len / 3) + salt * 31 % 777;

	iov[0].iov_base = base;
	iov[0].iov_len = a;
	iov[1].iov_base = base + a;
	iov[1].iov_len = b - a;
	iov[2].iov_base = base + b;
	iov[2].iov_len = len - b;
}

/* Open a session with name selected; -1 on failure (reported). */
static int
session(const char *name)
{
	struct dmio_setfunc dsf;
	int fd;

	fd = open("/dev/dmoverio", O_RDWR);
	if (fd == -1) {
		fprintf(stderr, "netbsd_funcs: open /dev/dmoverio: %s\n", strerror(errno));
		return -1;
	}
	memset(&dsf, 0, sizeof(dsf));
	strncpy(dsf.dsf_name, name, sizeof(dsf.dsf_name) - 1);
	if (ioctl(fd, DMIO_SETFUNC, &dsf) == -1) {
		fprintf(stderr, "netbsd_funcs: DMIO_SETFUNC %s: %s\n", name, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* Submit req on fd and read its response; 0, or -1 (reported). */
static int
run(int fd, const char *name, struct dmio_usrreq *req, struct dmio_usrresp *resp)
{
	ssize_t n;

	n = write(fd, req, sizeof(*req));
	if (n != (ssize_t)sizeof(*req)) {
		fprintf(stderr, "netbsd_funcs: %s: write: %s\n", name,
		    n == -1 ? strerror(errno) : "short");
		return -1;
	}
	n = read(fd, resp, sizeof(*resp));
	if (n != (ssize_t)sizeof(*resp)) {
		fprintf(stderr, "netbsd_funcs: %s: read: %s\n", name,
		    n == -1 ? strerror(errno) : "short");
		return -1;
	}
	if (resp->resp_id != req->req_id || resp->resp_error != 0) {
		fprintf(stderr, "netbsd_funcs: %s: response id %u error %d\n", name,
		    (unsigned)resp->resp_id, resp->resp_error);
		return -1;
	}
	return 0;
}

static int
one_function(const char *name, uint32_t id)
{
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	unsigned ninputs = 0, i;
	size_t j;
	uint32_t crc, want;
	int fd, ok = 0, is_crc = strcmp(name, "iscsi-crc32c") == 0;

	if (strcmp(name, "copy") == 0 || is_crc)
		ninputs = 1;
	else if (strncmp(name, "xor", 3) == 0)
		ninputs = (unsigned)atoi(name + 3);
	if (ninputs > MAX_INPUTS) {
		fprintf(stderr, "netbsd_funcs: %s: too many inputs\n", name);
		return -1;
	}

	for (j = 0; j < LEN; j++)
		out[j] = (unsigned char)next_random();
	for (i = 0; i < ninputs; i++) {
		for (j = 0; j < LEN; j++)
			in[i][j] = (unsigned char)next_random();
		cut(in_iov[i], in[i], LEN, i + 1);
		inbuf[i].dmbuf_iov = in_iov[i];
		inbuf[i].dmbuf_iovcnt = PIECES;
	}
	cut(out_iov, out, LEN, 0);

	memset(&req, 0, sizeof(req));
	req.req_id = id;
	if (!is_crc) {
		req.req_outbuf.dmbuf_iov = out_iov;
		req.req_outbuf.dmbuf_iovcnt = PIECES;
	}
	if (ninputs > 0)
		req.req_inbuf = inbuf;	/* the immediate shares no storage with it */
	if (strcmp(name, "fill8") == 0)
		req.req_immediate[0] = 0xa5;

	/* The expected output. */
	memset(expect, 0, LEN);
	if (strcmp(name, "fill8") == 0)
		memset(expect, 0xa5, LEN);
	for (i = 0; i < ninputs && !is_crc; i++)
		for (j = 0; j < LEN; j++)
			expect[j] ^= in[i][j];

	if ((fd = session(name)) == -1) {
		printf("%s: FAILED\n", name);
		return -1;
	}
	if (run(fd, name, &req, &resp) == -1)
		goto out;
	if (is_crc) {
		crc = (uint32_t)resp.resp_immediate[0] | (uint32_t)resp.resp_immediate[1] << 8 |
		    (uint32_t)resp.resp_immediate[2] << 16 | (uint32_t)resp.resp_immediate[3] << 24;
		want = crc32c(0, in[0], LEN);
		if (crc != want) {
			fprintf(stderr, "netbsd_funcs: %s: CRC 0x%08x, expected 0x%08x\n",
			    name, (unsigned)crc, (unsigned)want);
			goto out;
		}
		/* The check value, through another request on the session. */
		memcpy(in[0], "123456789", 9);
		in_iov[0][0].iov_base = in[0];
		in_iov[0][0].iov_len = 9;
		inbuf[0].dmbuf_iovcnt = 1;
		req.req_id = id + 1000;
		if (run(fd, name, &req, &resp) == -1)
			goto out;
		crc = (uint32_t)resp.resp_immediate[0] | (uint32_t)resp.resp_immediate[1] << 8 |
		    (uint32_t)resp.resp_immediate[2] << 16 | (uint32_t)resp.resp_immediate[3] << 24;
		if (crc != CRC_CHECK || crc32c(0, (const unsigned char *)"123456789", 9) != CRC_CHECK) {
			fprintf(stderr, "netbsd_funcs: %s: check value 0x%08x\n", name, (unsigned)crc);
			goto out;
		}
	} else if (memcmp(out, expect, LEN) != 0) {
		for (j = 0; out[j] == expect[j]; j++)
			;
		fprintf(stderr, "netbsd_funcs: %s: byte %zu is 0x%02x, expected 0x%02x\n",
		    name, j, out[j], expect[j]);
		goto out;
	}
	ok = 1;
out:
	close(fd);
	printf("%s: %s\n", name, ok ? "ok" : "FAILED");
	return ok ? 0 : -1;
}

int
main(int argc, char **argv)
{
	const char *const *names = all_functions;
	int count = (int)(sizeof(all_functions) / sizeof(all_functions[0]));
	int i, failed = 0;

	if (argc > 1) {
		names = (const char *const *)(argv + 1);
		count = argc - 1;
	}
	for (i = 0; i < count; i++)
		if (one_function(names[i], (uint32_t)i + 1) != 0)
			failed++;
	if (failed) {
		printf("netbsd_funcs: %d of %d functions FAILED\n", failed, count);
		return 1;
	}
	printf("netbsd_funcs: all %d functions passed\n", count);
	return 0;
}
