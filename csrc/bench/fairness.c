/*
 * fairness.c - the victim and the attackers of the fairness benchmark
 * (dmoverfs/tools/fairness.py).
 *
 *   fairness victim MOUNT FUNC SIZE SECONDS LIMIT
 *	One FUNC (zero or copy) request of SIZE bytes per write() and its
 *	response per read(), both blocking, on MOUNT/func/FUNC, for SECONDS;
 *	each round trip timed with clock_gettime around the write and the read.
 *	A round trip still waiting LIMIT seconds after the start is cut short by
 *	SIGALRM and reported as "unfinished_ns" (how long it had waited: a lower
 *	bound).  Prints {"samples_ns": [...], "unfinished_ns": N or null}.
 *
 *   fairness monopoly MOUNT SESSIONS REGION REPEATS
 *	Worker monopoly: SESSIONS threads, one session each on func/zero, each
 *	keeping one request outstanding whose output lists one REGION-byte
 *	buffer REPEATS times (REGION * REPEATS bytes of work), written again as
 *	soon as it completes.
 *
 *   fairness flood MOUNT THREADS BATCH
 *	Decode flood: THREADS threads, one session each on func/xor16, writing
 *	BATCH requests per write() and reading their responses, in a loop; each
 *	request lists 1024 empty iovecs for its output and each of its 16 inputs.
 *
 *   fairness sessions MOUNT FUNC SESSIONS DEPTH SIZE
 *	Many queues: SESSIONS non-blocking sessions on func/FUNC (zero or copy),
 *	each kept DEPTH requests of SIZE bytes deep (epoll says which ones have
 *	responses to read; as many requests are written back).  Opens refused
 *	(ENFILE, EAGAIN) and writes refused (EAGAIN) are counted, not fatal.
 *
 * An attacker prints "ready" once every session has its first requests
 * written, then runs until SIGTERM, and then prints its counters as one JSON
 * object and exits (closing its sessions).  Exit status 0 on success; an
 * unexpected error prints why and exits 1.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"

#define FLOOD_IOVS	1024	/* IOV_MAX: the most a list may hold */
#define FLOOD_INPUTS	16	/* xor16 */
#define MAX_THREADS	64
#define MAX_SESSIONS	100000

static void
die(const char *what, int err)
{
	fprintf(stderr, "fairness: %s", what);
	if (err != 0)
		fprintf(stderr, ": %s", strerror(err));
	fputc('\n', stderr);
	exit(1);
}

static uint64_t
parse_u64(const char *s, uint64_t max)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (end == s || *end != '\0' || errno != 0 || v > max) {
		fprintf(stderr, "fairness: bad number %s\n", s);
		exit(2);
	}
	return v;
}

static double
parse_seconds(const char *s)
{
	char *end;
	double v = strtod(s, &end);

	if (end == s || *end != '\0' || !(v >= 0 && v < 1e6)) {
		fprintf(stderr, "fairness: bad duration %s\n", s);
		exit(2);
	}
	return v;
}

/* Page-aligned memory, touched so that no page fault lands in a timed part. */
static unsigned char *
alloc_touched(size_t n, int byte)
{
	void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap", errno);
	memset(p, byte, n);
	return p;
}

static int
open_func(const char *mount, const char *func, int flags)
{
	char path[PATH_MAX];

	if (snprintf(path, sizeof(path), "%s/func/%s", mount, func) >= (int)sizeof(path))
		die("mount path too long", 0);
	return open(path, O_RDWR | O_CLOEXEC | flags);
}

/* --- the victim ------------------------------------------------------------- */

static void
on_alarm(int sig)
{
	(void)sig;	/* only there to make the blocked read fail with EINTR */
}

/* One round trip; false if SIGALRM cut it short.  Any other failure is fatal. */
static bool
round_trip(int fd, const struct dmio_usrreq *req)
{
	struct dmio_usrresp resp;
	ssize_t n;

	n = write(fd, req, sizeof(*req));
	if (n == -1 && errno == EINTR)
		return false;
	if (n != (ssize_t)sizeof(*req))
		die("victim write", n == -1 ? errno : EIO);
	do {
		n = read(fd, &resp, sizeof(resp));
		if (n == -1 && errno == EINTR)
			return false;
	} while (n == -1 && errno == EAGAIN);
	if (n != (ssize_t)sizeof(resp))
		die("victim read", n == -1 ? errno : EIO);
	if (resp.resp_error != 0)
		die("victim request failed", resp.resp_error);
	return true;
}

static int
mode_victim(const char *mount, const char *func, size_t size, double seconds, double limit)
{
	struct sigaction sa = { .sa_handler = on_alarm };	/* no SA_RESTART */
	struct itimerval stop = { .it_value = { (time_t)limit, (long)((limit - (time_t)limit) * 1e6) } };
	bool copy = strcmp(func, "copy") == 0;
	struct iovec out_iov, in_iov;
	dmio_buffer inbuf;
	struct dmio_usrreq req;
	unsigned char *out, *in = NULL;
	uint64_t *samples, start, t0 = 0, dur = (uint64_t)(seconds * 1e9);
	size_t n = 0, cap = 1 << 16;
	bool cut = false;
	int fd;

	if (!copy && strcmp(func, "zero") != 0)
		die("the victim runs zero or copy", 0);
	if (size == 0)
		die("the victim's size must be positive", 0);
	fd = open_func(mount, func, 0);
	if (fd == -1)
		die("victim open", errno);
	out = alloc_touched(size, 0xee);
	out_iov = (struct iovec){ out, size };
	memset(&req, 0, sizeof(req));
	req.req_outbuf = (dmio_buffer){ &out_iov, 1 };
	if (copy) {
		in = alloc_touched(size, 0x3c);
		in_iov = (struct iovec){ in, size };
		inbuf = (dmio_buffer){ &in_iov, 1 };
		req.req_inbuf = &inbuf;
	}
	samples = malloc(cap * sizeof(*samples));
	if (samples == NULL)
		die("malloc", errno);
	if (sigaction(SIGALRM, &sa, NULL) == -1 || setitimer(ITIMER_REAL, &stop, NULL) == -1)
		die("timer", errno);

	start = now_ns();
	do {
		t0 = now_ns();
		if (!round_trip(fd, &req)) {
			cut = true;
			break;
		}
		if (n == cap) {
			uint64_t *more = realloc(samples, 2 * cap * sizeof(*samples));

			if (more == NULL)
				die("realloc", errno);
			samples = more;
			cap *= 2;
		}
		samples[n++] = now_ns() - t0;
	} while (now_ns() - start < dur);
	if (!cut) {
		stop = (struct itimerval){ { 0, 0 }, { 0, 0 } };
		setitimer(ITIMER_REAL, &stop, NULL);
		if (out[0] != (copy ? 0x3c : 0) || out[size - 1] != (copy ? 0x3c : 0))
			die("the victim's output is wrong", 0);
	}

	printf("{\"samples_ns\": [");
	for (size_t i = 0; i < n; i++)
		printf("%s%" PRIu64, i ? ", " : "", samples[i]);
	if (cut)
		printf("], \"unfinished_ns\": %" PRIu64 "}\n", now_ns() - t0);
	else
		printf("], \"unfinished_ns\": null}\n");
	close(fd);
	free(samples);
	return 0;
}

/* --- the attackers: shared frame --------------------------------------------- */

/* What every attacker counts (several threads add to them). */
struct counters {
	atomic_uint_fast64_t written;		/* requests accepted by a write */
	atomic_uint_fast64_t completed;		/* responses read */
	atomic_uint_fast64_t failed;		/* responses with resp_error != 0 */
	atomic_uint_fast64_t refused_writes;	/* writes failed with EAGAIN */
	atomic_uint_fast64_t refused_opens;	/* opens failed with ENFILE or EAGAIN */
	atomic_uint_fast64_t sessions;		/* sessions open */
	atomic_uint_fast64_t write_calls;	/* write() calls made */
};

static struct counters counters;
static atomic_bool stopping;
static atomic_uint ready_left;	/* threads that have not written their first requests */

static void
on_wake(int sig)
{
	(void)sig;	/* interrupts a blocked read or write; the loops look at stopping */
}

static void
became_ready(void)
{
	if (atomic_fetch_sub(&ready_left, 1) == 1) {
		printf("ready\n");
		fflush(stdout);
	}
}

/* Count a write's result: the requests it accepted; false if it failed (EINTR, EAGAIN). */
static bool
count_write(ssize_t n, const char *what)
{
	atomic_fetch_add(&counters.write_calls, 1);
	if (n >= 0) {
		if (n % (ssize_t)sizeof(struct dmio_usrreq) != 0)
			die("a write returned part of a request", 0);
		atomic_fetch_add(&counters.written, (uint64_t)n / sizeof(struct dmio_usrreq));
		return true;
	}
	if (errno == EAGAIN) {
		atomic_fetch_add(&counters.refused_writes, 1);
		return false;
	}
	if (errno == EINTR)
		return false;
	die(what, errno);
	return false;
}

/* Read up to max responses; how many (0 on EINTR or EAGAIN). */
static size_t
read_responses(int fd, struct dmio_usrresp *resp, size_t max, const char *what)
{
	ssize_t n = read(fd, resp, max * sizeof(*resp));

	if (n == -1) {
		if (errno == EINTR || errno == EAGAIN)
			return 0;
		die(what, errno);
	}
	if (n % (ssize_t)sizeof(*resp) != 0)
		die("a read returned part of a response", 0);
	for (ssize_t i = 0; i < n / (ssize_t)sizeof(*resp); i++)
		if (resp[i].resp_error != 0)
			atomic_fetch_add(&counters.failed, 1);
	atomic_fetch_add(&counters.completed, (uint64_t)n / sizeof(*resp));
	return (size_t)n / sizeof(*resp);
}

/*
 * Start nthreads threads running fn(arg, i), wait for SIGTERM (or SIGINT),
 * then stop them (SIGUSR1 wakes a thread blocked in the server, until it has
 * left), print the counters and return.
 */
static void
run_attack(void *(*fn)(void *), void *const *args, unsigned nthreads)
{
	struct sigaction wake = { .sa_handler = on_wake };	/* no SA_RESTART */
	pthread_t tids[MAX_THREADS];
	sigset_t term, old;
	int sig;

	if (nthreads < 1 || nthreads > MAX_THREADS)
		die("thread count out of range", 0);
	if (sigaction(SIGUSR1, &wake, NULL) == -1)
		die("sigaction", errno);
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigaddset(&term, SIGINT);
	/* Only the main thread takes SIGTERM (with sigwait); workers inherit the mask. */
	if (pthread_sigmask(SIG_BLOCK, &term, &old) != 0)
		die("sigmask", 0);
	atomic_store(&ready_left, nthreads);
	for (unsigned i = 0; i < nthreads; i++) {
		int err = pthread_create(&tids[i], NULL, fn, args[i]);

		if (err != 0)
			die("pthread_create", err);
	}
	if (sigwait(&term, &sig) != 0)
		die("sigwait", 0);
	atomic_store(&stopping, true);
	for (unsigned i = 0; i < nthreads; i++) {
		/* A thread may be just about to block: wake it until it has left. */
		while (pthread_tryjoin_np(tids[i], NULL) == EBUSY) {
			pthread_kill(tids[i], SIGUSR1);
			usleep(20000);
		}
	}
	printf("{\"written\": %" PRIuFAST64 ", \"completed\": %" PRIuFAST64 ", \"failed\": %" PRIuFAST64
	    ", \"refused_writes\": %" PRIuFAST64 ", \"refused_opens\": %" PRIuFAST64 ", \"sessions\": %" PRIuFAST64
	    ", \"write_calls\": %" PRIuFAST64 "}\n",
	    atomic_load(&counters.written), atomic_load(&counters.completed), atomic_load(&counters.failed),
	    atomic_load(&counters.refused_writes), atomic_load(&counters.refused_opens),
	    atomic_load(&counters.sessions), atomic_load(&counters.write_calls));
	fflush(stdout);
}

/* --- monopoly and flood: one blocking session per thread ---------------------- */

/* One thread's session: its function and the requests of one write. */
struct loop_args {
	const char *mount, *func;
	const struct dmio_usrreq *reqs;
	size_t batch;
};

/* Write the batch, read its responses, again, until stopping. */
static void *
loop_thread(void *arg)
{
	const struct loop_args *a = arg;
	struct dmio_usrresp resp[DMIO_NREQS_MAX];
	int fd = open_func(a->mount, a->func, 0);
	bool first = true;

	if (fd == -1)
		die("attacker open", errno);
	atomic_fetch_add(&counters.sessions, 1);
	while (!atomic_load(&stopping)) {
		size_t sent = 0, got = 0;

		/* A short write (a signal) leaves the rest for the next one. */
		while (sent < a->batch && !atomic_load(&stopping)) {
			ssize_t n = write(fd, a->reqs + sent, (a->batch - sent) * sizeof(a->reqs[0]));

			if (count_write(n, "attacker write"))
				sent += (size_t)n / sizeof(a->reqs[0]);
		}
		if (first) {
			became_ready();
			first = false;
		}
		while (got < sent && !atomic_load(&stopping))
			got += read_responses(fd, resp, sent - got, "attacker read");
	}
	close(fd);
	return NULL;
}

static int
mode_monopoly(const char *mount, unsigned sessions, size_t region, size_t repeats)
{
	struct loop_args args[MAX_THREADS];
	void *argp[MAX_THREADS];
	struct dmio_usrreq req;
	struct iovec *iov;
	unsigned char *buf;

	if (sessions < 1 || sessions > MAX_THREADS)
		die("sessions out of range (1 to 64)", 0);
	if (region == 0 || repeats < 1 || repeats > FLOOD_IOVS)
		die("region must be positive and repeats between 1 and 1024", 0);
	buf = alloc_touched(region, 0x5a);
	iov = calloc(repeats, sizeof(*iov));
	if (iov == NULL)
		die("calloc", errno);
	for (size_t i = 0; i < repeats; i++)
		iov[i] = (struct iovec){ buf, region };
	memset(&req, 0, sizeof(req));
	req.req_outbuf = (dmio_buffer){ iov, (unsigned)repeats };
	for (unsigned i = 0; i < sessions; i++) {
		args[i] = (struct loop_args){ mount, "zero", &req, 1 };
		argp[i] = &args[i];
	}
	run_attack(loop_thread, argp, sessions);
	return 0;
}

static int
mode_flood(const char *mount, unsigned threads, size_t batch)
{
	struct loop_args args[MAX_THREADS];
	void *argp[MAX_THREADS];
	struct dmio_usrreq reqs[DMIO_NREQS_MAX];
	dmio_buffer inbuf[FLOOD_INPUTS];
	struct iovec *out_iov, *in_iov;
	unsigned char *mem;

	if (threads < 1 || threads > MAX_THREADS)
		die("threads out of range (1 to 64)", 0);
	if (batch < 1 || batch > DMIO_NREQS_MAX)
		die("batch out of range (1 to 64)", 0);
	/* Empty segments at distinct addresses of one page: nothing to move, all to decode. */
	mem = alloc_touched(4096, 0);
	out_iov = calloc(FLOOD_IOVS, sizeof(*out_iov));
	in_iov = calloc(FLOOD_IOVS, sizeof(*in_iov));
	if (out_iov == NULL || in_iov == NULL)
		die("calloc", errno);
	for (size_t i = 0; i < FLOOD_IOVS; i++) {
		out_iov[i] = (struct iovec){ mem + i, 0 };
		in_iov[i] = (struct iovec){ mem + 2048 + i, 0 };
	}
	for (size_t j = 0; j < FLOOD_INPUTS; j++)
		inbuf[j] = (dmio_buffer){ in_iov, FLOOD_IOVS };
	memset(reqs, 0, sizeof(reqs));
	for (size_t i = 0; i < batch; i++) {
		reqs[i].req_outbuf = (dmio_buffer){ out_iov, FLOOD_IOVS };
		reqs[i].req_inbuf = inbuf;
		reqs[i].req_id = (uint32_t)i;
	}
	for (unsigned i = 0; i < threads; i++) {
		args[i] = (struct loop_args){ mount, "xor16", reqs, batch };
		argp[i] = &args[i];
	}
	run_attack(loop_thread, argp, threads);
	return 0;
}

/* --- many sessions, each kept DEPTH requests deep ----------------------------- */

struct queues_args {
	const char *mount, *func;
	size_t sessions, depth;
	const struct dmio_usrreq *reqs;	/* depth requests */
};

/* Write up to want requests on fd without blocking; how many were accepted. */
static size_t
top_up(int fd, const struct dmio_usrreq *reqs, size_t want)
{
	ssize_t n;

	if (want == 0)
		return 0;
	n = write(fd, reqs, want * sizeof(reqs[0]));
	return count_write(n, "attacker write") ? (size_t)n / sizeof(reqs[0]) : 0;
}

static void *
queues_thread(void *arg)
{
	const struct queues_args *a = arg;
	struct dmio_usrresp resp[DMIO_NREQS_MAX];
	struct epoll_event ev[256];
	size_t *queued, opened = 0;
	int *fds, ep = epoll_create1(EPOLL_CLOEXEC);

	if (ep == -1)
		die("epoll_create1", errno);
	fds = calloc(a->sessions, sizeof(*fds));
	queued = calloc(a->sessions, sizeof(*queued));
	if (fds == NULL || queued == NULL)
		die("calloc", errno);
	for (size_t i = 0; i < a->sessions && !atomic_load(&stopping); i++) {
		int fd = open_func(a->mount, a->func, O_NONBLOCK);
		struct epoll_event want = { .events = EPOLLIN, .data.u64 = opened };

		if (fd == -1) {
			if (errno != ENFILE && errno != EAGAIN && errno != EMFILE)
				die("attacker open", errno);
			atomic_fetch_add(&counters.refused_opens, 1);
			continue;
		}
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &want) == -1)
			die("epoll_ctl", errno);
		fds[opened] = fd;
		queued[opened] = top_up(fd, a->reqs, a->depth);
		opened++;
		atomic_fetch_add(&counters.sessions, 1);
	}
	became_ready();
	while (!atomic_load(&stopping)) {
		int n = epoll_wait(ep, ev, 256, 100);

		if (n == -1 && errno != EINTR)
			die("epoll_wait", errno);
		for (int k = 0; k < n; k++) {
			size_t i = (size_t)ev[k].data.u64;
			size_t got = read_responses(fds[i], resp, a->depth < DMIO_NREQS_MAX ? a->depth : DMIO_NREQS_MAX,
			    "attacker read");

			queued[i] -= got < queued[i] ? got : queued[i];
			queued[i] += top_up(fds[i], a->reqs, a->depth - queued[i]);
		}
		/* Sessions refused earlier (EAGAIN) get another try. */
		for (size_t i = 0; n == 0 && i < opened; i++)
			if (queued[i] < a->depth)
				queued[i] += top_up(fds[i], a->reqs, a->depth - queued[i]);
	}
	for (size_t i = 0; i < opened; i++)
		close(fds[i]);
	close(ep);
	free(fds);
	free(queued);
	return NULL;
}

static int
mode_sessions(const char *mount, const char *func, size_t sessions, size_t depth, size_t size)
{
	struct dmio_usrreq reqs[DMIO_NREQS_MAX];
	struct iovec out_iov, in_iov;
	dmio_buffer inbuf;
	struct queues_args a;
	void *argp[1] = { &a };
	bool copy = strcmp(func, "copy") == 0;
	struct rlimit nofile;

	if (!copy && strcmp(func, "zero") != 0)
		die("the sessions attack runs zero or copy", 0);
	if (sessions < 1 || sessions > MAX_SESSIONS || depth < 1 || depth > DMIO_NREQS_MAX || size == 0)
		die("sessions (1 to 100000), depth (1 to 64) and size (> 0) out of range", 0);
	/* One descriptor a session, and a few more. */
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < sessions + 64) {
		nofile.rlim_cur = nofile.rlim_max < sessions + 64 ? nofile.rlim_max : sessions + 64;
		setrlimit(RLIMIT_NOFILE, &nofile);
	}
	out_iov = (struct iovec){ alloc_touched(size, 0xee), size };
	in_iov = (struct iovec){ alloc_touched(size, 0x3c), size };
	inbuf = (dmio_buffer){ &in_iov, 1 };
	memset(reqs, 0, sizeof(reqs));
	for (size_t i = 0; i < depth; i++) {
		reqs[i].req_outbuf = (dmio_buffer){ &out_iov, 1 };
		reqs[i].req_inbuf = copy ? &inbuf : NULL;
		reqs[i].req_id = (uint32_t)i;
	}
	a = (struct queues_args){ mount, func, sessions, depth, reqs };
	run_attack(queues_thread, argp, 1);
	return 0;
}

int
main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	if (argc == 7 && strcmp(argv[1], "victim") == 0)
		return mode_victim(argv[2], argv[3], parse_u64(argv[4], SIZE_MAX / 2), parse_seconds(argv[5]),
		    parse_seconds(argv[6]));
	if (argc == 6 && strcmp(argv[1], "monopoly") == 0)
		return mode_monopoly(argv[2], (unsigned)parse_u64(argv[3], MAX_THREADS), parse_u64(argv[4], SIZE_MAX / 2048),
		    parse_u64(argv[5], FLOOD_IOVS));
	if (argc == 5 && strcmp(argv[1], "flood") == 0)
		return mode_flood(argv[2], (unsigned)parse_u64(argv[3], MAX_THREADS), parse_u64(argv[4], DMIO_NREQS_MAX));
	if (argc == 7 && strcmp(argv[1], "sessions") == 0)
		return mode_sessions(argv[2], argv[3], parse_u64(argv[4], MAX_SESSIONS), parse_u64(argv[5], DMIO_NREQS_MAX),
		    parse_u64(argv[6], SIZE_MAX / 2));
	fprintf(stderr,
	    "usage: fairness victim MOUNT FUNC SIZE SECONDS LIMIT\n"
	    "       fairness monopoly MOUNT SESSIONS REGION REPEATS\n"
	    "       fairness flood MOUNT THREADS BATCH\n"
	    "       fairness sessions MOUNT FUNC SESSIONS DEPTH SIZE\n");
	return 2;
}
