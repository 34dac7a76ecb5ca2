/*
 * prober.c - an ordinary client that times what it does on a mount, to show
 * whether it is served while someone else misbehaves.
 *
 * usage: prober MOUNTPOINT ROUNDS
 * Each round opens a new session through the clone file, selects "copy"
 * with fsetxattr, copies 4 KiB and then 1 MiB (one write, one read each;
 * the output is checked against the input), closes it, then reads the
 * whole `stats` file (JSON: it must begin with '{').  Every step prints "STEP ROUND MICROSECONDS" as soon
 * as it is done (open, setxattr, copy4k, copy1m, stats); a step that fails
 * prints "fail STEP ROUND ERRNO" and the program exits 1.  "done" at the end.
 */
#include "common.h"

static const char *prog = "prober";

static void
fail(const char *step, int round, int err)
{
	say("fail %s %d %s", step, round, errno_name(err));
	exit(1);
}

/* One copy of *size* bytes through *fd*; 0 or an errno. */
static int
copy(int fd, size_t size, uint32_t id)
{
	unsigned char *src = malloc(size), *dst = malloc(size);
	struct iovec src_iov, dst_iov;
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	dmio_buffer inbuf;
	int err = 0;
	size_t i;

	if (src == NULL || dst == NULL)
		die(prog, "malloc");
	for (i = 0; i < size; i++)
		src[i] = (unsigned char)(i * 7 + id);
	memset(dst, 0, size);
	src_iov.iov_base = src;
	src_iov.iov_len = size;
	dst_iov.iov_base = dst;
	dst_iov.iov_len = size;
	inbuf.dmbuf_iov = &src_iov;
	inbuf.dmbuf_iovcnt = 1;
	memset(&req, 0, sizeof(req));
	req.req_outbuf.dmbuf_iov = &dst_iov;
	req.req_outbuf.dmbuf_iovcnt = 1;
	req.req_inbuf = &inbuf;
	req.req_id = id;
	if (write(fd, &req, sizeof(req)) != (ssize_t)sizeof(req))
		err = errno ? errno : EIO;
	else if (read(fd, &resp, sizeof(resp)) != (ssize_t)sizeof(resp))
		err = errno ? errno : EIO;
	else if (resp.resp_id != id)
		err = EBADMSG;
	else if (resp.resp_error != 0)
		err = resp.resp_error;
	else if (memcmp(src, dst, size) != 0)
		err = EILSEQ;
	free(src);
	free(dst);
	return err;
}

int
main(int argc, char **argv)
{
	char path[4096], buf[65536];
	int rounds, round, fd, err;
	int64_t start;
	ssize_t n;

	if (argc != 3) {
		fprintf(stderr, "usage: prober MOUNTPOINT ROUNDS\n");
		return 2;
	}
	rounds = atoi(argv[2]);
	for (round = 0; round < rounds; round++) {
		snprintf(path, sizeof(path), "%s/dmoverio", argv[1]);
		start = now_us();
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd == -1)
			fail("open", round, errno);
		say("open %d %lld", round, (long long)(now_us() - start));

		start = now_us();
		if (fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, "copy", 4, 0) == -1)
			fail("setxattr", round, errno);
		say("setxattr %d %lld", round, (long long)(now_us() - start));

		start = now_us();
		errno = 0;
		err = copy(fd, 4096, 1);
		if (err != 0)
			fail("copy4k", round, err);
		say("copy4k %d %lld", round, (long long)(now_us() - start));

		start = now_us();
		errno = 0;
		err = copy(fd, 1 << 20, 2);
		if (err != 0)
			fail("copy1m", round, err);
		say("copy1m %d %lld", round, (long long)(now_us() - start));
		close(fd);

		snprintf(path, sizeof(path), "%s/stats", argv[1]);
		start = now_us();
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd == -1)
			fail("stats", round, errno);
		n = read(fd, buf, sizeof(buf));
		if (n > 0 && buf[0] != '{')
			fail("stats", round, EBADMSG);
		while (n > 0)
			n = read(fd, buf, sizeof(buf));
		if (n < 0)
			fail("stats", round, errno);
		close(fd);
		say("stats %d %lld", round, (long long)(now_us() - start));
	}
	say("done");
	return 0;
}
