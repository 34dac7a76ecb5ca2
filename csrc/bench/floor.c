/*
 * floor.c - the floor server of the dmoverfs benchmark.
 *
 * The least a C server on libfuse's low-level API has to do to serve the
 * `zero` function of the dmoverio wire format, so that the benchmark can
 * compare dmoverfs with the cost of the FUSE transport plus the unavoidable
 * work.  The client protocol is the same as with dmoverfs:
 *
 *   - `dmoverio` in the root is a clone file: every lookup makes a session
 *     with an inode of its own (entry and attr timeouts 0), so every open()
 *     is a new session; sessions are freed at the last forget and release;
 *   - fsetxattr(fd, "user.dmover.function", "zero") selects the function
 *     (ESRCH for any other, EBUSY when set); "user.dmover.nonblock" or
 *     O_NONBLOCK at open make reads and writes non-blocking;
 *   - opens are direct_io and answered FOPEN_STREAM, as dmoverfs does;
 *   - write(): whole struct dmio_usrreq (40 bytes) only; the iovec arrays of
 *     up to DEPTH requests are read with one process_vm_readv, the outputs of
 *     all of them are zeroed with as few process_vm_writev calls as the
 *     iovec limits allow (one for a batch of 64 small requests), and the
 *     responses queued;
 *   - at most DEPTH requests outstanding: a blocking write waits (deferred
 *     reply) for room;
 *   - read(): whole struct dmio_usrresp (16 bytes) only; a blocking read
 *     returns when its buffer is full (deferred reply), a non-blocking one
 *     what is ready or EAGAIN;
 *   - a waiting read or write answers FUSE_INTERRUPT (EINTR, or what it has
 *     done so far), so a client can always be killed.
 *
 * Simplifications a benchmark can afford: one waiting reader and one
 * waiting writer per session (a second gets EBUSY); the client is named by
 * its pid, not held by a pidfd.
 *
 * Usage: floor [-m] [-r FD] [-d] MOUNTPOINT
 *   -m     serve with fuse_session_loop_mt (default: one thread)
 *   -r FD  write "ready\n" to FD once FUSE_INIT is answered, then close it
 *   -d     libfuse debug output
 * It runs in the foreground until SIGTERM/SIGINT/SIGHUP or unmount.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35

#include <fuse_lowlevel.h>
#include <linux/fuse.h>

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define DEPTH		DMIO_NREQS_MAX		/* requests outstanding per session */
#define MAX_IOV		1024			/* IOV_MAX: segments per list and per syscall */
#define ZERO_BYTES	((size_t)256 << 10)	/* one local iovec of zeros */
#define CALL_BYTES	(MAX_IOV * ZERO_BYTES)	/* bytes per process_vm_writev */
#define REQ_SIZE	sizeof(struct dmio_usrreq)
#define RESP_SIZE	sizeof(struct dmio_usrresp)
#define CLONE_NAME	"dmoverio"

_Static_assert(REQ_SIZE == 40 && RESP_SIZE == 16, "wire format");

struct sess {
	pthread_mutex_t mu;		/* everything below */
	unsigned long nlookup;		/* kernel references (lookups not yet forgotten) */
	unsigned opens;			/* open files */
	pid_t pid;			/* the opener's process */
	uid_t uid;
	gid_t gid;
	bool func_set;
	bool nonblock;
	struct timespec ctime;
	struct dmio_usrresp ring[DEPTH];	/* ready responses */
	unsigned head, ready;		/* outstanding == ready: zero runs at once */
	/* the waiting reader, if any */
	fuse_req_t rd_req;
	bool rd_parking;		/* its interrupt callback is being registered */
	struct dmio_usrresp *rd_buf;
	size_t rd_want, rd_got;
	/* the waiting writer, if any */
	fuse_req_t wr_req;
	bool wr_parking;
	char *wr_buf;			/* the requests not accepted before it waited */
	size_t wr_base;			/* requests accepted before it waited */
	size_t wr_count, wr_done;
	int wr_err;
};

/* A decoded request of the batch being served. */
struct job {
	const struct dmio_usrreq *wire;
	struct iovec *iov;		/* its output list, copied from the client */
	size_t cnt;
	int err;			/* its resp_error */
};

static const char zeros[ZERO_BYTES];
static int ready_fd = -1;

/* Scratch of one batch; per thread for -m. */
static _Thread_local struct job jobs[DEPTH];
static _Thread_local struct iovec iovs[DEPTH * MAX_IOV];
static _Thread_local struct iovec rem[MAX_IOV], loc[MAX_IOV];
static _Thread_local size_t seg_job[MAX_IOV];

static struct sess *
sess_of(fuse_ino_t ino)
{
	return (struct sess *)(uintptr_t)ino;
}

/* Unlock s, and free it when the kernel and every open file are done with it. */
static void
sess_unlock_maybe_free(struct sess *s)
{
	bool dead = s->nlookup == 0 && s->opens == 0;

	pthread_mutex_unlock(&s->mu);
	if (dead) {
		pthread_mutex_destroy(&s->mu);
		free(s);
	}
}

/* Call with s->mu held unless ino is the root. */
static void
fill_attr(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_blksize = 4096;
	st->st_uid = getuid();
	st->st_gid = getgid();
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
	} else {
		struct sess *s = sess_of(ino);

		st->st_mode = S_IFREG | (s->opens ? 0600 : 0666);
		st->st_nlink = 1;
		if (s->opens) {
			st->st_uid = s->uid;
			st->st_gid = s->gid;
		}
		st->st_ctim = st->st_mtim = st->st_atim = s->ctime;
	}
}

/* The process (thread group) of thread tid, or -1. */
static pid_t
thread_group(pid_t tid)
{
	char path[64], line[256];
	pid_t pid = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)tid);
	f = fopen(path, "re");
	if (f == NULL)
		return -1;
	while (fgets(line, sizeof(line), f) != NULL) {
		if (strncmp(line, "Tgid:", 5) == 0) {
			pid = (pid_t)strtol(line + 5, NULL, 10);
			break;
		}
	}
	fclose(f);
	return pid;
}

/* --- the work (call with s->mu held) ---------------------------------------- */

/* Zero the outputs of jobs[0..n) with as few process_vm_writev calls as the
 * iovec limits allow; a request the kernel stops in fails alone. */
static void
zero_outputs(pid_t pid, size_t n)
{
	size_t j = 0, v = 0, off = 0;

	while (j < n) {
		size_t nrem = 0, nloc, bytes = 0, i;
		ssize_t got;

		while (j < n && nrem < MAX_IOV && bytes < CALL_BYTES) {
			struct iovec *seg;
			size_t take;

			if (jobs[j].err != 0 || v == jobs[j].cnt) {
				j++;
				v = off = 0;
				continue;
			}
			seg = &jobs[j].iov[v];
			take = seg->iov_len - off;
			if (take > CALL_BYTES - bytes)
				take = CALL_BYTES - bytes;
			if (take > 0) {
				rem[nrem].iov_base = (char *)seg->iov_base + off;
				rem[nrem].iov_len = take;
				seg_job[nrem++] = j;
				bytes += take;
				off += take;
			}
			if (off == seg->iov_len) {
				v++;
				off = 0;
			}
		}
		if (nrem == 0)
			break;
		for (nloc = 0; nloc * ZERO_BYTES < bytes; nloc++) {
			size_t left = bytes - nloc * ZERO_BYTES;

			loc[nloc].iov_base = (void *)zeros;
			loc[nloc].iov_len = left < ZERO_BYTES ? left : ZERO_BYTES;
		}
		got = process_vm_writev(pid, loc, nloc, rem, nrem, 0);
		if (got == (ssize_t)bytes)
			continue;
		/* The request of the segment the kernel stopped in fails; the
		 * ones after it are tried again. */
		i = 0;
		if (got > 0) {
			size_t pos = 0;

			while (i + 1 < nrem && pos + rem[i].iov_len <= (size_t)got)
				pos += rem[i++].iov_len;
		}
		jobs[seg_job[i]].err = (got < 0 && errno == EPERM) ? EPERM : EFAULT;
		j = seg_job[i] + 1;
		v = off = 0;
	}
}

/* Read the iovec array of one request alone; 0 or the errno. */
static int
read_iov_one(pid_t pid, struct job *jb)
{
	struct iovec l = { jb->iov, jb->cnt * sizeof(struct iovec) };
	struct iovec r = { jb->wire->req_outbuf.dmbuf_iov, jb->cnt * sizeof(struct iovec) };
	ssize_t got;

	if (l.iov_len == 0)
		return 0;
	got = process_vm_readv(pid, &l, 1, &r, 1, 0);
	if (got == (ssize_t)l.iov_len)
		return 0;
	return (got < 0 && errno == EPERM) ? EPERM : EFAULT;
}

/*
 * Validate and run the want (<= DEPTH) requests at wire; returns how many
 * were accepted, *err the errno that refused the one after them.
 */
static size_t
run_batch(struct sess *s, const char *wire, size_t want, int *err)
{
	struct iovec liov, riov[DEPTH];
	size_t n, k, total = 0, used = 0;

	*err = 0;
	for (n = 0; n < want; n++) {
		struct job *jb = &jobs[n];

		jb->wire = (const struct dmio_usrreq *)(wire + n * REQ_SIZE);
		jb->cnt = jb->wire->req_outbuf.dmbuf_iovcnt;
		jb->err = 0;
		if (jb->cnt > MAX_IOV) {
			*err = EINVAL;
			break;
		}
		jb->iov = iovs + used;
		used += jb->cnt;
		riov[n].iov_base = jb->wire->req_outbuf.dmbuf_iov;
		riov[n].iov_len = jb->cnt * sizeof(struct iovec);
		total += riov[n].iov_len;
	}
	/* Every iovec array of the batch in one call; one by one only to
	 * find which request is at fault. */
	liov.iov_base = iovs;
	liov.iov_len = total;
	if (total > 0 && process_vm_readv(s->pid, &liov, 1, riov, n, 0) != (ssize_t)total) {
		for (k = 0; k < n; k++) {
			int e = read_iov_one(s->pid, &jobs[k]);

			if (e != 0) {
				*err = e;
				n = k;
				break;
			}
		}
	}
	for (k = 0; k < n; k++) {
		size_t sum = 0, v;

		for (v = 0; v < jobs[k].cnt; v++) {
			if (jobs[k].iov[v].iov_len > (size_t)SSIZE_MAX - sum)
				break;
			sum += jobs[k].iov[v].iov_len;
		}
		if (v < jobs[k].cnt) {
			*err = EINVAL;	/* lengths sum past SSIZE_MAX */
			n = k;
			break;
		}
		if (jobs[k].cnt == 0)
			jobs[k].err = EINVAL;	/* zero needs an output buffer */
	}
	zero_outputs(s->pid, n);
	for (k = 0; k < n; k++) {
		struct dmio_usrresp *r = &s->ring[(s->head + s->ready) % DEPTH];

		r->resp_id = jobs[k].wire->req_id;
		r->resp_error = jobs[k].err;
		memcpy(r->resp_immediate, jobs[k].wire->req_immediate, sizeof(r->resp_immediate));
		s->ready++;
	}
	return n;
}

/* Accept up to count requests while there is room; *err as run_batch. */
static size_t
submit(struct sess *s, const char *wire, size_t count, int *err)
{
	size_t done = 0;

	*err = 0;
	while (done < count && s->ready < DEPTH && *err == 0) {
		size_t want = count - done;

		if (want > DEPTH - s->ready)
			want = DEPTH - s->ready;
		done += run_batch(s, wire + done * REQ_SIZE, want, err);
	}
	return done;
}

/* Move up to max ready responses to out. */
static size_t
take(struct sess *s, struct dmio_usrresp *out, size_t max)
{
	size_t n = s->ready < max ? s->ready : max, i;

	for (i = 0; i < n; i++)
		out[i] = s->ring[(s->head + i) % DEPTH];
	s->head = (unsigned)((s->head + n) % DEPTH);
	s->ready -= (unsigned)n;
	return n;
}

/* --- waiting readers and writers (call with s->mu held) ---------------------- */

static void
finish_read(struct sess *s, int err)
{
	fuse_req_t req = s->rd_req;

	s->rd_req = NULL;
	if (s->rd_got > 0 || err == 0)
		fuse_reply_buf(req, (const char *)s->rd_buf, s->rd_got * RESP_SIZE);
	else
		fuse_reply_err(req, err);
	free(s->rd_buf);
	s->rd_buf = NULL;
}

static void
finish_write(struct sess *s, int err)
{
	fuse_req_t req = s->wr_req;
	size_t done = s->wr_base + s->wr_done;

	s->wr_req = NULL;
	if (done > 0)
		fuse_reply_write(req, done * REQ_SIZE);
	else
		fuse_reply_err(req, err);
	free(s->wr_buf);
	s->wr_buf = NULL;
}

/* Let the waiting reader and writer go as far as they can; answer them
 * when they are done (not while they are being parked). */
static void
progress(struct sess *s)
{
	bool moved = true;

	while (moved) {
		moved = false;
		if (s->rd_req != NULL && s->rd_got < s->rd_want && s->ready > 0) {
			s->rd_got += take(s, s->rd_buf + s->rd_got, s->rd_want - s->rd_got);
			moved = true;
		}
		if (s->rd_req != NULL && !s->rd_parking && s->rd_got == s->rd_want)
			finish_read(s, 0);
		if (s->wr_req != NULL && s->wr_err == 0 && s->wr_done < s->wr_count && s->ready < DEPTH) {
			size_t n = submit(s, s->wr_buf + s->wr_done * REQ_SIZE,
			    s->wr_count - s->wr_done, &s->wr_err);

			s->wr_done += n;
			moved = moved || n > 0;
		}
		if (s->wr_req != NULL && !s->wr_parking && (s->wr_err != 0 || s->wr_done == s->wr_count))
			finish_write(s, s->wr_err);
	}
}

static void
on_interrupt(fuse_req_t req, void *data)
{
	struct sess *s = data;

	pthread_mutex_lock(&s->mu);
	/* While parking, park() itself looks at the interrupt. */
	if (s->rd_req == req && !s->rd_parking)
		finish_read(s, EINTR);
	else if (s->wr_req == req && !s->wr_parking)
		finish_write(s, EINTR);
	pthread_mutex_unlock(&s->mu);
}

/*
 * Let req, published as the session's waiting reader or writer with its
 * parking flag set, wait.  The flag keeps everyone from answering it while
 * its interrupt callback is registered (libfuse may run the callback at
 * once, under its own lock); an interrupt that came in the meantime is
 * answered here.
 */
static void
park(struct sess *s, fuse_req_t req, bool *parking)
{
	fuse_req_interrupt_func(req, on_interrupt, s);
	pthread_mutex_lock(&s->mu);
	*parking = false;
	if (fuse_req_interrupted(req)) {
		if (s->rd_req == req)
			finish_read(s, EINTR);
		else
			finish_write(s, EINTR);
	} else {
		progress(s);
	}
	pthread_mutex_unlock(&s->mu);
}

/* --- FUSE operations --------------------------------------------------------- */

static void
op_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	(void)conn;
	if (ready_fd >= 0) {
		ssize_t n = write(ready_fd, "ready\n", 6);

		(void)n;
		close(ready_fd);
		ready_fd = -1;
	}
}

static void
op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	struct sess *s;

	if (parent != FUSE_ROOT_ID || strcmp(name, CLONE_NAME) != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	s = calloc(1, sizeof(*s));
	if (s == NULL) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	pthread_mutex_init(&s->mu, NULL);
	clock_gettime(CLOCK_REALTIME, &s->ctime);
	s->nlookup = 1;
	memset(&e, 0, sizeof(e));
	e.ino = (fuse_ino_t)(uintptr_t)s;
	e.attr_timeout = 0;
	e.entry_timeout = 0;
	fill_attr(e.ino, &e.attr);
	if (fuse_reply_entry(req, &e) != 0) {
		pthread_mutex_destroy(&s->mu);
		free(s);
	}
}

static void
forget_one(fuse_ino_t ino, uint64_t nlookup)
{
	struct sess *s;

	if (ino == FUSE_ROOT_ID)
		return;
	s = sess_of(ino);
	pthread_mutex_lock(&s->mu);
	s->nlookup -= nlookup;
	sess_unlock_maybe_free(s);
}

static void
op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	forget_one(ino, nlookup);
	fuse_reply_none(req);
}

static void
op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		forget_one(forgets[i].ino, forgets[i].nlookup);
	fuse_reply_none(req);
}

static void
op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino == FUSE_ROOT_ID) {
		fill_attr(ino, &st);
	} else {
		pthread_mutex_lock(&sess_of(ino)->mu);
		fill_attr(ino, &st);
		pthread_mutex_unlock(&sess_of(ino)->mu);
	}
	fuse_reply_attr(req, &st, 0);
}

static void
op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	struct fuse_open_out out;
	struct sess *s;
	pid_t pid;

	if (ino == FUSE_ROOT_ID) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	pid = thread_group(ctx->pid);
	if (pid <= 0) {
		fuse_reply_err(req, ESRCH);
		return;
	}
	s = sess_of(ino);
	pthread_mutex_lock(&s->mu);
	if (s->opens++ == 0) {
		s->pid = pid;
		s->uid = ctx->uid;
		s->gid = ctx->gid;
		s->nonblock = (fi->flags & O_NONBLOCK) != 0;
	}
	pthread_mutex_unlock(&s->mu);
	/* What fuse_reply_open would send, plus FOPEN_STREAM (as dmoverfs). */
	memset(&out, 0, sizeof(out));
	out.fh = ino;
	out.open_flags = FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM;
	fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

static void
op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct sess *s = sess_of(ino);

	(void)fi;
	pthread_mutex_lock(&s->mu);
	if (--s->opens == 0) {
		s->head = s->ready = 0;	/* unread responses are discarded */
		s->func_set = false;
	}
	sess_unlock_maybe_free(s);
	fuse_reply_err(req, 0);
}

static void
op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
    size_t size, int flags)
{
	struct sess *s;
	int err = 0;

	(void)flags;
	if (ino == FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOTSUP);
		return;
	}
	s = sess_of(ino);
	pthread_mutex_lock(&s->mu);
	if (s->opens == 0) {
		err = ENOTSUP;
	} else if (strcmp(name, DMOVERFS_XATTR_FUNCTION) == 0) {
		size_t len = strnlen(value, size);

		if (len > DMIO_MAX_FUNCNAME - 1)
			len = DMIO_MAX_FUNCNAME - 1;
		if (len != 4 || memcmp(value, "zero", 4) != 0)
			err = ESRCH;
		else if (s->func_set)
			err = EBUSY;
		else
			s->func_set = true;
	} else if (strcmp(name, DMOVERFS_XATTR_NONBLOCK) == 0) {
		if (size >= 1 && (value[0] == '0' || value[0] == '1'))
			s->nonblock = value[0] == '1';
		else
			err = EINVAL;
	} else {
		err = ENOTSUP;
	}
	pthread_mutex_unlock(&s->mu);
	fuse_reply_err(req, err);
}

static void
op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
    struct fuse_file_info *fi)
{
	struct sess *s = sess_of(ino);
	size_t count = size / REQ_SIZE, done = 0;
	int err = 0;

	(void)off;
	(void)fi;
	if (size % REQ_SIZE != 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	pthread_mutex_lock(&s->mu);
	if (!s->func_set)
		err = ENXIO;
	else if (s->wr_req != NULL)
		err = EBUSY;
	else
		done = submit(s, buf, count, &err);
	if (done > 0 && s->rd_req != NULL)
		progress(s);
	if (done < count && err == 0 && !s->nonblock)
		s->wr_buf = malloc((count - done) * REQ_SIZE);
	if (done == count || err != 0 || s->nonblock || s->wr_buf == NULL) {
		pthread_mutex_unlock(&s->mu);
		if (done > 0)
			fuse_reply_write(req, done * REQ_SIZE);
		else
			fuse_reply_err(req, err != 0 ? err : s->nonblock ? EAGAIN : ENOMEM);
		return;
	}
	/* Full: wait for a reader to make room. */
	memcpy(s->wr_buf, buf + done * REQ_SIZE, (count - done) * REQ_SIZE);
	s->wr_req = req;
	s->wr_parking = true;
	s->wr_base = done;
	s->wr_count = count - done;
	s->wr_done = 0;
	s->wr_err = 0;
	pthread_mutex_unlock(&s->mu);
	park(s, req, &s->wr_parking);
}

static void
op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct sess *s = sess_of(ino);
	struct dmio_usrresp out[DEPTH];
	size_t want = size / RESP_SIZE, n;
	int err = 0;

	(void)off;
	(void)fi;
	if (size % RESP_SIZE != 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	pthread_mutex_lock(&s->mu);
	if (!s->func_set)
		err = ENXIO;
	else if (s->rd_req != NULL)
		err = EBUSY;
	else if (want > s->ready && !s->nonblock && (s->rd_buf = malloc(want * RESP_SIZE)) == NULL)
		err = ENOMEM;
	if (err != 0) {
		pthread_mutex_unlock(&s->mu);
		fuse_reply_err(req, err);
		return;
	}
	if (s->rd_buf == NULL) {
		/* The common case: everything asked for is ready (or non-blocking). */
		n = take(s, out, want);
		if (s->wr_req != NULL)
			progress(s);	/* room was made for the waiting writer */
		pthread_mutex_unlock(&s->mu);
		if (n > 0 || want == 0)
			fuse_reply_buf(req, (const char *)out, n * RESP_SIZE);
		else
			fuse_reply_err(req, EAGAIN);
		return;
	}
	/* Wait until the buffer is full. */
	s->rd_req = req;
	s->rd_parking = true;
	s->rd_want = want;
	s->rd_got = take(s, s->rd_buf, want);
	if (s->wr_req != NULL)
		progress(s);
	pthread_mutex_unlock(&s->mu);
	park(s, req, &s->rd_parking);
}

static const struct fuse_lowlevel_ops ops = {
	.init = op_init,
	.lookup = op_lookup,
	.forget = op_forget,
	.forget_multi = op_forget_multi,
	.getattr = op_getattr,
	.open = op_open,
	.release = op_release,
	.read = op_read,
	.write = op_write,
	.setxattr = op_setxattr,
};

static void
usage(void)
{
	fprintf(stderr, "usage: floor [-m] [-r FD] [-d] MOUNTPOINT\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	char opts[] = "default_permissions,fsname=dmoverfs-floor,subtype=dmoverfs-floor";
	char dash_o[] = "-o", dash_d[] = "-d";
	char *fargv[] = { argv[0], dash_o, opts, NULL, NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se;
	bool mt = false;
	int opt, ret = 1;

	while ((opt = getopt(argc, argv, "mr:d")) != -1) {
		switch (opt) {
		case 'm':
			mt = true;
			break;
		case 'r':
			ready_fd = atoi(optarg);
			break;
		case 'd':
			fargv[args.argc++] = dash_d;
			break;
		default:
			usage();
		}
	}
	if (optind + 1 != argc)
		usage();

	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (se == NULL)
		return 1;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_destroy;
	if (fuse_session_mount(se, argv[optind]) != 0)
		goto out_signals;
	if (mt) {
		struct fuse_loop_config cfg = { .clone_fd = 0, .max_idle_threads = 10 };

		ret = fuse_session_loop_mt(se, &cfg);
	} else {
		ret = fuse_session_loop(se);
	}
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_destroy:
	fuse_session_destroy(se);
	return ret != 0;
}
