/*
 * netbsd_readiness.c - a /dev/dmoverio session made non-blocking with
 * ioctl(FIONBIO) or fcntl(O_NONBLOCK), waited on with poll(), select() or
 * epoll, as a NetBSD program does it (epoll being Linux's).
 *
 * Usage: netbsd_readiness fionbio|fcntl poll|select|epoll [QUEUE_DEPTH]
 *
 *   1. open /dev/dmoverio, DMIO_SETFUNC "zero", go non-blocking the chosen
 *      way (and check that F_GETFL shows O_NONBLOCK);
 *   2. an idle session is writable, not readable, and read() says EAGAIN;
 *   3. one request: the session becomes readable, the response is read;
 *   4. write requests one at a time until EAGAIN: exactly QUEUE_DEPTH
 *      (default DMIO_NREQS_MAX) are accepted, and the session is then not
 *      writable;
 *   5. go blocking again the same way: one read() returns all QUEUE_DEPTH
 *      responses, and the session is writable again;
 *   6. a blocking read() of the idle session waits until a signal
 *      interrupts it (EINTR), which shows the session really blocks again.
 *
 * Waits for events that must come time out after 5 s, so a missing wake-up
 * fails instead of hanging.  On Linux run it through the libdmoverio.so
 * shim:  dmoverfs exec -- ./netbsd_readiness fionbio poll
 */
#define _POSIX_C_SOURCE 200809L	/* sigaction with -std=c11 */

#include <sys/types.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/uio.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAIT_MS		5000
#define REQ_LEN		4096
#define MAX_DEPTH	1024

enum mech { M_POLL, M_SELECT, M_EPOLL };

static const char *way, *mech_name;
static enum mech mech;
static int fd = -1, epfd = -1;
static unsigned char bufs[MAX_DEPTH + 1][REQ_LEN];
static struct iovec iovs[MAX_DEPTH + 1];
static struct dmio_usrresp resps[MAX_DEPTH];

static int
fail(const char *what)
{
	fprintf(stderr, "netbsd_readiness: %s %s: %s: %s\n", way, mech_name, what, strerror(errno));
	return 1;
}

static int
failx(const char *what)
{
	fprintf(stderr, "netbsd_readiness: %s %s: %s\n", way, mech_name, what);
	return 1;
}

/* Wait up to ms for events (POLLIN/POLLOUT); the ones ready, or -1. */
static int
wait_for(int events, int ms)
{
	int n, ready = 0;

	if (mech == M_POLL) {
		struct pollfd pfd;

		pfd.fd = fd;
		pfd.events = (short)events;
		pfd.revents = 0;
		n = poll(&pfd, 1, ms);
		if (n == -1)
			return -1;
		return pfd.revents & (POLLIN | POLLOUT | POLLERR | POLLHUP | POLLNVAL);
	}
	if (mech == M_SELECT) {
		fd_set r, w;
		struct timeval tv;

		FD_ZERO(&r);
		FD_ZERO(&w);
		if (events & POLLIN)
			FD_SET(fd, &r);
		if (events & POLLOUT)
			FD_SET(fd, &w);
		tv.tv_sec = ms / 1000;
		tv.tv_usec = (ms % 1000) * 1000;
		n = select(fd + 1, &r, &w, NULL, &tv);
		if (n == -1)
			return -1;
		if (FD_ISSET(fd, &r))
			ready |= POLLIN;
		if (FD_ISSET(fd, &w))
			ready |= POLLOUT;
		return ready;
	}
#ifdef __linux__
	{
		struct epoll_event ev, got;

		memset(&ev, 0, sizeof(ev));
		ev.data.fd = fd;
		ev.events = ((events & POLLIN) ? EPOLLIN : 0) | ((events & POLLOUT) ? EPOLLOUT : 0);
		if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) == -1)
			return -1;
		n = epoll_wait(epfd, &got, 1, ms);
		if (n <= 0)
			return n;
		return ((got.events & EPOLLIN) ? POLLIN : 0) | ((got.events & EPOLLOUT) ? POLLOUT : 0) |
		    ((got.events & (EPOLLERR | EPOLLHUP)) ? POLLERR : 0);
	}
#else
	errno = ENOSYS;
	return -1;
#endif
}

/* Non-blocking on or off, the chosen way. */
static int
set_nonblocking(int on)
{
	int flags;

	if (strcmp(way, "fionbio") == 0)
		return ioctl(fd, FIONBIO, &on);
	flags = fcntl(fd, F_GETFL);
	if (flags == -1)
		return -1;
	return fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

static void
make_request(struct dmio_usrreq *req, unsigned i)
{
	memset(bufs[i], 0xee, REQ_LEN);
	iovs[i].iov_base = bufs[i];
	iovs[i].iov_len = REQ_LEN;
	memset(req, 0, sizeof(*req));
	req->req_outbuf.dmbuf_iov = &iovs[i];
	req->req_outbuf.dmbuf_iovcnt = 1;
	req->req_id = i;
}

static void
on_alarm(int sig)
{
	(void)sig;
}

int
main(int argc, char **argv)
{
	struct dmio_setfunc dsf;
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct sigaction sa;
	unsigned depth = DMIO_NREQS_MAX, accepted, i;
	ssize_t n;
	int ev, flags;

	if (argc < 3 || argc > 4 ||
	    (strcmp(argv[1], "fionbio") != 0 && strcmp(argv[1], "fcntl") != 0)) {
		fprintf(stderr, "usage: netbsd_readiness fionbio|fcntl poll|select|epoll [QUEUE_DEPTH]\n");
		return 2;
	}
	way = argv[1];
	mech_name = argv[2];
	if (strcmp(mech_name, "poll") == 0)
		mech = M_POLL;
	else if (strcmp(mech_name, "select") == 0)
		mech = M_SELECT;
	else if (strcmp(mech_name, "epoll") == 0)
		mech = M_EPOLL;
	else {
		fprintf(stderr, "usage: netbsd_readiness fionbio|fcntl poll|select|epoll [QUEUE_DEPTH]\n");
		return 2;
	}
	if (argc == 4)
		depth = (unsigned)strtoul(argv[3], NULL, 0);
	if (depth == 0 || depth > MAX_DEPTH)
		return failx("bad queue depth");

	/* 1. A session, non-blocking. */
	fd = open("/dev/dmoverio", O_RDWR);
	if (fd == -1)
		return fail("open /dev/dmoverio");
	memset(&dsf, 0, sizeof(dsf));
	strcpy(dsf.dsf_name, "zero");
	if (ioctl(fd, DMIO_SETFUNC, &dsf) == -1)
		return fail("DMIO_SETFUNC");
	if (mech == M_EPOLL) {
#ifdef __linux__
		struct epoll_event ev0;

		memset(&ev0, 0, sizeof(ev0));
		ev0.data.fd = fd;
		if ((epfd = epoll_create1(0)) == -1 || epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev0) == -1)
			return fail("epoll");
#endif
	}
	if (set_nonblocking(1) == -1)
		return fail("going non-blocking");
	if ((flags = fcntl(fd, F_GETFL)) == -1)
		return fail("F_GETFL");
	if (!(flags & O_NONBLOCK))
		return failx("F_GETFL does not show O_NONBLOCK");
	printf("%s %s: non-blocking (F_GETFL shows O_NONBLOCK)\n", way, mech_name);

	/* 2. Idle. */
	if ((ev = wait_for(POLLIN | POLLOUT, 0)) != POLLOUT)
		return ev == -1 ? fail("wait") : failx("an idle session is not just writable");
	n = read(fd, &resp, sizeof(resp));
	if (n != -1 || errno != EAGAIN)
		return n == -1 ? fail("read of an idle session (expected EAGAIN)") :
		    failx("read of an idle session returned data");
	printf("%s %s: idle session is writable, not readable; read says EAGAIN\n", way, mech_name);

	/* 3. One request. */
	make_request(&req, MAX_DEPTH);
	if (write(fd, &req, sizeof(req)) != (ssize_t)sizeof(req))
		return fail("write one request");
	if ((ev = wait_for(POLLIN, WAIT_MS)) != POLLIN)
		return ev == -1 ? fail("wait") : failx("the session did not become readable");
	if (read(fd, &resp, sizeof(resp)) != (ssize_t)sizeof(resp))
		return fail("read the response");
	if (resp.resp_id != MAX_DEPTH || resp.resp_error != 0 || bufs[MAX_DEPTH][0] != 0)
		return failx("wrong response");
	printf("%s %s: readable once a request completed\n", way, mech_name);

	/* 4. Fill the queue. */
	for (accepted = 0; accepted <= depth; accepted++) {
		make_request(&req, accepted);
		n = write(fd, &req, sizeof(req));
		if (n == -1)
			break;
		if (n != (ssize_t)sizeof(req))
			return failx("short write");
	}
	if (n != -1 || errno != EAGAIN)
		return n == -1 ? fail("filling the queue (expected EAGAIN)") :
		    failx("more requests accepted than the queue depth");
	if (accepted != depth) {
		fprintf(stderr, "netbsd_readiness: %u requests accepted before EAGAIN, expected %u\n",
		    accepted, depth);
		return 1;
	}
	if ((ev = wait_for(POLLOUT, 0)) & POLLOUT)
		return ev == -1 ? fail("wait") : failx("a full session is writable");
	printf("%s %s: EAGAIN after %u requests; not writable\n", way, mech_name, depth);

	/* 5. Blocking again: one read takes them all. */
	if (set_nonblocking(0) == -1)
		return fail("going blocking");
	if ((flags = fcntl(fd, F_GETFL)) == -1 || (flags & O_NONBLOCK))
		return failx("F_GETFL still shows O_NONBLOCK");
	n = read(fd, resps, depth * sizeof(resps[0]));
	if (n != (ssize_t)(depth * sizeof(resps[0])))
		return n == -1 ? fail("blocking read") : failx("a blocking read came back short");
	for (i = 0; i < depth; i++)
		if (resps[i].resp_error != 0 || resps[i].resp_id >= depth)
			return failx("a bad response");
	if ((ev = wait_for(POLLIN | POLLOUT, WAIT_MS)) != POLLOUT)
		return ev == -1 ? fail("wait") : failx("a drained session is not just writable");
	printf("%s %s: blocking read returned all %u responses; writable again\n", way, mech_name, depth);

	/* 6. A blocking read of an idle session waits, until a signal. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART: the read fails */
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGALRM, &sa, NULL) == -1)
		return fail("sigaction");
	alarm(1);
	n = read(fd, &resp, sizeof(resp));
	alarm(0);
	if (n != -1 || errno != EINTR)
		return n == -1 ? fail("blocking read of an idle session (expected EINTR)") :
		    failx("a blocking read of an idle session returned data");
	printf("%s %s: blocking read of an idle session waited until interrupted (EINTR)\n", way, mech_name);

	if (epfd != -1)
		close(epfd);
	if (close(fd) == -1)
		return fail("close");
	printf("%s %s: ok\n", way, mech_name);
	return 0;
}
