/*
 * netbsd_hw_bzero.c - the dmoverio(4) manual's example, unmodified.
 *
 * hw_bzero() below is the function printed in NetBSD's dmoverio(4) manual
 * page, transcribed as printed: it opens /dev/dmoverio, selects "zero" with
 * ioctl(DMIO_SETFUNC) and clears a buffer with one request.  Only main()
 * is added around it.  The program builds on NetBSD as it is; on Linux it
 * runs against dmoverfs through the libdmoverio.so preload shim:
 *
 *   cc $(dmoverfs cflags) netbsd_hw_bzero.c -o netbsd_hw_bzero
 *   dmoverfs exec -- ./netbsd_hw_bzero
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

/* -- from dmoverio(4), as printed ------------------------------------------------------ */

int
hw_bzero(void *buf, size_t len)
{
	static uint32_t reqid;

	struct dmio_setfunc dsf;
	struct iovec iov;
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	int fd;

	fd = open("/dev/dmoverio", O_RDWR, 0666);
	if (fd == -1)
		return (-1);

	strcpy(dsf.dsf_name, "zero");

	if (ioctl(fd, DMIO_SETFUNC, &dsf) == -1) {
		close(fd);
		return (-1);
	}

	iov.iov_base = buf;
	iov.iov_len = len;

	req.req_outbuf.dmbuf_iov = &iov;
	req.req_outbuf.dmbuf_iovcnt = 1;
	req.req_id = reqid++;

	if (write(fd, &req, sizeof(req)) != sizeof(req)) {
		close(fd);
		return (-1);
	}

	/* Application can do other work here. */

	if (read(fd, &resp, sizeof(resp)) != sizeof(resp)) {
		close(fd);
		return (-1);
	}

	if (resp.resp_id != req.req_id) {
		close(fd);
		return (-1);
	}

	if (resp.resp_error != 0) {
		close(fd);
		return (-1);
	}

	close(fd);
	return (0);
}

/* -- the main() around it ------------------------------------------------------------- */

#define LEN	(1024 * 1024 + 7)	/* not a round number on purpose */

/* Fill p with bytes that are never zero. */
static void
scribble(unsigned char *p, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (unsigned char)(1 + i % 251);
}

/* 1 if len bytes at p are all zero. */
static int
all_zero(const unsigned char *p, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (p[i] != 0)
			return 0;
	return 1;
}

int
main(void)
{
	unsigned char *buf;
	int round;

	buf = malloc(LEN);
	if (buf == NULL) {
		perror("netbsd_hw_bzero: malloc");
		return 1;
	}
	/* Twice: the second call uses the next request id. */
	for (round = 1; round <= 2; round++) {
		scribble(buf, LEN);
		if (hw_bzero(buf, LEN) == -1) {
			fprintf(stderr, "netbsd_hw_bzero: hw_bzero failed (call %d): %s\n",
			    round, strerror(errno));
			free(buf);
			return 1;
		}
		if (!all_zero(buf, LEN)) {
			fprintf(stderr, "netbsd_hw_bzero: call %d left non-zero bytes\n", round);
			free(buf);
			return 1;
		}
	}
	printf("netbsd_hw_bzero: hw_bzero cleared %d bytes, twice\n", LEN);
	free(buf);
	return 0;
}
