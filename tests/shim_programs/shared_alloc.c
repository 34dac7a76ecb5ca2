/*
 * shared_alloc.c - shared buffers through libdmoverio.so's allocation API
 * (linked against it): a copy between two of them, checked byte by byte;
 * allocations until the server's per-session limit refuses one; and the
 * releases.  Opens "/dev/dmoverio" (the shim redirects it) and selects
 * "copy" with DMIO_SETFUNC.  Prints what happened.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define LEN	((size_t)8 << 20)
#define MANY	100

int
main(void)
{
	struct dmio_setfunc dsf = { .dsf_name = "copy" };
	static void *more[MANY];
	unsigned char *src, *dst;
	struct iovec in_iov, out_iov;
	dmio_buffer in;
	struct dmio_usrreq req = { 0 };
	struct dmio_usrresp resp;
	size_t bad = 0;
	int fd, n, err;

	if ((fd = open("/dev/dmoverio", O_RDWR)) < 0 || ioctl(fd, DMIO_SETFUNC, &dsf) != 0) {
		perror("session");
		return 2;
	}
	src = dmoverfs_shared_alloc(fd, LEN);
	dst = dmoverfs_shared_alloc(fd, LEN);
	if (src == NULL || dst == NULL) {
		perror("dmoverfs_shared_alloc");
		return 2;
	}
	for (size_t i = 0; i < LEN; i++)
		src[i] = (unsigned char)(i * 7 + i / 4096);
	in_iov = (struct iovec){ src, LEN };
	out_iov = (struct iovec){ dst, LEN };
	in = (dmio_buffer){ &in_iov, 1 };
	req.req_outbuf = (dmio_buffer){ &out_iov, 1 };
	req.req_inbuf = &in;
	req.req_id = 1;
	if (write(fd, &req, sizeof(req)) != (ssize_t)sizeof(req) || read(fd, &resp, sizeof(resp)) != (ssize_t)sizeof(resp)) {
		perror("round trip");
		return 2;
	}
	for (size_t i = 0; i < LEN; i++)
		bad += dst[i] != src[i];
	printf("copy error %d, %zu bytes differ\n", resp.resp_error, bad);
	for (n = 0; n < MANY && (more[n] = dmoverfs_shared_alloc(fd, 4096)) != NULL; n++)
		;
	err = errno;
	printf("allocated %d more, then %s\n", n, n < MANY ? strerrorname_np(err) : "no limit");
	while (n > 0)
		if (dmoverfs_shared_free(fd, more[--n], 4096) != 0)
			perror("dmoverfs_shared_free");
	printf("free %d %d\n", dmoverfs_shared_free(fd, src, LEN), dmoverfs_shared_free(fd, dst, LEN));
	errno = 0;
	n = dmoverfs_shared_free(fd, src, LEN);
	printf("free again %d %s\n", n, strerrorname_np(errno));
	return 0;
}
