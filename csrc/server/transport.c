/*
 * transport.c - the data plane: owns /dev/fuse, serves session calls, relays
 * the rest to libfuse.  See transport.h.
 *
 * Threads:
 *  - readers read /dev/fuse: one, normally (two blocked in read() would take
 *    requests in turn, putting a cross-CPU hand-off in every round trip of a
 *    lone client).  A session READ, POLL or INTERRUPT is decided by the core
 *    at once, never touching client memory.  A session WRITE needs the
 *    client's memory (its iovec arrays, and the data of small requests), and
 *    that memory may be a mapping of a FUSE file - of this very mount, whose
 *    READ only another reader can take, or of a slow one.  So the reader
 *    notes when it enters a client's memory, and
 *  - the watchdog starts another reader when every reader has been in a
 *    client's memory for STALL_NS (up to max_readers; they leave once free
 *    readers are back).  It ticks while writes come and sleeps otherwise.
 *  - the forwarder passes everything else to libfuse through the socket
 *    pair, from a queue, so a slow control plane never holds up a reader.
 *  - the relay reads libfuse's answers and notifications and writes them to
 *    /dev/fuse, adding FOPEN_STREAM to the opens of session files (a stream
 *    has no file position, so the VFS does not serialise the threads of one
 *    descriptor: a thread blocked in read() must not stop another's write).
 */
#define FUSE_USE_VERSION 31
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "transport.h"

#ifndef FOPEN_PARALLEL_DIRECT_WRITES
#define FOPEN_PARALLEL_DIRECT_WRITES	(1 << 6)	/* protocol 7.36; older kernels ignore it */
#endif
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING	(1ULL << 41)	/* kernels >= 6.14; libfuse >= 3.18 */
#endif

#define HEADER_ROOM	0x1000		/* libfuse's FUSE_BUFFER_HEADER_SIZE */
#define MAX_PAGES	256		/* FUSE_MAX_MAX_PAGES: the kernel's largest request */
#define WAKE_SIGNAL	SIGURG		/* interrupts a reader's read() when stopping */
#define STOP_RETRY_NS	20000000L	/* resend it this often until the reader is gone */
#define STOP_WAIT_NS	2000000000L	/* then leave it: it is stuck in a client's memory */
#define SOCKET_BUFFER	(8 << 20)	/* room for libfuse's largest answers */
#define MIN_READERS	1		/* more when readers are stuck in clients' memory */
#define STALL_NS	2000000L	/* a reader this long in a client's memory may be stuck */
#define TICK_NS		5000000L	/* the watchdog looks this often while clients are active */
#define IDLE_NS		1000000000L	/* and sleeps after this long without a write */

/* A message for libfuse. */
struct msg {
	struct msg *next;
	size_t len;
	unsigned char data[];
};

/* A registered open file of a session. */
struct entry {
	struct entry *next;
	uint64_t fh;
	dm_sess *sess;
};

/* A request forwarded to libfuse whose answer the relay must look at. */
struct pending {
	struct pending *next;
	uint64_t unique;
	uint32_t opcode;
};

struct reader {
	struct reader *next;
	dm_transport *t;
	pthread_t thread;
	int64_t client_since;		/* in a client's memory since (t->mu), or 0 */
	struct dm_exec *x;		/* made when it first submits a write */
	unsigned char *buf;		/* a request */
	unsigned char *scratch;		/* an answer */
};

struct dm_transport {
	dm_core *core;
	struct fuse_session *mount_se;	/* libfuse's session used only to mount and unmount */
	int devfd;			/* our own descriptor of the connection */
	int relay;			/* our end of the socket pair */
	int libfd;			/* libfuse's end */
	int evfd;			/* readable when the state changes */
	int taskdir;			/* /proc/self/task: is a thread ours? */
	size_t bufsize;
	unsigned max_readers, min_minor;

	pthread_mutex_t mu;		/* readers, state */
	struct reader *readers;
	unsigned nreaders;
	unsigned in_client;		/* readers touching a client's memory now */
	int64_t last_active;		/* CLOCK_MONOTONIC of the last write */
	pthread_cond_t wdcv;		/* wakes the watchdog (monotonic clock) */
	pthread_t watchdog;
	bool watchdog_asleep;
	atomic_uint idle;
	atomic_bool stopping;
	atomic_int state;
	char message[512];

	pthread_rwlock_t rwl;		/* the registry */
	struct entry **bucket;
	size_t nbucket, count;

	pthread_mutex_t fmu;		/* the queue to libfuse */
	pthread_cond_t fcv;
	struct msg *fhead, **ftail;
	pthread_t forwarder, relayer;
	bool have_forwarder, have_relayer, have_watchdog;	/* started, not yet joined */
	bool stopped;
	bool abandoned;			/* a reader never came back: t must outlive it */

	pthread_mutex_t pmu;		/* pending answers to look at */
	struct pending *pend;

	atomic_uint proto_major, proto_minor, max_write;
	atomic_uint_fast64_t requests, forwarded, from_libfuse, session_calls, interrupts;
	atomic_uint_fast64_t stream_opens, self_reads, to_workers;
};

/* --- small helpers --------------------------------------------------------- */

static int64_t
monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void
set_state(dm_transport *t, int state, const char *fmt, ...)
{
	uint64_t one = 1;
	ssize_t n;

	pthread_mutex_lock(&t->mu);
	if (atomic_load(&t->state) == DM_TRANSPORT_RUNNING) {
		if (fmt != NULL) {
			va_list ap;

			va_start(ap, fmt);
			vsnprintf(t->message, sizeof(t->message), fmt, ap);
			va_end(ap);
		}
		atomic_store(&t->state, state);
	}
	pthread_mutex_unlock(&t->mu);
	n = write(t->evfd, &one, sizeof(one));
	(void)n;
}

static void
send_answer(dm_transport *t, uint64_t unique, int err, const void *data, size_t len)
{
	struct fuse_out_header out = {
		.len = (uint32_t)(sizeof(out) + len), .error = -err, .unique = unique,
	};
	struct iovec iov[2] = {
		{ .iov_base = &out, .iov_len = sizeof(out) },
		{ .iov_base = (void *)data, .iov_len = len },
	};
	/* ENOENT: the kernel no longer waits for it (the caller was killed). */
	ssize_t n = writev(t->devfd, iov, len > 0 ? 2 : 1);

	(void)n;
}

/* The core's sink. */
static void
sink_read(void *ctx, uint64_t unique, int err, const void *data, size_t len)
{
	send_answer(ctx, unique, err, data, len);
}

static void
sink_write(void *ctx, uint64_t unique, int err, size_t accepted)
{
	struct fuse_write_out out = { .size = (uint32_t)accepted };

	if (err != 0)
		send_answer(ctx, unique, err, NULL, 0);
	else
		send_answer(ctx, unique, 0, &out, sizeof(out));
}

/* Is tid a thread of the server itself (a fault on a session file's mapping)? */
static int
sink_own_thread(void *ctx, int tid)
{
	dm_transport *t = ctx;
	char name[16];

	snprintf(name, sizeof(name), "%d", tid);
	if (tid <= 0 || faccessat(t->taskdir, name, F_OK, 0) != 0)
		return 0;
	atomic_fetch_add(&t->self_reads, 1);
	return 1;
}

static void
sink_poll(void *ctx, uint64_t kh)
{
	dm_transport *t = ctx;
	struct fuse_notify_poll_wakeup_out arg = { .kh = kh };

	/* A notification: unique 0, the code in error. */
	send_answer(t, 0, -FUSE_NOTIFY_POLL, &arg, sizeof(arg));
}

/* --- the registry: open session files -------------------------------------- */

static size_t
slot(uint64_t fh, size_t nbucket)
{
	return (size_t)((fh * 0x9e3779b97f4a7c15u) >> 32) & (nbucket - 1);
}

static int
grow(dm_transport *t)
{
	size_t n = t->nbucket ? t->nbucket * 2 : 64;
	struct entry **b = calloc(n, sizeof(*b));

	if (b == NULL)
		return ENOMEM;
	for (size_t i = 0; i < t->nbucket; i++) {
		struct entry *e, *next;

		for (e = t->bucket[i]; e != NULL; e = next) {
			next = e->next;
			e->next = b[slot(e->fh, n)];
			b[slot(e->fh, n)] = e;
		}
	}
	free(t->bucket);
	t->bucket = b;
	t->nbucket = n;
	return 0;
}

/* The session of open file fh, or NULL.  The kernel keeps the file open
 * while its request is being served, so the session outlives the call. */
static dm_sess *
lookup(dm_transport *t, uint64_t fh)
{
	dm_sess *s = NULL;

	pthread_rwlock_rdlock(&t->rwl);
	if (t->nbucket > 0)
		for (struct entry *e = t->bucket[slot(fh, t->nbucket)]; e != NULL; e = e->next)
			if (e->fh == fh) {
				s = e->sess;
				break;
			}
	pthread_rwlock_unlock(&t->rwl);
	return s;
}

int
dm_transport_register(dm_transport *t, uint64_t fh, dm_sess *s)
{
	struct entry *e;
	int err = 0;

	if (s == NULL)
		return EINVAL;
	if ((e = calloc(1, sizeof(*e))) == NULL)
		return ENOMEM;
	e->fh = fh;
	e->sess = s;
	pthread_rwlock_wrlock(&t->rwl);
	if (t->count >= t->nbucket)
		err = grow(t);
	if (err == 0 || t->nbucket > 0) {
		size_t i = slot(fh, t->nbucket);

		e->next = t->bucket[i];
		t->bucket[i] = e;
		t->count++;
		err = 0;
	}
	pthread_rwlock_unlock(&t->rwl);
	if (err != 0)
		free(e);
	return err;
}

void
dm_transport_unregister(dm_transport *t, uint64_t fh)
{
	struct entry **p, *e = NULL;

	pthread_rwlock_wrlock(&t->rwl);
	if (t->nbucket > 0)
		for (p = &t->bucket[slot(fh, t->nbucket)]; *p != NULL; p = &(*p)->next)
			if ((*p)->fh == fh) {
				e = *p;
				*p = e->next;
				t->count--;
				break;
			}
	pthread_rwlock_unlock(&t->rwl);
	free(e);
}

/* --- to libfuse -------------------------------------------------------------- */

static void
expect_answer(dm_transport *t, uint64_t unique, uint32_t opcode)
{
	struct pending *p = malloc(sizeof(*p));

	if (p == NULL)
		return;		/* the answer then goes through unchanged */
	p->unique = unique;
	p->opcode = opcode;
	pthread_mutex_lock(&t->pmu);
	p->next = t->pend;
	t->pend = p;
	pthread_mutex_unlock(&t->pmu);
}

/* The opcode of a forwarded request whose answer was expected, or 0. */
static uint32_t
expected(dm_transport *t, uint64_t unique)
{
	struct pending **p, *found = NULL;
	uint32_t opcode = 0;

	pthread_mutex_lock(&t->pmu);
	for (p = &t->pend; *p != NULL; p = &(*p)->next)
		if ((*p)->unique == unique) {
			found = *p;
			*p = found->next;
			break;
		}
	pthread_mutex_unlock(&t->pmu);
	if (found != NULL) {
		opcode = found->opcode;
		free(found);
	}
	return opcode;
}

static void
forward(dm_transport *t, const unsigned char *data, size_t len)
{
	struct msg *m;

	/* Out of memory: wait rather than drop a request the kernel waits for. */
	while ((m = malloc(sizeof(*m) + len)) == NULL)
		usleep(1000);
	m->next = NULL;
	m->len = len;
	memcpy(m->data, data, len);
	pthread_mutex_lock(&t->fmu);
	*t->ftail = m;
	t->ftail = &m->next;
	pthread_cond_signal(&t->fcv);
	pthread_mutex_unlock(&t->fmu);
	atomic_fetch_add(&t->forwarded, 1);
}

static void *
forwarder_main(void *arg)
{
	dm_transport *t = arg;

	pthread_mutex_lock(&t->fmu);
	for (;;) {
		struct msg *m;

		while (t->fhead == NULL && !atomic_load(&t->stopping))
			pthread_cond_wait(&t->fcv, &t->fmu);
		if (atomic_load(&t->stopping))
			break;
		m = t->fhead;
		t->fhead = m->next;
		if (t->fhead == NULL)
			t->ftail = &t->fhead;
		pthread_mutex_unlock(&t->fmu);
		/* EPIPE: libfuse is gone (shutting down); the kernel's abort answers. */
		while (send(t->relay, m->data, m->len, MSG_NOSIGNAL) < 0 && errno == EINTR)
			;
		free(m);
		pthread_mutex_lock(&t->fmu);
	}
	pthread_mutex_unlock(&t->fmu);
	return NULL;
}

/*
 * An answer of libfuse to an OPEN: a session file becomes a stream, whose
 * writes may run in parallel (the kernel otherwise holds the inode's lock
 * through a write: one writer waiting for room would hold up every other
 * writer of the session, each unkillable while it waits for the lock).
 */
static void
mark_stream(dm_transport *t, unsigned char *msg, size_t len)
{
	struct fuse_out_header *out = (void *)msg;
	struct fuse_open_out *open_out = (void *)(out + 1);

	if (out->error != 0 || len < sizeof(*out) + sizeof(*open_out))
		return;
	if (lookup(t, open_out->fh) != NULL) {
		open_out->open_flags |= FOPEN_STREAM | FOPEN_NONSEEKABLE | FOPEN_PARALLEL_DIRECT_WRITES;
		atomic_fetch_add(&t->stream_opens, 1);
	}
}

/* libfuse's answer to FUSE_INIT: what the connection now is. */
static void
note_init(dm_transport *t, const unsigned char *msg, size_t len)
{
	const struct fuse_out_header *out = (const void *)msg;
	const struct fuse_init_out *init = (const void *)(out + 1);

	/* Older protocols answer with a shorter struct; the fields read here come first. */
	if (out->error != 0 || len < sizeof(*out) + 24)
		return;
	atomic_store(&t->proto_major, init->major);
	atomic_store(&t->proto_minor, init->minor);
	atomic_store(&t->max_write, init->max_write);
}

static void *
relayer_main(void *arg)
{
	dm_transport *t = arg;
	size_t size = t->bufsize + HEADER_ROOM;
	unsigned char *buf = malloc(size);

	while (buf != NULL) {
		ssize_t n = recv(t->relay, buf, size, 0);
		const struct fuse_out_header *out = (const void *)buf;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;		/* libfuse closed its end */
		if ((size_t)n < sizeof(*out))
			continue;
		if (out->unique != 0) {
			switch (expected(t, out->unique)) {
			case FUSE_OPEN:
				mark_stream(t, buf, (size_t)n);
				break;
			case FUSE_INIT:
				note_init(t, buf, (size_t)n);
				break;
			}
		}
		atomic_fetch_add(&t->from_libfuse, 1);
		if (write(t->devfd, buf, (size_t)n) < 0 && errno != ENOENT && errno != ENODEV)
			perror("dmoverfs: writing an answer to /dev/fuse");
	}
	free(buf);
	return NULL;
}

/* --- readers ------------------------------------------------------------------ */

static int spawn_reader(dm_transport *t);

/*
 * A reader is about to touch a client's memory (a write's iovec arrays, small
 * requests' data), which may be a mapping of a FUSE file: of this mount, whose
 * READ only another reader can take, or of a slow one.  The watchdog starts a
 * reader when every reader has been in a client's memory for STALL_NS.
 */
static void
enter_client(dm_transport *t, struct reader *r)
{
	int64_t now = monotonic_ns();

	pthread_mutex_lock(&t->mu);
	r->client_since = now;
	t->in_client++;
	t->last_active = now;
	if (t->watchdog_asleep)
		pthread_cond_signal(&t->wdcv);
	pthread_mutex_unlock(&t->mu);
}

static void
leave_client(dm_transport *t, struct reader *r)
{
	pthread_mutex_lock(&t->mu);
	r->client_since = 0;
	t->in_client--;
	pthread_mutex_unlock(&t->mu);
}

/* Is every reader stuck in a client's memory?  (Under t->mu.) */
static bool
all_stuck(dm_transport *t, int64_t now)
{
	if (t->nreaders == 0 || t->in_client < t->nreaders)
		return false;
	for (struct reader *r = t->readers; r != NULL; r = r->next)
		if (r->client_since == 0 || now - r->client_since < STALL_NS)
			return false;
	return true;
}

static void *
watchdog_main(void *arg)
{
	dm_transport *t = arg;

	pthread_mutex_lock(&t->mu);
	while (!atomic_load(&t->stopping)) {
		struct timespec until;
		int64_t now = monotonic_ns();

		if (now - t->last_active > IDLE_NS) {
			/* No write for a while: sleep until the next one. */
			t->watchdog_asleep = true;
			pthread_cond_wait(&t->wdcv, &t->mu);
			t->watchdog_asleep = false;
			continue;
		}
		until.tv_sec = (now + TICK_NS) / 1000000000L;
		until.tv_nsec = (now + TICK_NS) % 1000000000L;
		pthread_cond_timedwait(&t->wdcv, &t->mu, &until);
		if (!atomic_load(&t->stopping) && all_stuck(t, monotonic_ns())) {
			pthread_mutex_unlock(&t->mu);
			(void)spawn_reader(t);	/* at max_readers, what waits waits */
			pthread_mutex_lock(&t->mu);
		}
	}
	pthread_mutex_unlock(&t->mu);
	return NULL;
}

/* FUSE_INIT from the kernel: refuse what cannot work, keep libfuse off io_uring. */
static bool
check_init(dm_transport *t, unsigned char *buf, size_t n)
{
	struct fuse_in_header *in = (void *)buf;
	struct fuse_init_in *init = (void *)(in + 1);

	if (n < sizeof(*in) + 16)
		return true;
	if (init->major != FUSE_KERNEL_VERSION || init->minor < t->min_minor) {
		send_answer(t, in->unique, EPROTO, NULL, 0);
		set_state(t, DM_TRANSPORT_REFUSED,
		    "the kernel speaks FUSE protocol %u.%u; dmoverfs needs %u.%u or later "
		    "(per-call file flags, FOPEN_STREAM, poll notifications): use a newer kernel",
		    init->major, init->minor, FUSE_KERNEL_VERSION, t->min_minor);
		return false;
	}
	/* The socket pair can carry neither io_uring nor splice's page moves: */
	/* libfuse reads it with read() (or splice from it, which works as read). */
	if (n >= sizeof(*in) + sizeof(*init) && (init->flags & FUSE_INIT_EXT))
		init->flags2 &= ~(uint32_t)(FUSE_OVER_IO_URING >> 32);
	expect_answer(t, in->unique, FUSE_INIT);
	return true;
}

static void
dispatch(struct reader *r, size_t n)
{
	dm_transport *t = r->t;
	const struct fuse_in_header *in = (const void *)r->buf;
	const unsigned char *arg = r->buf + sizeof(*in);
	size_t arglen = n - sizeof(*in);
	dm_sess *s;

	switch (in->opcode) {
	case FUSE_READ: {
		const struct fuse_read_in *a = (const void *)arg;
		struct dm_call_in call;

		if (arglen < sizeof(*a) || (s = lookup(t, a->fh)) == NULL)
			break;
		call = (struct dm_call_in){ in->unique, (int)in->pid, (a->flags & O_NONBLOCK) != 0, in->uid, in->gid };
		atomic_fetch_add(&t->session_calls, 1);
		if (a->size > t->bufsize) {
			send_answer(t, in->unique, EINVAL, NULL, 0);
			return;
		}
		dm_sess_call_read(s, &call, a->size, r->scratch);
		return;
	}
	case FUSE_WRITE: {
		const struct fuse_write_in *a = (const void *)arg;
		struct dm_call_in call;
		struct dm_exec *x = NULL;

		if (arglen < sizeof(*a) || arglen - sizeof(*a) < a->size) {
			send_answer(t, in->unique, EINVAL, NULL, 0);
			return;
		}
		if ((s = lookup(t, a->fh)) == NULL) {
			/* Only session files are writable; never forward bulk data. */
			send_answer(t, in->unique, EBADF, NULL, 0);
			return;
		}
		call = (struct dm_call_in){ in->unique, (int)in->pid, (a->flags & O_NONBLOCK) != 0, in->uid, in->gid };
		atomic_fetch_add(&t->session_calls, 1);
		if (r->x == NULL && (r->x = dm_core_exec_new(t->core)) == NULL)
			atomic_fetch_add(&t->to_workers, 1);	/* no memory for a context: a worker submits */
		x = r->x;
		if (x != NULL)
			enter_client(t, r);
		dm_sess_call_write(s, x, &call, arg + sizeof(*a), a->size);
		if (x != NULL)
			leave_client(t, r);
		return;
	}
	case FUSE_POLL: {
		const struct fuse_poll_in *a = (const void *)arg;
		struct fuse_poll_out out = { 0 };

		if (arglen < sizeof(*a) || (s = lookup(t, a->fh)) == NULL)
			break;
		atomic_fetch_add(&t->session_calls, 1);
		out.revents = dm_sess_call_poll(s, a->kh, (a->flags & FUSE_POLL_SCHEDULE_NOTIFY) != 0);
		send_answer(t, in->unique, 0, &out, sizeof(out));
		return;
	}
	case FUSE_INTERRUPT: {
		const struct fuse_interrupt_in *a = (const void *)arg;

		/* Only session calls wait; libfuse has nothing to interrupt. */
		atomic_fetch_add(&t->interrupts, 1);
		if (arglen >= sizeof(*a))
			dm_core_call_interrupt(t->core, a->unique);
		return;
	}
	case FUSE_INIT:
		if (!check_init(t, r->buf, n))
			return;
		break;
	case FUSE_OPEN:
		expect_answer(t, in->unique, FUSE_OPEN);
		break;
	}
	forward(t, r->buf, n);
}

static void reader_free(struct reader *r);

/*
 * Take r out of the pool when it is not needed: more than MIN_READERS, and
 * another reader free of client memory without it.  True if it left
 * (detached, its memory freed: the caller returns at once).
 */
static bool
leave_pool(struct reader *r)
{
	dm_transport *t = r->t;
	struct reader **p;
	bool left = false;

	pthread_mutex_lock(&t->mu);
	if (t->nreaders > MIN_READERS && t->nreaders - 1 - t->in_client >= 1 && !atomic_load(&t->stopping)) {
		for (p = &t->readers; *p != NULL; p = &(*p)->next)
			if (*p == r) {
				*p = r->next;
				t->nreaders--;
				left = true;
				break;
			}
	}
	pthread_mutex_unlock(&t->mu);
	if (left) {
		pthread_detach(pthread_self());
		reader_free(r);
	}
	return left;
}

static void
on_wake(int sig)
{
	(void)sig;	/* only interrupts read() */
}

static void *
reader_main(void *arg)
{
	struct reader *r = arg;
	dm_transport *t = r->t;
	sigset_t wake;

	sigemptyset(&wake);
	sigaddset(&wake, WAKE_SIGNAL);
	pthread_sigmask(SIG_UNBLOCK, &wake, NULL);
	while (!atomic_load(&t->stopping)) {
		ssize_t n;

		atomic_fetch_add(&t->idle, 1);
		n = read(t->devfd, r->buf, t->bufsize);
		atomic_fetch_sub(&t->idle, 1);
		if (atomic_load(&t->stopping))
			break;
		if (n < 0) {
			int e = errno;

			if (e == EINTR || e == EAGAIN || e == ENOENT)
				continue;	/* as libfuse: retry */
			if (e == ENODEV)
				set_state(t, DM_TRANSPORT_UNMOUNTED, NULL);
			else
				set_state(t, DM_TRANSPORT_FAILED, "reading /dev/fuse: %s", strerror(e));
			break;
		}
		atomic_fetch_add(&t->requests, 1);
		if ((size_t)n >= sizeof(struct fuse_in_header) &&
		    ((const struct fuse_in_header *)r->buf)->len == (uint32_t)n)
			dispatch(r, (size_t)n);
		/* The pool shrinks back once clients' memory stops holding readers. */
		if (leave_pool(r))
			return NULL;
	}
	return NULL;
}

static void
reader_free(struct reader *r)
{
	if (r->x != NULL)
		dm_core_exec_free(r->x);
	free(r->buf);
	free(r->scratch);
	free(r);
}

static int
spawn_reader(dm_transport *t)
{
	sigset_t all, old;
	struct reader *r;
	int err;

	pthread_mutex_lock(&t->mu);
	if (t->nreaders >= t->max_readers || atomic_load(&t->stopping)) {
		pthread_mutex_unlock(&t->mu);
		return EAGAIN;
	}
	r = calloc(1, sizeof(*r));
	if (r == NULL || (r->buf = malloc(t->bufsize)) == NULL || (r->scratch = malloc(t->bufsize)) == NULL) {
		pthread_mutex_unlock(&t->mu);
		if (r != NULL)
			reader_free(r);
		return ENOMEM;
	}
	r->t = t;
	/* Signals stay with the control plane's thread (readers take WAKE_SIGNAL). */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&r->thread, NULL, reader_main, r);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0) {
		pthread_mutex_unlock(&t->mu);
		reader_free(r);
		return err;
	}
	pthread_setname_np(r->thread, "dmoverfs-fuse");
	r->next = t->readers;
	t->readers = r;
	t->nreaders++;
	pthread_mutex_unlock(&t->mu);
	return 0;
}

/* Give WAKE_SIGNAL a handler that does nothing, unless it has one. */
static int
install_wake_handler(void)
{
	struct sigaction sa;

	if (sigaction(WAKE_SIGNAL, NULL, &sa) != 0)
		return errno;
	if (sa.sa_handler != SIG_DFL && sa.sa_handler != SIG_IGN)
		return 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_wake;	/* no SA_RESTART: read() fails with EINTR */
	sigemptyset(&sa.sa_mask);
	return sigaction(WAKE_SIGNAL, &sa, NULL) == 0 ? 0 : errno;
}

/* --- life cycle ----------------------------------------------------------------- */

/* Mount through libfuse's public API; the session is used for nothing else. */
static struct fuse_session *
mount_fs(const struct dm_transport_config *cfg)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_lowlevel_ops ops;
	struct fuse_session *se = NULL;

	memset(&ops, 0, sizeof(ops));
	if (fuse_opt_add_arg(&args, "dmoverfs") != 0 ||
	    (cfg->options != NULL && cfg->options[0] != '\0' &&
	     (fuse_opt_add_arg(&args, "-o") != 0 || fuse_opt_add_arg(&args, cfg->options) != 0)))
		goto out;
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (se != NULL && fuse_session_mount(se, cfg->mountpoint) != 0) {
		fuse_session_destroy(se);
		se = NULL;
	}
out:
	fuse_opt_free_args(&args);
	return se;
}

static void
socket_buffers(int fd)
{
	int size = SOCKET_BUFFER;

	/* Beyond net.core.wmem_max only with CAP_NET_ADMIN: try, then take what is allowed. */
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) != 0)
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) != 0)
		(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
}

dm_transport *
dm_transport_new(dm_core *core, const struct dm_transport_config *cfg, char *msg, size_t msglen, int *err)
{
	dm_transport *t;
	int pair[2];
	int e;

	if (core == NULL || cfg == NULL || cfg->mountpoint == NULL) {
		snprintf(msg, msglen, "no core or mount point");
		*err = EINVAL;
		return NULL;
	}
	if ((t = calloc(1, sizeof(*t))) == NULL) {
		snprintf(msg, msglen, "out of memory");
		*err = ENOMEM;
		return NULL;
	}
	t->core = core;
	t->devfd = t->relay = t->libfd = t->evfd = t->taskdir = -1;
	t->bufsize = (size_t)MAX_PAGES * (size_t)sysconf(_SC_PAGESIZE) + HEADER_ROOM;
	t->max_readers = cfg->max_readers >= 2 ? cfg->max_readers : 2;
	t->min_minor = cfg->min_proto_minor;
	pthread_mutex_init(&t->mu, NULL);
	pthread_rwlock_init(&t->rwl, NULL);
	pthread_mutex_init(&t->fmu, NULL);
	pthread_cond_init(&t->fcv, NULL);
	pthread_mutex_init(&t->pmu, NULL);
	{
		pthread_condattr_t ca;

		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&t->wdcv, &ca);
		pthread_condattr_destroy(&ca);
	}
	t->ftail = &t->fhead;

	if ((e = install_wake_handler()) != 0) {
		snprintf(msg, msglen, "cannot install a handler for SIGURG: %s", strerror(e));
		goto fail;
	}
	if ((t->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
	    (t->taskdir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		e = errno;
		snprintf(msg, msglen, "%s: %s", t->evfd < 0 ? "eventfd" : "/proc/self/task", strerror(e));
		goto fail;
	}
	/* One message per send and per read, in both directions, as on /dev/fuse. */
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
		e = errno;
		snprintf(msg, msglen, "cannot make the socket pair libfuse talks through: %s", strerror(e));
		goto fail;
	}
	t->relay = pair[0];
	t->libfd = pair[1];
	socket_buffers(t->relay);
	socket_buffers(t->libfd);

	if ((t->mount_se = mount_fs(cfg)) == NULL) {
		e = EIO;
		snprintf(msg, msglen, "libfuse could not mount %s (its message above says why)", cfg->mountpoint);
		goto fail;
	}
	/* Our own descriptor: libfuse closes its own at unmount, while readers may still read. */
	if ((t->devfd = fcntl(fuse_session_fd(t->mount_se), F_DUPFD_CLOEXEC, 3)) < 0) {
		e = errno;
		snprintf(msg, msglen, "cannot duplicate the /dev/fuse descriptor: %s", strerror(e));
		goto fail;
	}
	{
		struct dm_sink sink = { .ctx = t, .answer_read = sink_read, .answer_write = sink_write,
		    .wake_poll = sink_poll, .is_own_thread = sink_own_thread };

		dm_core_set_sink(core, &sink);
	}
	*err = 0;
	return t;
fail:
	*err = e;
	dm_transport_free(t);
	return NULL;
}

int
dm_transport_libfuse_fd(dm_transport *t)
{
	return t->libfd;
}

/* Stop the forwarder, the relay and the watchdog, those that were started
 * (t->stopping is set). */
static void
stop_service_threads(dm_transport *t)
{
	if (t->have_watchdog) {
		pthread_mutex_lock(&t->mu);
		pthread_cond_broadcast(&t->wdcv);
		pthread_mutex_unlock(&t->mu);
		pthread_join(t->watchdog, NULL);
		t->have_watchdog = false;
	}
	if (t->have_forwarder) {
		pthread_mutex_lock(&t->fmu);
		pthread_cond_broadcast(&t->fcv);
		pthread_mutex_unlock(&t->fmu);
		pthread_join(t->forwarder, NULL);
		t->have_forwarder = false;
	}
	if (t->have_relayer) {
		shutdown(t->relay, SHUT_RDWR);
		pthread_join(t->relayer, NULL);
		t->have_relayer = false;
	}
}

int
dm_transport_start(dm_transport *t)
{
	sigset_t all, old;
	int err;

	/* Signals stay with the control plane's thread. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&t->forwarder, NULL, forwarder_main, t);
	t->have_forwarder = err == 0;
	if (err == 0)
		t->have_relayer = (err = pthread_create(&t->relayer, NULL, relayer_main, t)) == 0;
	if (err == 0)
		t->have_watchdog = (err = pthread_create(&t->watchdog, NULL, watchdog_main, t)) == 0;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0) {
		atomic_store(&t->stopping, true);
		stop_service_threads(t);
		atomic_store(&t->stopping, false);
		return err;
	}
	pthread_setname_np(t->forwarder, "dmoverfs-fwd");
	pthread_setname_np(t->relayer, "dmoverfs-relay");
	pthread_setname_np(t->watchdog, "dmoverfs-watch");
	for (unsigned i = 0; i < MIN_READERS && err == 0; i++)
		err = spawn_reader(t);
	return err;
}

int
dm_transport_eventfd(dm_transport *t)
{
	return t->evfd;
}

int
dm_transport_state(dm_transport *t)
{
	return atomic_load(&t->state);
}

const char *
dm_transport_message(dm_transport *t)
{
	return t->message;
}

void
dm_transport_stats(dm_transport *t, struct dm_transport_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->proto_major = atomic_load(&t->proto_major);
	out->proto_minor = atomic_load(&t->proto_minor);
	out->max_write = atomic_load(&t->max_write);
	pthread_mutex_lock(&t->mu);
	out->readers = t->nreaders;
	pthread_mutex_unlock(&t->mu);
	out->idle_readers = atomic_load(&t->idle);
	out->max_readers = t->max_readers;
	out->requests = atomic_load(&t->requests);
	out->forwarded = atomic_load(&t->forwarded);
	out->answered_by_libfuse = atomic_load(&t->from_libfuse);
	out->session_calls = atomic_load(&t->session_calls);
	out->interrupts = atomic_load(&t->interrupts);
	out->stream_opens = atomic_load(&t->stream_opens);
	out->self_reads = atomic_load(&t->self_reads);
	out->handed_to_workers = atomic_load(&t->to_workers);
	pthread_rwlock_rdlock(&t->rwl);
	out->files = t->count;
	pthread_rwlock_unlock(&t->rwl);
}

/* Stop every reader: each is woken from read() by WAKE_SIGNAL until gone. */
static void
stop_readers(dm_transport *t)
{
	struct reader *r, *next;

	pthread_mutex_lock(&t->mu);
	r = t->readers;
	t->readers = NULL;
	t->nreaders = 0;
	pthread_mutex_unlock(&t->mu);
	for (; r != NULL; r = next) {
		bool joined = false;

		next = r->next;
		/* Resent until it lands: one sent just before the read() began is lost. */
		for (long waited = 0; waited < STOP_WAIT_NS && !joined; waited += STOP_RETRY_NS) {
			struct timespec until;

			pthread_kill(r->thread, WAKE_SIGNAL);
			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_nsec += STOP_RETRY_NS;
			if (until.tv_nsec >= 1000000000L) {
				until.tv_sec++;
				until.tv_nsec -= 1000000000L;
			}
			joined = pthread_timedjoin_np(r->thread, NULL, &until) == 0;
		}
		if (joined) {
			reader_free(r);
		} else {
			/* Stuck in a client's memory (a FUSE file that never answers):
			 * it must not hold the server's exit, and may still wake. */
			pthread_detach(r->thread);
			t->abandoned = true;
		}
	}
}

void
dm_transport_stop(dm_transport *t)
{
	if (t == NULL || t->stopped)
		return;
	t->stopped = true;
	atomic_store(&t->stopping, true);
	/* Unmount first: no new opens; clients with open files keep the
	 * connection until our descriptor goes, below. */
	if (t->mount_se != NULL)
		fuse_session_unmount(t->mount_se);
	stop_readers(t);
	stop_service_threads(t);
}

void
dm_transport_free(dm_transport *t)
{
	if (t == NULL)
		return;
	dm_transport_stop(t);
	if (t->abandoned) {
		/* A stuck reader may still touch t: leave it to the process's exit,
		 * with the connection (our descriptor) that the reader holds. */
		return;
	}
	/* The last descriptor of the connection: the kernel fails what still waits. */
	if (t->devfd >= 0)
		close(t->devfd);
	if (t->mount_se != NULL)
		fuse_session_destroy(t->mount_se);
	while (t->fhead != NULL) {
		struct msg *m = t->fhead;

		t->fhead = m->next;
		free(m);
	}
	while (t->pend != NULL) {
		struct pending *p = t->pend;

		t->pend = p->next;
		free(p);
	}
	for (size_t i = 0; i < t->nbucket; i++)
		while (t->bucket[i] != NULL) {
			struct entry *e = t->bucket[i];

			t->bucket[i] = e->next;
			free(e);
		}
	free(t->bucket);
	if (t->relay >= 0)
		close(t->relay);
	if (t->libfd >= 0)
		close(t->libfd);
	if (t->evfd >= 0)
		close(t->evfd);
	if (t->taskdir >= 0)
		close(t->taskdir);
	pthread_mutex_destroy(&t->pmu);
	pthread_cond_destroy(&t->wdcv);
	pthread_cond_destroy(&t->fcv);
	pthread_mutex_destroy(&t->fmu);
	pthread_rwlock_destroy(&t->rwl);
	pthread_mutex_destroy(&t->mu);
	free(t);
}
