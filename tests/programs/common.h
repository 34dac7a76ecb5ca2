/*
 * common.h - small helpers shared by the test programs in this directory.
 *
 * Every program reports on stdout, one line per event, in words the tests
 * parse ("result RET ERRNO MS", ...), flushed at once so a test sees each
 * line while the program goes on (or hangs).  Errors that make a program
 * unable to do its job go to stderr with exit status 2.
 */
#ifndef DMOVERFS_TEST_COMMON_H
#define DMOVERFS_TEST_COMMON_H

#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

/* The errno's symbolic name ("EINTR"), or "0" for none. */
static inline const char *
errno_name(int err)
{
	static __thread char buf[16];
	const char *name;

	if (err == 0)
		return "0";
	name = strerrorname_np(err);
	if (name != NULL)
		return name;
	snprintf(buf, sizeof(buf), "E%d", err);
	return buf;
}

static inline void
say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static inline void
die(const char *prog, const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
	exit(2);
}

static inline int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Open a session at *path* with *flags*, selecting *function* unless NULL. */
static inline int
session_open(const char *prog, const char *path, int flags, const char *function)
{
	int fd = open(path, flags | O_CLOEXEC);

	if (fd == -1)
		die(prog, path);
	if (function != NULL && fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, function, strlen(function), 0) == -1)
		die(prog, "fsetxattr " DMOVERFS_XATTR_FUNCTION);
	return fd;
}

/* A zero request for *len* bytes at *buf*; *iov* must outlive the request. */
static inline void
zero_request(struct dmio_usrreq *req, struct iovec *iov, void *buf, size_t len, uint32_t id)
{
	memset(req, 0, sizeof(*req));
	iov->iov_base = buf;
	iov->iov_len = len;
	req->req_outbuf.dmbuf_iov = iov;
	req->req_outbuf.dmbuf_iovcnt = 1;
	req->req_id = id;
}

#endif /* DMOVERFS_TEST_COMMON_H */
