/*
 * ptracer.c - the shim's answer to a server that may not read the client's
 * memory: prctl(PR_SET_PTRACER, server pid), then the write once more.
 *
 * The client makes itself non-dumpable (PR_SET_DUMPABLE 0), so a server
 * without CAP_SYS_PTRACE gets EPERM from process_vm_readv and the write of
 * a request fails with EPERM, as under Yama's ptrace_scope 1.  This program
 * defines prctl() itself, which the shim's call binds to (link with
 * -rdynamic), and records the PR_SET_PTRACER calls.  Then:
 *
 *   ptracer fake   PR_SET_PTRACER is granted here, standing in for Yama:
 *                  the process is made dumpable again, so the retried
 *                  write succeeds;
 *   ptracer real   PR_SET_PTRACER goes to the kernel (EINVAL without Yama;
 *                  with Yama it succeeds, but cannot undo non-dumpable), so
 *                  the retry, if any, fails and the write reports EPERM.
 *
 * Opens "/dev/dmoverio" (the shim redirects it).  Prints what happened.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LEN 8192

static int fake;
static int ptracer_calls;
static unsigned long ptracer_pid;
static int ptracer_errno;

int
prctl(int option, ...)
{
	unsigned long a[4];
	va_list ap;
	long r;
	int i;

	/* As glibc reads them: four more words, whatever was passed. */
	va_start(ap, option);
	for (i = 0; i < 4; i++)
		a[i] = va_arg(ap, unsigned long);
	va_end(ap);
	if (option == PR_SET_PTRACER) {
		ptracer_calls++;
		ptracer_pid = a[0];
		if (fake) {
			ptracer_errno = 0;
			return (int)syscall(SYS_prctl, PR_SET_DUMPABLE, 1UL, 0UL, 0UL, 0UL);
		}
	}
	r = syscall(SYS_prctl, option, a[0], a[1], a[2], a[3]);
	if (option == PR_SET_PTRACER)
		ptracer_errno = r == -1 ? errno : 0;
	return (int)r;
}

int
main(int argc, char **argv)
{
	static unsigned char buf[LEN];
	struct dmio_setfunc dsf;
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct iovec iov;
	ssize_t n;
	int fd, i;

	if (argc != 2 || (strcmp(argv[1], "fake") != 0 && strcmp(argv[1], "real") != 0)) {
		fprintf(stderr, "usage: ptracer fake|real\n");
		return 2;
	}
	fake = strcmp(argv[1], "fake") == 0;

	fd = open("/dev/dmoverio", O_RDWR);
	if (fd == -1) {
		perror("ptracer: open /dev/dmoverio");
		return 1;
	}
	memset(&dsf, 0, sizeof(dsf));
	strcpy(dsf.dsf_name, "zero");
	if (ioctl(fd, DMIO_SETFUNC, &dsf) == -1) {
		perror("ptracer: DMIO_SETFUNC");
		return 1;
	}
	if (prctl(PR_SET_DUMPABLE, 0UL, 0UL, 0UL, 0UL) != 0) {
		perror("ptracer: PR_SET_DUMPABLE");
		return 1;
	}

	memset(buf, 0x5a, sizeof(buf));
	iov.iov_base = buf;
	iov.iov_len = sizeof(buf);
	memset(&req, 0, sizeof(req));
	req.req_outbuf.dmbuf_iov = &iov;
	req.req_outbuf.dmbuf_iovcnt = 1;
	req.req_id = 77;
	errno = 0;
	n = write(fd, &req, sizeof(req));
	printf("write: %s\n", n == (ssize_t)sizeof(req) ? "ok" :
	    n == -1 && errno == EPERM ? "EPERM" : n == -1 ? strerror(errno) : "short");
	printf("PR_SET_PTRACER calls: %d\n", ptracer_calls);
	if (ptracer_calls > 0)
		printf("PR_SET_PTRACER pid: %lu, result: %s\n", ptracer_pid,
		    ptracer_errno == 0 ? "ok" : ptracer_errno == EINVAL ? "EINVAL" : strerror(ptracer_errno));
	if (n == (ssize_t)sizeof(req)) {
		n = read(fd, &resp, sizeof(resp));
		for (i = 0; i < LEN && buf[i] == 0; i++)
			;
		printf("request: %s\n", n == (ssize_t)sizeof(resp) && resp.resp_id == 77 &&
		    resp.resp_error == 0 && i == LEN ? "ok, buffer zeroed" : "FAILED");
	}
	close(fd);
	return 0;
}
