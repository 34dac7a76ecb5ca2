/*
 * nonblock.c - O_NONBLOCK on a session without the preload shim: set with
 * fcntl(F_SETFL) after a blocking open (what Go's runtime, libuv and tokio
 * do), or given to open() and cleared later with fcntl.
 *
 * usage: nonblock SESSION DEPTH fcntl|open
 *   SESSION  a func/zero clone file; DEPTH the mount's queue depth
 * Prints one line per step, "STEP RET ERRNO MILLISECONDS":
 *   read        read(16) with nothing outstanding          (EAGAIN at once)
 *   write       write(DEPTH + 1 requests) on an empty queue (a short count)
 *   write-full  write(1 request) on the full queue         (EAGAIN at once)
 *   read-ready  read(16 * (DEPTH + 1))                      (the DEPTH ready)
 *   then O_NONBLOCK is cleared with fcntl and
 *   read-blocks read(16): a helper thread waits until this thread sleeps in
 *               FUSE, 300 ms more, then writes request 999; the line ends
 *               "id=ID waited=1" when the read was still blocked by then.
 * Each step runs under a 3 s alarm whose handler does nothing but interrupt,
 * so a step that blocks when it should not ends in EINTR and is reported.
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#define MAXREQ 66
#define BUFLEN 64
#define GUARD_S 3

static const char *prog = "nonblock";
static unsigned char outputs[MAXREQ][BUFLEN];
static struct iovec iovs[MAXREQ];
static struct dmio_usrreq reqs[MAXREQ];
static int fd;
static pid_t main_tid;
static atomic_int main_returned;
static atomic_int helper_waited;

static void
on_alarm(int sig)
{
	(void)sig;
}

static void
step(const char *name, ssize_t ret, int err, int64_t start)
{
	say("%s %zd %s %lld", name, ret, errno_name(ret < 0 ? err : 0), (long long)((now_us() - start) / 1000));
}

/* True once thread *tid* of this process sleeps waiting for a FUSE answer. */
static int
in_fuse(pid_t tid)
{
	char path[64], wchan[64];
	ssize_t n;
	int wfd;

	snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", (int)tid);
	wfd = open(path, O_RDONLY | O_CLOEXEC);
	if (wfd == -1)
		return 0;
	n = read(wfd, wchan, sizeof(wchan) - 1);
	close(wfd);
	if (n <= 0)
		return 0;
	wchan[n] = '\0';
	return strcmp(wchan, "request_wait_answer") == 0;
}

static void *
helper(void *arg)
{
	struct timespec tick = { 0, 10 * 1000 * 1000 }, hold = { 0, 300 * 1000 * 1000 };
	int64_t deadline = now_us() + 2 * 1000 * 1000;
	struct dmio_usrreq *req = arg;

	while (!in_fuse(main_tid) && !atomic_load(&main_returned) && now_us() < deadline)
		nanosleep(&tick, NULL);
	nanosleep(&hold, NULL);
	if (!atomic_load(&main_returned))
		atomic_store(&helper_waited, 1);
	if (write(fd, req, sizeof(*req)) != (ssize_t)sizeof(*req))
		fprintf(stderr, "%s: helper write: %s\n", prog, strerror(errno));
	return NULL;
}

int
main(int argc, char **argv)
{
	struct dmio_usrresp resps[MAXREQ];
	struct sigaction sa;
	pthread_t thread;
	int depth, flags, i, err;
	int64_t start;
	ssize_t ret;

	if (argc != 4 || (strcmp(argv[3], "fcntl") != 0 && strcmp(argv[3], "open") != 0)) {
		fprintf(stderr, "usage: nonblock SESSION DEPTH fcntl|open\n");
		return 2;
	}
	depth = atoi(argv[2]);
	if (depth < 1 || depth + 2 > MAXREQ) {
		fprintf(stderr, "%s: DEPTH must be 1..%d\n", prog, MAXREQ - 2);
		return 2;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGALRM, &sa, NULL) == -1)
		die(prog, "sigaction");
	for (i = 0; i < MAXREQ; i++)
		zero_request(&reqs[i], &iovs[i], outputs[i], BUFLEN, (uint32_t)i);
	reqs[MAXREQ - 1].req_id = 999;

	if (argv[3][0] == 'o') {
		fd = session_open(prog, argv[1], O_RDWR | O_NONBLOCK, "zero");
	} else {
		fd = session_open(prog, argv[1], O_RDWR, "zero");
		flags = fcntl(fd, F_GETFL);
		if (flags == -1 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1)
			die(prog, "fcntl F_SETFL O_NONBLOCK");
	}

	alarm(GUARD_S);
	start = now_us();
	ret = read(fd, resps, sizeof(resps[0]));
	step("read", ret, errno, start);

	alarm(GUARD_S);
	start = now_us();
	ret = write(fd, reqs, sizeof(reqs[0]) * (size_t)(depth + 1));
	step("write", ret, errno, start);

	alarm(GUARD_S);
	start = now_us();
	ret = write(fd, &reqs[depth + 1], sizeof(reqs[0]));
	step("write-full", ret, errno, start);

	alarm(GUARD_S);
	start = now_us();
	ret = read(fd, resps, sizeof(resps[0]) * (size_t)(depth + 1));
	step("read-ready", ret, errno, start);

	flags = fcntl(fd, F_GETFL);
	if (flags == -1 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == -1)
		die(prog, "fcntl F_SETFL ~O_NONBLOCK");
	say("flags-cleared");
	main_tid = gettid();
	err = pthread_create(&thread, NULL, helper, &reqs[MAXREQ - 1]);
	if (err != 0) {
		errno = err;
		die(prog, "pthread_create");
	}
	alarm(GUARD_S);
	start = now_us();
	ret = read(fd, resps, sizeof(resps[0]));
	err = errno;
	atomic_store(&main_returned, 1);
	start = now_us() - start;
	alarm(0);
	pthread_join(thread, NULL);
	say("read-blocks %zd %s %lld id=%ld waited=%d", ret, errno_name(ret < 0 ? err : 0), (long long)(start / 1000),
	    ret == (ssize_t)sizeof(resps[0]) ? (long)resps[0].resp_id : -1L, atomic_load(&helper_waited));
	return 0;
}
