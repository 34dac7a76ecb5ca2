/*
 * readiness.c - wait on a data-mover session with poll(), select() or epoll.
 *
 * A session is readable when at least one response is waiting to be read,
 * and writable while fewer than queue-depth requests are outstanding
 * (written and not yet read back).  For each mechanism this program
 *
 *   1. checks that an idle session is writable and not readable, and that a
 *      non-blocking read of it fails with EAGAIN;
 *   2. submits one (large) request and waits for the session to become
 *      readable, then reads the response;
 *   3. fills the queue with non-blocking writes until one fails with EAGAIN,
 *      checks that exactly the queue depth was accepted and that the session
 *      is then not writable;
 *   4. drains the responses as they become readable and checks that the
 *      session is writable again and no longer readable.
 *
 * Every wait has a timeout (5 s) so a missing wake-up fails instead of
 * hanging.  Usage: readiness poll|select|epoll|all [QUEUE_DEPTH]
 * The device is $DMOVERIO_PATH when set, else /dev/dmoverio.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#define WAIT_MS		5000		/* longest wait for an event that must come */
#define QUIET_MS	50		/* a short wait for an event that must not come */
#define BIG_LEN		(32u << 20)	/* the request of step 2 */
#define SMALL_LEN	64		/* each request of step 3 */
#define WRITE_BATCH	5		/* requests per non-blocking write in step 3 */
#define MAX_DEPTH	4096
#define FILL_ID		1000u

enum mech { M_POLL, M_SELECT, M_EPOLL };

static const char *const mech_names[] = { "poll", "select", "epoll" };

/* A session and the means of waiting on it. */
struct waiter {
	enum mech mech;
	const char *name;
	int fd;
	int epfd;		/* epoll instance, M_EPOLL only */
};

static const char *prog = "readiness";

static const char *
device_path(void)
{
	const char *path = getenv("DMOVERIO_PATH");

	return (path != NULL && path[0] != '\0') ? path : "/dev/dmoverio";
}

static void
fail_errno(const struct waiter *w, const char *what)
{
	fprintf(stderr, "%s: %s: %s: %s\n", prog, w->name, what, strerror(errno));
}

static const char *
events_name(int ev)
{
	switch (ev & (POLLIN | POLLOUT)) {
	case POLLIN | POLLOUT:
		return "readable and writable";
	case POLLIN:
		return "readable only";
	case POLLOUT:
		return "writable only";
	default:
		return "neither readable nor writable";
	}
}

static int
wait_poll(const struct waiter *w, int events, int timeout_ms)
{
	struct pollfd pfd = { .fd = w->fd, .events = (short)events };
	int n;

	do
		n = poll(&pfd, 1, timeout_ms);
	while (n == -1 && errno == EINTR);
	if (n == -1) {
		fail_errno(w, "poll");
		return -1;
	}
	if (pfd.revents & (POLLERR | POLLHUP | POLLNVAL)) {
		fprintf(stderr, "%s: %s: poll reported revents 0x%x\n", prog, w->name, pfd.revents);
		return -1;
	}
	return pfd.revents & (POLLIN | POLLOUT);
}

static int
wait_select(const struct waiter *w, int events, int timeout_ms)
{
	fd_set rfds, wfds;
	struct timeval tv;
	int n, ready = 0;

	if (w->fd >= FD_SETSIZE) {
		fprintf(stderr, "%s: select: descriptor %d is beyond FD_SETSIZE\n", prog, w->fd);
		return -1;
	}
	do {
		FD_ZERO(&rfds);
		FD_ZERO(&wfds);
		if (events & POLLIN)
			FD_SET(w->fd, &rfds);
		if (events & POLLOUT)
			FD_SET(w->fd, &wfds);
		tv.tv_sec = timeout_ms / 1000;
		tv.tv_usec = (timeout_ms % 1000) * 1000;
		n = select(w->fd + 1, &rfds, &wfds, NULL, &tv);
	} while (n == -1 && errno == EINTR);
	if (n == -1) {
		fail_errno(w, "select");
		return -1;
	}
	if (FD_ISSET(w->fd, &rfds))
		ready |= POLLIN;
	if (FD_ISSET(w->fd, &wfds))
		ready |= POLLOUT;
	return ready;
}

static int
wait_epoll(const struct waiter *w, int events, int timeout_ms)
{
	struct epoll_event ev = { .events = 0, .data.fd = w->fd };
	struct epoll_event got;
	int n, ready = 0;

	if (events & POLLIN)
		ev.events |= EPOLLIN;
	if (events & POLLOUT)
		ev.events |= EPOLLOUT;
	if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, w->fd, &ev) == -1) {
		fail_errno(w, "epoll_ctl(EPOLL_CTL_MOD)");
		return -1;
	}
	do
		n = epoll_wait(w->epfd, &got, 1, timeout_ms);
	while (n == -1 && errno == EINTR);
	if (n == -1) {
		fail_errno(w, "epoll_wait");
		return -1;
	}
	if (n == 0)
		return 0;
	if (got.events & (EPOLLERR | EPOLLHUP)) {
		fprintf(stderr, "%s: epoll: epoll_wait reported events 0x%x\n", prog, (unsigned)got.events);
		return -1;
	}
	if (got.events & EPOLLIN)
		ready |= POLLIN;
	if (got.events & EPOLLOUT)
		ready |= POLLOUT;
	return ready;
}

/* Wait up to timeout_ms for events (POLLIN, POLLOUT); the ones ready, or -1. */
static int
wait_events(const struct waiter *w, int events, int timeout_ms)
{
	switch (w->mech) {
	case M_POLL:
		return wait_poll(w, events, timeout_ms);
	case M_SELECT:
		return wait_select(w, events, timeout_ms);
	case M_EPOLL:
		return wait_epoll(w, events, timeout_ms);
	}
	return -1;
}

/* Wait for events and require exactly want among them. */
static bool
expect(const struct waiter *w, int events, int timeout_ms, int want, const char *when)
{
	int got = wait_events(w, events, timeout_ms);

	if (got == -1)
		return false;
	if (got != want) {
		fprintf(stderr, "%s: %s: %s: the session is %s, expected %s\n",
		    prog, w->name, when, events_name(got), events_name(want));
		return false;
	}
	return true;
}

/* Open a non-blocking "zero" session, and an epoll instance if needed. */
static bool
open_waiter(struct waiter *w, enum mech m)
{
	struct epoll_event ev = { .events = 0 };

	w->mech = m;
	w->name = mech_names[m];
	w->epfd = -1;
	w->fd = open(device_path(), O_RDWR | O_CLOEXEC);
	if (w->fd == -1) {
		fprintf(stderr, "%s: %s: open %s: %s\n", prog, w->name, device_path(), strerror(errno));
		return false;
	}
	if (fsetxattr(w->fd, DMOVERFS_XATTR_FUNCTION, "zero", 4, 0) == -1) {
		fail_errno(w, "select function zero (fsetxattr " DMOVERFS_XATTR_FUNCTION ")");
		return false;
	}
	if (fsetxattr(w->fd, DMOVERFS_XATTR_NONBLOCK, "1", 1, 0) == -1) {
		fail_errno(w, "set non-blocking (fsetxattr " DMOVERFS_XATTR_NONBLOCK ")");
		return false;
	}
	if (m == M_EPOLL) {
		w->epfd = epoll_create1(EPOLL_CLOEXEC);
		if (w->epfd == -1) {
			fail_errno(w, "epoll_create1");
			return false;
		}
		ev.data.fd = w->fd;
		if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->fd, &ev) == -1) {
			fail_errno(w, "epoll_ctl(EPOLL_CTL_ADD)");
			return false;
		}
	}
	return true;
}

static bool
close_waiter(struct waiter *w)
{
	bool ok = true;

	if (w->epfd != -1 && close(w->epfd) == -1) {
		fail_errno(w, "close epoll instance");
		ok = false;
	}
	if (w->fd != -1 && close(w->fd) == -1) {
		fail_errno(w, "close session");
		ok = false;
	}
	w->fd = w->epfd = -1;
	return ok;
}

static void
zero_request(struct dmio_usrreq *req, struct iovec *iov, void *buf, size_t len, uint32_t id)
{
	iov->iov_base = buf;
	iov->iov_len = len;
	memset(req, 0, sizeof(*req));
	req->req_outbuf.dmbuf_iov = iov;
	req->req_outbuf.dmbuf_iovcnt = 1;
	req->req_id = id;
}

/* Step 1: an idle session. */
static bool
check_idle(const struct waiter *w, const char *when)
{
	struct dmio_usrresp resp;
	ssize_t n;

	if (!expect(w, POLLIN | POLLOUT, 0, POLLOUT, when) ||
	    !expect(w, POLLIN, QUIET_MS, 0, when))
		return false;
	n = read(w->fd, &resp, sizeof(resp));
	if (n != -1) {
		fprintf(stderr, "%s: %s: %s: a non-blocking read returned %zd, expected EAGAIN\n",
		    prog, w->name, when, n);
		return false;
	}
	if (errno != EAGAIN) {
		fail_errno(w, "non-blocking read of an idle session (expected EAGAIN)");
		return false;
	}
	return true;
}

/* Step 2: one large request, waited for. */
static bool
one_request(const struct waiter *w)
{
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct iovec iov;
	unsigned char *buf;
	bool ok = false;
	ssize_t n;

	buf = malloc(BIG_LEN);
	if (buf == NULL) {
		fail_errno(w, "malloc");
		return false;
	}
	memset(buf, 0xee, BIG_LEN);
	zero_request(&req, &iov, buf, BIG_LEN, 7);
	n = write(w->fd, &req, sizeof(req));
	if (n != (ssize_t)sizeof(req)) {
		if (n == -1)
			fail_errno(w, "write one request");
		else
			fprintf(stderr, "%s: %s: write one request returned %zd\n", prog, w->name, n);
		goto out;
	}
	if (!expect(w, POLLIN, WAIT_MS, POLLIN, "waiting for one request"))
		goto out;
	n = read(w->fd, &resp, sizeof(resp));
	if (n != (ssize_t)sizeof(resp)) {
		if (n == -1)
			fail_errno(w, "read the response once readable");
		else
			fprintf(stderr, "%s: %s: read one response returned %zd\n", prog, w->name, n);
		goto out;
	}
	if (resp.resp_id != 7 || resp.resp_error != 0) {
		fprintf(stderr, "%s: %s: response id %u error %d (%s), expected id 7 error 0\n",
		    prog, w->name, (unsigned)resp.resp_id, resp.resp_error, strerror(resp.resp_error));
		goto out;
	}
	if (buf[0] != 0 || buf[BIG_LEN / 2] != 0 || buf[BIG_LEN - 1] != 0) {
		fprintf(stderr, "%s: %s: the request succeeded but the buffer is not zero\n",
		    prog, w->name);
		goto out;
	}
	printf("%s: readable once a request completed\n", w->name);
	ok = true;
out:
	free(buf);
	return ok;
}

/*
 * Step 3: write requests WRITE_BATCH at a time until the session refuses
 * with EAGAIN; returns how many it accepted, or -1.
 */
static long
fill_queue(const struct waiter *w, struct dmio_usrreq *reqs, unsigned nreqs)
{
	unsigned done = 0;

	for (;;) {
		unsigned k = nreqs - done < WRITE_BATCH ? nreqs - done : WRITE_BATCH;
		ssize_t n;

		if (k == 0) {
			fprintf(stderr, "%s: %s: the session accepted %u requests without EAGAIN\n",
			    prog, w->name, done);
			return -1;
		}
		n = write(w->fd, &reqs[done], k * sizeof(reqs[0]));
		if (n == -1 && errno == EAGAIN)
			return (long)done;
		if (n == -1) {
			fail_errno(w, "non-blocking write");
			return -1;
		}
		if (n == 0 || (size_t)n % sizeof(reqs[0]) != 0) {
			fprintf(stderr, "%s: %s: non-blocking write returned %zd\n", prog, w->name, n);
			return -1;
		}
		done += (unsigned)((size_t)n / sizeof(reqs[0]));
	}
}

/* Step 4: read depth responses as they become readable; checks their ids. */
static bool
drain(const struct waiter *w, unsigned depth, bool *seen)
{
	struct dmio_usrresp resps[16];
	unsigned got = 0, i;

	while (got < depth) {
		size_t want = depth - got < 16 ? depth - got : 16;
		ssize_t n;

		if (!expect(w, POLLIN, WAIT_MS, POLLIN, "draining"))
			return false;
		n = read(w->fd, resps, want * sizeof(resps[0]));
		if (n == -1) {
			fail_errno(w, "read responses once readable");
			return false;
		}
		if (n == 0 || (size_t)n % sizeof(resps[0]) != 0) {
			fprintf(stderr, "%s: %s: read returned %zd\n", prog, w->name, n);
			return false;
		}
		for (i = 0; i < (size_t)n / sizeof(resps[0]); i++) {
			uint32_t id = resps[i].resp_id;

			if (id < FILL_ID || id >= FILL_ID + depth || seen[id - FILL_ID]) {
				fprintf(stderr, "%s: %s: unexpected or repeated response id %u\n",
				    prog, w->name, (unsigned)id);
				return false;
			}
			if (resps[i].resp_error != 0) {
				fprintf(stderr, "%s: %s: request %u failed: %s\n", prog, w->name,
				    (unsigned)id, strerror(resps[i].resp_error));
				return false;
			}
			seen[id - FILL_ID] = true;
			got++;
		}
	}
	return true;
}

/* Steps 3 and 4. */
static bool
fill_and_drain(const struct waiter *w, unsigned depth)
{
	unsigned nreqs = depth + 2 * WRITE_BATCH;	/* more than can be accepted */
	struct dmio_usrreq *reqs = calloc(nreqs, sizeof(*reqs));
	struct iovec *iov = calloc(nreqs, sizeof(*iov));
	unsigned char *bufs = calloc(nreqs, SMALL_LEN);
	bool *seen = calloc(depth, sizeof(*seen));
	bool ok = false;
	unsigned i;
	long accepted;

	if (reqs == NULL || iov == NULL || bufs == NULL || seen == NULL) {
		fail_errno(w, "calloc");
		goto out;
	}
	for (i = 0; i < nreqs; i++)
		zero_request(&reqs[i], &iov[i], bufs + (size_t)i * SMALL_LEN, SMALL_LEN, FILL_ID + i);

	accepted = fill_queue(w, reqs, nreqs);
	if (accepted < 0)
		goto out;
	if ((unsigned long)accepted != depth) {
		fprintf(stderr, "%s: %s: the session accepted %ld requests before EAGAIN, "
		    "expected the queue depth %u\n", prog, w->name, accepted, depth);
		goto out;
	}
	if (!expect(w, POLLOUT, 0, 0, "queue full") ||
	    !expect(w, POLLOUT, QUIET_MS, 0, "queue full"))
		goto out;
	printf("%s: not writable with %u requests outstanding\n", w->name, depth);

	if (!drain(w, depth, seen))
		goto out;
	if (!expect(w, POLLOUT, WAIT_MS, POLLOUT, "after draining") ||
	    !check_idle(w, "after draining"))
		goto out;
	printf("%s: writable again after reading %u responses\n", w->name, depth);
	ok = true;
out:
	free(reqs);
	free(iov);
	free(bufs);
	free(seen);
	return ok;
}

static bool
run(enum mech m, unsigned depth)
{
	struct waiter w;
	bool ok;

	ok = open_waiter(&w, m) && check_idle(&w, "idle session");
	if (ok)
		printf("%s: idle session is writable and not readable\n", w.name);
	ok = ok && one_request(&w) && check_idle(&w, "after reading the response") &&
	    fill_and_drain(&w, depth);
	if (!close_waiter(&w))
		ok = false;
	printf("%s: %s\n", mech_names[m], ok ? "ok" : "FAILED");
	fflush(stdout);
	return ok;
}

static int
usage(void)
{
	fprintf(stderr, "usage: %s poll|select|epoll|all [QUEUE_DEPTH]\n", prog);
	return 2;
}

int
main(int argc, char **argv)
{
	unsigned depth = DMIO_NREQS_MAX;
	bool ok = true;
	int m;

	if (argc < 2 || argc > 3)
		return usage();
	if (argc == 3) {
		char *end;
		unsigned long v = strtoul(argv[2], &end, 10);

		if (*argv[2] == '\0' || *end != '\0' || v == 0 || v > MAX_DEPTH)
			return usage();
		depth = (unsigned)v;
	}
	if (strcmp(argv[1], "all") != 0 && strcmp(argv[1], "poll") != 0 &&
	    strcmp(argv[1], "select") != 0 && strcmp(argv[1], "epoll") != 0)
		return usage();
	for (m = M_POLL; m <= M_EPOLL; m++) {
		if (strcmp(argv[1], "all") != 0 && strcmp(argv[1], mech_names[m]) != 0)
			continue;
		if (!run((enum mech)m, depth))
			ok = false;
	}
	return ok ? 0 : 1;
}
