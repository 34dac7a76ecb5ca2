/*
 * swarm.c - many threads of one process blocked on one session.
 *
 * usage: swarm SESSION read|write|poll THREADS PREFILL
 *   SESSION  a func/zero clone file, opened by this process ("fd N")
 *   PREFILL  zero requests written first ("prefilled RET ERRNO"): the
 *            queue depth, so that every thread's write has to wait
 * Then THREADS threads (64 KiB stacks) each call once, on the one
 * descriptor: read(16 bytes), write(one zero request) or
 * poll(POLLIN, no timeout).  Prints "started N" once all exist, then
 * sleeps until killed.  A thread whose call returns prints
 * "returned RET ERRNO" (none should, until the test acts).
 * RLIMIT_NPROC's soft limit is raised to its hard limit first.
 */
#include "common.h"

#include <poll.h>
#include <pthread.h>
#include <sys/resource.h>

#define STACK (64 * 1024)
#define MAXPREFILL 1024

static const char *prog = "swarm";
static int fd;
static const char *op;
static unsigned char output[64];
static struct iovec iov;
static struct dmio_usrreq req;

static void *
call(void *arg)
{
	struct dmio_usrresp resp;
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	ssize_t ret;

	(void)arg;
	if (op[0] == 'r')
		ret = read(fd, &resp, sizeof(resp));
	else if (op[0] == 'w')
		ret = write(fd, &req, sizeof(req));
	else
		ret = poll(&pfd, 1, -1);
	say("returned %zd %s", ret, errno_name(ret < 0 ? errno : 0));
	return NULL;
}

int
main(int argc, char **argv)
{
	static struct dmio_usrreq fill[MAXPREFILL];
	static struct iovec fill_iov[MAXPREFILL];
	struct rlimit lim;
	pthread_attr_t attr;
	pthread_t thread;
	int threads, prefill, i, err;
	ssize_t ret;

	if (argc != 5 || (strcmp(argv[2], "read") != 0 && strcmp(argv[2], "write") != 0 && strcmp(argv[2], "poll") != 0)) {
		fprintf(stderr, "usage: swarm SESSION read|write|poll THREADS PREFILL\n");
		return 2;
	}
	op = argv[2];
	threads = atoi(argv[3]);
	prefill = atoi(argv[4]);
	if (prefill < 0 || prefill > MAXPREFILL) {
		fprintf(stderr, "%s: PREFILL must be 0..%d\n", prog, MAXPREFILL);
		return 2;
	}
	if (getrlimit(RLIMIT_NPROC, &lim) == 0 && lim.rlim_cur != lim.rlim_max) {
		lim.rlim_cur = lim.rlim_max;
		if (setrlimit(RLIMIT_NPROC, &lim) == -1)
			die(prog, "setrlimit RLIMIT_NPROC");
	}
	fd = session_open(prog, argv[1], O_RDWR, NULL);
	say("fd %d", fd);
	zero_request(&req, &iov, output, sizeof(output), 1000);
	if (prefill > 0) {
		for (i = 0; i < prefill; i++)
			zero_request(&fill[i], &fill_iov[i], output, sizeof(output), (uint32_t)i);
		ret = write(fd, fill, sizeof(fill[0]) * (size_t)prefill);
		say("prefilled %zd %s", ret, errno_name(ret < 0 ? errno : 0));
	}

	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, STACK);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	for (i = 0; i < threads; i++) {
		err = pthread_create(&thread, &attr, call, NULL);
		if (err != 0) {
			say("create-failed %d %s", i, errno_name(err));
			return 1;
		}
	}
	say("started %d", threads);
	for (;;)
		pause();
}
