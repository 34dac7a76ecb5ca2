/*
 * fastpath.c - serve session reads and writes that need no wait in C.
 *
 * pyfuse3 and trio cost far more per FUSE request than moving a small
 * request's bytes does, so the server's hot path bypasses them: a reader
 * thread owns /dev/fuse and answers, itself, every READ and WRITE on a
 * registered session file that can be answered at once (requests accepted,
 * responses ready).  Everything else - lookups, opens, xattrs, polls,
 * interrupts, reads and writes that must wait or fail in ways Python
 * explains - is queued, byte for byte, to pyfuse3's own loop.
 *
 * How pyfuse3 is made to read from the queue: it takes its file descriptor
 * once from fuse_session_fd() and then calls fuse_session_receive_buf()
 * whenever that descriptor is readable.  Interposing both (this library is
 * loaded RTLD_GLOBAL before pyfuse3) gives it an eventfd, readable while the
 * queue is not empty, and the queued messages; fuse_session_destroy() is
 * interposed to stop the thread before libfuse closes /dev/fuse.  The
 * thread blocks in read() as libfuse would (no poll() per request); to stop
 * it, SIGURG is sent to it until it has gone (a no-op handler, installed
 * when SIGURG has none, makes the read fail with EINTR).  Replies go
 * out from either thread with one writev() each, which the kernel matches
 * to its request by the unique id.
 *
 * The Python server registers each open file of a session (fh -> dm_sess)
 * once the session has a built-in function, and removes it before it
 * closes the session; the registry lock is held while a session is in use
 * here, so removal waits for a request being served.  On a watched session
 * (someone waits in Python) each fast submission or take is announced with
 * dm_sess_poke() so that waiters and pollers see it.
 *
 * State: one FUSE session per server process, as in interrupts.c.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fuse_hooks.h"

#define REQ_SIZE	40	/* struct dmio_usrreq */
#define RESP_SIZE	16	/* struct dmio_usrresp */
#define MAX_PAGES	256	/* libfuse's FUSE_MAX_MAX_PAGES: its buffer and max_write */
#define HEADER_ROOM	0x1000	/* libfuse's FUSE_BUFFER_HEADER_SIZE */
#define WAKE_SIGNAL	SIGURG	/* ignored by default: harmless if it strays */
#define STOP_RETRY_NS	20000000	/* resend the wake signal this often */

typedef int session_fd_fn(struct fuse_session *);
typedef int receive_buf_fn(struct fuse_session *, struct fuse_buf *);
typedef void session_destroy_fn(struct fuse_session *);

/* A message for pyfuse3: a FUSE request, or (len <= 0) what receive_buf
 * returns from now on (0: unmounted, -errno: /dev/fuse failed). */
struct msg {
	struct msg *next;
	ssize_t len;
	unsigned char data[];
};

/* One registered open file. */
struct entry {
	struct entry *next;
	uint64_t fh;
	dm_sess *sess;
	unsigned depth;
	bool nonblock;
	int64_t atime_ns, mtime_ns;	/* last fast read / write, 0 if none */
};

static struct {
	/* set up before the thread starts, read-only while it runs */
	struct dmoverfs_fast_core core;
	bool have_core;
	bool wanted;			/* start the thread at fuse_session_fd() */
	struct fuse_session *se;	/* the session served, NULL if none */
	int fd;				/* /dev/fuse */
	int efd;			/* what pyfuse3 waits on */
	size_t bufsize;
	pthread_t tid;
	bool running;

	atomic_bool enabled;		/* fast answers allowed (off at shutdown) */
	atomic_bool stopping;		/* the thread is to return */

	pthread_mutex_t qmu;		/* the queue to pyfuse3 */
	struct msg *qhead, **qtail;

	pthread_mutex_t rmu;		/* the registry, and every session use here */
	struct entry **bucket;
	size_t nbucket, count;

	atomic_uint_fast64_t writes, reads, errors, forwarded;
} fp = {
	.fd = -1, .efd = -1,
	.qmu = PTHREAD_MUTEX_INITIALIZER, .qtail = &fp.qhead,
	.rmu = PTHREAD_MUTEX_INITIALIZER,
};

static int64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* --- the registry (call under rmu) -------------------------------------- */

static size_t
slot(uint64_t fh, size_t nbucket)
{
	return (size_t)((fh * 0x9e3779b97f4a7c15u) >> 32) & (nbucket - 1);
}

static struct entry **
find(uint64_t fh)
{
	struct entry **p;

	if (fp.nbucket == 0)
		return NULL;
	for (p = &fp.bucket[slot(fh, fp.nbucket)]; *p != NULL; p = &(*p)->next)
		if ((*p)->fh == fh)
			return p;
	return NULL;
}

static int
grow(void)
{
	size_t n = fp.nbucket ? fp.nbucket * 2 : 64;
	struct entry **b = calloc(n, sizeof(*b));

	if (b == NULL)
		return ENOMEM;
	for (size_t i = 0; i < fp.nbucket; i++) {
		struct entry *e, *next;

		for (e = fp.bucket[i]; e != NULL; e = next) {
			next = e->next;
			e->next = b[slot(e->fh, n)];
			b[slot(e->fh, n)] = e;
		}
	}
	free(fp.bucket);
	fp.bucket = b;
	fp.nbucket = n;
	return 0;
}

int
dmoverfs_fast_register(uint64_t fh, dm_sess *sess, unsigned depth, int nonblock)
{
	struct entry **p, *e;
	int err = 0;

	if (sess == NULL || depth == 0)
		return EINVAL;
	pthread_mutex_lock(&fp.rmu);
	p = find(fh);
	if (p != NULL) {
		e = *p;
	} else if (fp.count >= fp.nbucket && (err = grow()) != 0) {
		e = NULL;
	} else if ((e = calloc(1, sizeof(*e))) == NULL) {
		err = ENOMEM;
	} else {
		e->fh = fh;
		e->next = fp.bucket[slot(fh, fp.nbucket)];
		fp.bucket[slot(fh, fp.nbucket)] = e;
		fp.count++;
	}
	if (e != NULL) {
		e->sess = sess;
		e->depth = depth;
		e->nonblock = nonblock != 0;
	}
	pthread_mutex_unlock(&fp.rmu);
	return err;
}

void
dmoverfs_fast_unregister(uint64_t fh)
{
	struct entry **p, *e = NULL;

	pthread_mutex_lock(&fp.rmu);
	p = find(fh);
	if (p != NULL) {
		e = *p;
		*p = e->next;
		fp.count--;
	}
	pthread_mutex_unlock(&fp.rmu);
	free(e);
}

int
dmoverfs_fast_times(uint64_t fh, int64_t *atime_ns, int64_t *mtime_ns)
{
	struct entry **p;

	pthread_mutex_lock(&fp.rmu);
	p = find(fh);
	if (p != NULL) {
		*atime_ns = (*p)->atime_ns;
		*mtime_ns = (*p)->mtime_ns;
	}
	pthread_mutex_unlock(&fp.rmu);
	return p != NULL;
}

size_t
dmoverfs_fast_registered(void)
{
	size_t n;

	pthread_mutex_lock(&fp.rmu);
	n = fp.count;
	pthread_mutex_unlock(&fp.rmu);
	return n;
}

/* --- answering ---------------------------------------------------------- */

static void
reply(uint64_t unique, int err, const void *data, size_t len)
{
	struct fuse_out_header out = {
		.len = (uint32_t)(sizeof(out) + len), .error = -err, .unique = unique,
	};
	struct iovec iov[2] = {
		{ .iov_base = &out, .iov_len = sizeof(out) },
		{ .iov_base = (void *)data, .iov_len = len },
	};

	/* ENOENT: the kernel gave up on the request (the client was killed). */
	(void)writev(fp.fd, iov, len > 0 ? 2 : 1);
	if (err != 0)
		atomic_fetch_add(&fp.errors, 1);
}

/*
 * A write of whole requests to a registered file: answered here when the
 * session takes all of them at once (a non-blocking file: as many as there
 * is room for, or EAGAIN), or refuses the first with an error Python would
 * only repeat.  A full queue of a blocking file (the write must wait) and
 * EPERM (Python explains it in the log) go to Python.
 */
static bool
fast_write(const struct fuse_in_header *in, const unsigned char *arg, size_t len)
{
	const struct fuse_write_in *w = (const void *)arg;
	size_t nreq, acc;
	struct entry **p;
	bool nonblock;
	int err = 0;

	if (len < sizeof(*w) || len - sizeof(*w) != w->size)
		return false;
	nreq = w->size / REQ_SIZE;
	if (nreq == 0 || w->size % REQ_SIZE != 0)
		return false;
	pthread_mutex_lock(&fp.rmu);
	p = find(w->fh);
	if (p == NULL || nreq > (*p)->depth) {
		pthread_mutex_unlock(&fp.rmu);
		return false;
	}
	nonblock = (*p)->nonblock;
	if (nonblock)
		acc = fp.core.submit((*p)->sess, arg + sizeof(*w), nreq, &err);
	else
		acc = fp.core.submit_whole((*p)->sess, arg + sizeof(*w), nreq, &err);
	if (acc > 0) {
		(*p)->mtime_ns = now_ns();
		fp.core.poke((*p)->sess);	/* small requests completed at once */
	}
	pthread_mutex_unlock(&fp.rmu);
	if (acc > 0) {
		struct fuse_write_out out = { .size = (uint32_t)(acc * REQ_SIZE) };

		reply(in->unique, 0, &out, sizeof(out));
	} else if (err == 0 && nonblock) {
		reply(in->unique, EAGAIN, NULL, 0);
	} else if (err != 0 && err != EPERM) {
		reply(in->unique, err, NULL, 0);
	} else {
		return false;
	}
	atomic_fetch_add(&fp.writes, 1);
	return true;
}

/*
 * A read of whole responses from a registered file: answered here when
 * they are ready (a blocking read: all it asks for; a non-blocking one: any,
 * or EAGAIN).  A blocking read that must wait goes to Python.
 */
static bool
fast_read(const struct fuse_in_header *in, const unsigned char *arg, size_t len, unsigned char *out)
{
	const struct fuse_read_in *r = (const void *)arg;
	size_t want, min, got;
	struct entry **p;
	bool nonblock;

	if (len < sizeof(*r))
		return false;
	want = r->size / RESP_SIZE;
	if (want == 0 || r->size % RESP_SIZE != 0 || r->size > fp.bufsize)
		return false;
	pthread_mutex_lock(&fp.rmu);
	p = find(r->fh);
	/* A blocking read longer than the queue waits for several batches: Python's. */
	if (p == NULL || (!(*p)->nonblock && want > (*p)->depth)) {
		pthread_mutex_unlock(&fp.rmu);
		return false;
	}
	nonblock = (*p)->nonblock;
	min = nonblock ? 1 : want;
	got = fp.core.take_if((*p)->sess, out, want, min);
	if (got > 0) {
		(*p)->atime_ns = now_ns();
		fp.core.poke((*p)->sess);	/* room for blocked writers */
	}
	pthread_mutex_unlock(&fp.rmu);
	if (got > 0)
		reply(in->unique, 0, out, got * RESP_SIZE);
	else if (nonblock)
		reply(in->unique, EAGAIN, NULL, 0);
	else
		return false;
	atomic_fetch_add(&fp.reads, 1);
	return true;
}

static bool
try_fast(const unsigned char *msg, size_t n, unsigned char *out)
{
	const struct fuse_in_header *in = (const void *)msg;

	if (!atomic_load(&fp.enabled) || n < sizeof(*in) || in->len != n)
		return false;
	if (in->opcode == FUSE_WRITE)
		return fast_write(in, msg + sizeof(*in), n - sizeof(*in));
	if (in->opcode == FUSE_READ)
		return fast_read(in, msg + sizeof(*in), n - sizeof(*in), out);
	return false;
}

/* --- the queue to pyfuse3 ----------------------------------------------- */

static void
efd_set(void)
{
	uint64_t one = 1;

	(void)write(fp.efd, &one, sizeof(one));
}

static void
efd_clear(void)
{
	uint64_t v;

	(void)read(fp.efd, &v, sizeof(v));
}

/* Queue len bytes of msg (or, with msg NULL, the status len). 0 or ENOMEM. */
static int
forward(const unsigned char *data, ssize_t len)
{
	struct msg *m = malloc(sizeof(*m) + (len > 0 ? (size_t)len : 0));

	if (m == NULL)
		return ENOMEM;
	m->next = NULL;
	m->len = len;
	if (len > 0)
		memcpy(m->data, data, (size_t)len);
	pthread_mutex_lock(&fp.qmu);
	if (fp.qhead == NULL)
		efd_set();
	*fp.qtail = m;
	fp.qtail = &m->next;
	pthread_mutex_unlock(&fp.qmu);
	atomic_fetch_add(&fp.forwarded, 1);
	return 0;
}

static void
on_wake(int sig)
{
	(void)sig;	/* only interrupts the read */
}

static void *
reader_main(void *arg)
{
	unsigned char *buf = arg, *out = buf + fp.bufsize;
	sigset_t wake;

	sigemptyset(&wake);
	sigaddset(&wake, WAKE_SIGNAL);
	pthread_sigmask(SIG_UNBLOCK, &wake, NULL);
	while (!atomic_load(&fp.stopping)) {
		ssize_t n = read(fp.fd, buf, fp.bufsize);

		if (n < 0) {
			int e = errno;

			if (e == EINTR || e == EAGAIN || e == ENOENT)
				continue;	/* as libfuse: retry */
			/* ENODEV: unmounted; anything else ends the loop as in libfuse. */
			while (forward(NULL, e == ENODEV ? 0 : -e) != 0)
				usleep(1000);
			break;
		}
		if (try_fast(buf, (size_t)n, out))
			continue;
		while (forward(buf, n) != 0)
			usleep(1000);	/* out of memory: never drop a request */
	}
	free(buf);
	return NULL;
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

static int
start(struct fuse_session *se, int fd)
{
	sigset_t all, old, wake;
	unsigned char *bufs;
	int err;

	sigemptyset(&wake);
	sigaddset(&wake, WAKE_SIGNAL);
	fp.bufsize = (size_t)MAX_PAGES * (size_t)sysconf(_SC_PAGESIZE) + HEADER_ROOM;
	if ((err = install_wake_handler()) != 0)
		return err;
	fp.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	bufs = malloc(2 * fp.bufsize);	/* the request, and responses to send */
	if (fp.efd < 0 || bufs == NULL) {
		err = bufs == NULL ? ENOMEM : errno;
		free(bufs);
		if (fp.efd >= 0)
			close(fp.efd);
		fp.efd = -1;
		return err;
	}
	fp.se = se;
	fp.fd = fd;
	atomic_store(&fp.stopping, false);
	/* Signals stay with the Python thread (the thread unblocks WAKE_SIGNAL). */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&fp.tid, NULL, reader_main, bufs);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0) {
		free(bufs);
		close(fp.efd);
		fp.efd = -1;
		fp.se = NULL;
		return err;
	}
	pthread_setname_np(fp.tid, "dmoverfs-fuse");
	fp.running = true;
	/* A stray SIGURG then interrupts the reader only, not the event loop. */
	pthread_sigmask(SIG_BLOCK, &wake, NULL);
	return 0;
}

static void
stop(void)
{
	struct msg *m, *next;

	atomic_store(&fp.enabled, false);
	atomic_store(&fp.stopping, true);
	/* Resent until it lands: one sent just before the thread entered read() is lost. */
	for (;;) {
		struct timespec until;

		pthread_kill(fp.tid, WAKE_SIGNAL);
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_nsec += STOP_RETRY_NS;
		if (until.tv_nsec >= 1000000000) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000;
		}
		if (pthread_timedjoin_np(fp.tid, NULL, &until) == 0)
			break;
	}
	fp.running = false;
	for (m = fp.qhead; m != NULL; m = next) {
		next = m->next;
		free(m);
	}
	fp.qhead = NULL;
	fp.qtail = &fp.qhead;
	close(fp.efd);
	fp.efd = -1;
	fp.se = NULL;
}

static bool
serving(const struct fuse_session *se)
{
	return fp.running && fp.se == se;
}

/* --- the interposers ---------------------------------------------------- */

int
fuse_session_fd(struct fuse_session *se)
{
	session_fd_fn *real;
	int fd;

	*(void **)&real = dlsym(RTLD_NEXT, "fuse_session_fd");
	if (real == NULL)
		return -1;
	if (serving(se))
		return fp.efd;
	fd = real(se);
	/* Without the core's entry points the thread could only forward. */
	if (!fp.wanted || !fp.have_core || fd < 0 || fp.se != NULL || start(se, fd) != 0)
		return fd;
	return fp.efd;
}

int
fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
	receive_buf_fn *real;
	struct msg *m;
	ssize_t len;

	if (!serving(se)) {
		*(void **)&real = dlsym(RTLD_NEXT, "fuse_session_receive_buf");
		return real == NULL ? -ENOSYS : real(se, buf);
	}
	/* Every buffer pyfuse3 passes was allocated here, bufsize bytes. */
	if (buf->mem == NULL && (buf->mem = malloc(fp.bufsize)) == NULL)
		return -ENOMEM;
	pthread_mutex_lock(&fp.qmu);
	m = fp.qhead;
	if (m == NULL) {
		efd_clear();
		pthread_mutex_unlock(&fp.qmu);
		return -EINTR;		/* pyfuse3 waits again */
	}
	len = m->len;
	if (len <= 0) {
		/* Stays queued: every task of pyfuse3 sees the end. */
		pthread_mutex_unlock(&fp.qmu);
		if (len == 0)
			fuse_session_exit(se);
		return (int)len;
	}
	fp.qhead = m->next;
	if (fp.qhead == NULL) {
		fp.qtail = &fp.qhead;
		efd_clear();
	}
	pthread_mutex_unlock(&fp.qmu);
	memcpy(buf->mem, m->data, (size_t)len);
	buf->size = (size_t)len;
	buf->flags = 0;
	buf->pos = 0;
	free(m);
	return (int)len;
}

void
fuse_session_destroy(struct fuse_session *se)
{
	session_destroy_fn *real;

	if (serving(se))
		stop();
	*(void **)&real = dlsym(RTLD_NEXT, "fuse_session_destroy");
	if (real != NULL)
		real(se);
}

/* --- control from Python ------------------------------------------------ */

int
dmoverfs_fast_prepare(const struct dmoverfs_fast_core *core)
{
	if (core == NULL || core->submit == NULL || core->submit_whole == NULL || core->take_if == NULL || core->poke == NULL)
		return EINVAL;
	if (fp.running)
		return EBUSY;
	fp.core = *core;
	fp.have_core = true;
	fp.wanted = true;
	atomic_store(&fp.enabled, true);
	return 0;
}

void
dmoverfs_fast_enable(int on)
{
	atomic_store(&fp.enabled, on != 0);
}

int
dmoverfs_fast_running(void)
{
	return fp.running && atomic_load(&fp.enabled);
}

void
dmoverfs_fast_stats(struct dmoverfs_fast_stats *out)
{
	out->writes = atomic_load(&fp.writes);
	out->reads = atomic_load(&fp.reads);
	out->errors = atomic_load(&fp.errors);
	out->forwarded = atomic_load(&fp.forwarded);
}
