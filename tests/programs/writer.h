/*
 * writer.h - helpers of the programs that show whose memory a request acts
 * on (writer.c, execer.c, image.c).
 *
 * A "job" is one zero or fill8 request over a buffer of its own, with the
 * buffer, its iovec and the request itself in memory that keeps its address
 * across fork(): a request built before fork() names the same addresses in
 * the parent and in the child, and only the bytes there differ.  What a
 * buffer holds is reported as its byte in hex ("5a") when every byte is the
 * same, else as "mixed:FIRST:N" (its first byte, and how many bytes differ
 * from it).
 */
#ifndef DMOVERFS_TEST_WRITER_H
#define DMOVERFS_TEST_WRITER_H

#include "common.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/uio.h>

/* The byte fill8 requests write (immediate[0]). */
#define FILL_BYTE 0x5a
/* What the process that opened a session keeps in its buffers. */
#define OPENER_BYTE 0x50
/* What another process (a forked child, a receiver) keeps at the same address. */
#define OTHER_BYTE 0xc3
/* Where execer.c puts its requests' output, and image.c its own pattern. */
#define EXEC_REGION ((void *)0x3a5c00000000UL)
/* What the holder of execer.c's session keeps in its copy of EXEC_REGION. */
#define HOLDER_BYTE 0x33

struct job {
	unsigned char *buf;
	size_t len;
	struct iovec iov;
	struct dmio_usrreq req;
};

/* The byte a request of *function* leaves in its output. */
static inline int
expected_byte(const char *function)
{
	return strcmp(function, "zero") == 0 ? 0x00 : FILL_BYTE;
}

/* Map *len* bytes filled with *byte* and build a *function* request (zero or fill8) over them. */
static inline void
job_init(const char *prog, struct job *job, size_t len, const char *function, uint32_t id, int byte)
{
	job->buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (job->buf == MAP_FAILED)
		die(prog, "mmap");
	job->len = len;
	memset(job->buf, byte, len);
	zero_request(&job->req, &job->iov, job->buf, len, id);
	if (strcmp(function, "fill8") == 0)
		job->req.req_immediate[0] = FILL_BYTE;
}

/* The session clone file DIR/func/FUNCTION opened with *flags*. */
static inline int
open_function(const char *prog, const char *dir, const char *function, int flags)
{
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/func/%s", dir, function);
	fd = open(path, O_RDWR | flags);
	if (fd == -1)
		die(prog, path);
	return fd;
}

/*
 * Write one request and read one response (which must be its own).  Returns
 * the response's error as a name ("0", "EFAULT"), "write:ERRNO" if the write
 * failed, or "read:ERRNO" / "id:N" if the response could not be read or was
 * another request's.
 */
static inline const char *
round_trip(int fd, const struct dmio_usrreq *req)
{
	static __thread char what[64];
	struct dmio_usrresp resp;
	ssize_t ret;

	ret = write(fd, req, sizeof(*req));
	if (ret != (ssize_t)sizeof(*req)) {
		snprintf(what, sizeof(what), "write:%s", ret < 0 ? errno_name(errno) : "short");
		return what;
	}
	ret = read(fd, &resp, sizeof(resp));
	if (ret != (ssize_t)sizeof(resp)) {
		snprintf(what, sizeof(what), "read:%s", ret < 0 ? errno_name(errno) : "short");
		return what;
	}
	if (resp.resp_id != req->req_id) {
		snprintf(what, sizeof(what), "id:%u", resp.resp_id);
		return what;
	}
	return errno_name(resp.resp_error);
}

/* What *len* bytes at *buf* hold: "5a" if all are 0x5a, else "mixed:FIRST:N". */
static inline const char *
describe(const unsigned char *buf, size_t len)
{
	static __thread char what[64];
	size_t i, differ = 0;

	for (i = 1; i < len; i++)
		differ += buf[i] != buf[0];
	if (differ == 0)
		snprintf(what, sizeof(what), "%02x", buf[0]);
	else
		snprintf(what, sizeof(what), "mixed:%02x:%zu", buf[0], differ);
	return what;
}

#endif /* DMOVERFS_TEST_WRITER_H */
