/*
 * hw_bzero.c - clear a buffer with the data mover instead of memset().
 *
 * The dmoverio(4) manual shows a function hw_bzero() that hands the work of
 * zeroing memory to /dev/dmoverio.  This is the same idea on dmoverfs.  The
 * one difference: the function is selected with fsetxattr() on the session,
 * because a FUSE file has no ioctl().  (With the libdmoverio.so preload shim,
 * ioctl(fd, DMIO_SETFUNC, &dsf) works too.)
 *
 * The device is $DMOVERIO_PATH when set, else /dev/dmoverio.
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -Icsrc/include -o hw_bzero hw_bzero.c
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BUF_LEN (256 * 1024 + 13)	/* not a round number on purpose */

/* Where the device is. */
static const char *
device_path(void)
{
	const char *path = getenv("DMOVERIO_PATH");

	return (path != NULL && path[0] != '\0') ? path : "/dev/dmoverio";
}

/* close() that leaves errno as the caller's failure set it. */
static void
close_keep_errno(int fd)
{
	int saved = errno;

	(void)close(fd);
	errno = saved;
}

/*
 * Zero len bytes at buf through the data mover.  Returns 0, or -1 with errno
 * set; *what names the step that failed.
 */
static int
hw_bzero_step(void *buf, size_t len, const char **what)
{
	static uint32_t next_id = 1;
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct iovec iov;
	ssize_t n;
	int fd;

	*what = "open";
	fd = open(device_path(), O_RDWR | O_CLOEXEC);
	if (fd == -1)
		return -1;

	*what = "select function \"zero\" (fsetxattr " DMOVERFS_XATTR_FUNCTION ")";
	if (fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, "zero", strlen("zero"), 0) == -1) {
		close_keep_errno(fd);
		return -1;
	}

	iov.iov_base = buf;
	iov.iov_len = len;
	memset(&req, 0, sizeof(req));
	req.req_outbuf.dmbuf_iov = &iov;
	req.req_outbuf.dmbuf_iovcnt = 1;
	req.req_id = next_id++;

	*what = "write request";
	n = write(fd, &req, sizeof(req));
	if (n != (ssize_t)sizeof(req)) {
		if (n >= 0)
			errno = EIO;	/* a short write of one request */
		close_keep_errno(fd);
		return -1;
	}

	/* The caller could do other work here while the request runs. */

	*what = "read response";
	n = read(fd, &resp, sizeof(resp));
	if (n != (ssize_t)sizeof(resp)) {
		if (n >= 0)
			errno = EIO;
		close_keep_errno(fd);
		return -1;
	}

	*what = "check response id";
	if (resp.resp_id != req.req_id) {
		close(fd);
		errno = EPROTO;
		return -1;
	}

	*what = "request";
	if (resp.resp_error != 0) {
		close(fd);
		errno = resp.resp_error;
		return -1;
	}

	*what = "close";
	return close(fd);
}

/* The man page's interface: 0 on success, -1 with errno set on failure. */
int
hw_bzero(void *buf, size_t len)
{
	const char *what;

	return hw_bzero_step(buf, len, &what);
}

/* Index of the first non-zero byte, or len when all are zero. */
static size_t
first_nonzero(const unsigned char *p, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (p[i] != 0)
			break;
	return i;
}

int
main(void)
{
	unsigned char *buf;
	const char *what;
	size_t bad;
	size_t i;

	buf = malloc(BUF_LEN);
	if (buf == NULL) {
		fprintf(stderr, "hw_bzero: malloc %d bytes: %s\n", BUF_LEN, strerror(errno));
		return 1;
	}
	for (i = 0; i < BUF_LEN; i++)
		buf[i] = (unsigned char)(1 + i % 255);	/* never 0 */

	if (hw_bzero_step(buf, BUF_LEN, &what) == -1) {
		fprintf(stderr, "hw_bzero: %s on %s: %s\n", what, device_path(), strerror(errno));
		free(buf);
		return 1;
	}

	bad = first_nonzero(buf, BUF_LEN);
	if (bad != BUF_LEN) {
		fprintf(stderr, "hw_bzero: byte %zu is 0x%02x after the request, not 0\n",
		    bad, buf[bad]);
		free(buf);
		return 1;
	}

	/* The public wrapper, on a small buffer. */
	memset(buf, 0xff, 100);
	if (hw_bzero(buf, 100) == -1) {
		fprintf(stderr, "hw_bzero: second call on %s: %s\n", device_path(), strerror(errno));
		free(buf);
		return 1;
	}
	bad = first_nonzero(buf, 100);
	if (bad != 100) {
		fprintf(stderr, "hw_bzero: second call left byte %zu as 0x%02x\n", bad, buf[bad]);
		free(buf);
		return 1;
	}

	printf("hw_bzero: zeroed %d bytes through %s\n", BUF_LEN, device_path());
	free(buf);
	return 0;
}
