/*
 * io.c - the one rule for a session's read, write and poll.
 *
 * The server's transport hands the core every read, write and poll the
 * kernel sends for a session, with the kernel's facts about it (request id,
 * calling thread, the file's O_NONBLOCK).  Here, and only here, each call is
 * answered at once, failed, or parked until the session changes: responses
 * arriving wake parked reads, room freed by a read lets parked writes go on,
 * and both wake the kernel's pollers.  A parked call costs a small record,
 * never a thread.
 *
 * Writes are submitted by one thread at a time per session (the "pump"): the
 * thread that brought the write when it may touch the client's memory, else
 * a worker.  Other writes queue behind it in order.  A write accepts requests
 * as room allows (NetBSD's dmio_write loop) and is answered once all are in,
 * or with the count accepted when it fails, is non-blocking, or is
 * interrupted.
 *
 * Signals: when a caller blocked here gets a signal, the kernel sends
 * FUSE_INTERRUPT once, then keeps the caller waiting until the answer.  The
 * caller's pending signals (/proc/TID/status) decide: a fatal one (the kernel
 * has queued SIGKILL to every thread of the group) or one a handler will
 * catch ends the call with EINTR (or with what it already has); any other
 * (SIGSTOP, SIGCONT, ignored signals) leaves it waiting, as a pipe would, and
 * the call is looked at again every RECHECK_NS so that a later fatal or
 * handled signal - which brings no second FUSE_INTERRUPT - still ends it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dmint.h"

#define REQ		sizeof(struct dmio_usrreq)
#define RESP		sizeof(struct dmio_usrresp)
#define EV_IN		(POLLIN | POLLRDNORM)
#define EV_OUT		(POLLOUT | POLLWRNORM)
#define EV_ALL		(EV_IN | EV_OUT)
#define RECHECK_NS	((int64_t)200000000)	/* look at a waiting caller's signals again */
#define RECHECK_BATCH	4096			/* callers looked at per round, at most */

/* What a caller's pending signals mean for its blocked call. */
enum verdict { V_WAIT, V_HANDLED, V_FATAL };

/* --- the live calls, by request id (core->iomu) --------------------------- */

static size_t
bucket_of(uint64_t unique, size_t nbuckets)
{
	return (size_t)((unique * 0x9e3779b97f4a7c15u) >> 32) & (nbuckets - 1);
}

static int
live_grow(dm_core *c)
{
	size_t n = c->cbuckets ? c->cbuckets * 2 : 256;
	struct dm_call **t = calloc(n, sizeof(*t));

	if (t == NULL)
		return ENOMEM;
	for (size_t i = 0; i < c->cbuckets; i++) {
		struct dm_call *k, *next;

		for (k = c->ctab[i]; k != NULL; k = next) {
			next = k->hnext;
			k->hnext = t[bucket_of(k->unique, n)];
			t[bucket_of(k->unique, n)] = k;
		}
	}
	free(c->ctab);
	c->ctab = t;
	c->cbuckets = n;
	return 0;
}

static int
live_add(dm_core *c, struct dm_call *k)
{
	size_t b;

	if (c->ncalls >= c->cbuckets && live_grow(c) != 0 && c->cbuckets == 0)
		return ENOMEM;
	b = bucket_of(k->unique, c->cbuckets);
	k->hnext = c->ctab[b];
	c->ctab[b] = k;
	c->ncalls++;
	return 0;
}

static struct dm_call *
live_find(dm_core *c, uint64_t unique)
{
	if (c->cbuckets == 0)
		return NULL;
	for (struct dm_call *k = c->ctab[bucket_of(unique, c->cbuckets)]; k != NULL; k = k->hnext)
		if (k->unique == unique)
			return k;
	return NULL;
}

static void
live_del(dm_core *c, struct dm_call *k)
{
	struct dm_call **p = &c->ctab[bucket_of(k->unique, c->cbuckets)];

	while (*p != NULL && *p != k)
		p = &(*p)->hnext;
	if (*p == k) {
		*p = k->hnext;
		c->ncalls--;
	}
	if (k->waiting_signal) {
		k->waiting_signal = false;
		c->nsignal--;
	}
}

/* --- a session's queues (core->iomu) -------------------------------------- */

static void
queue_add(struct dm_call **head, struct dm_call **tail, struct dm_call *k)
{
	k->next = NULL;
	k->prev = *tail;
	if (*tail != NULL)
		(*tail)->next = k;
	else
		*head = k;
	*tail = k;
}

static void
queue_del(struct dm_call **head, struct dm_call **tail, struct dm_call *k)
{
	if (k->prev != NULL)
		k->prev->next = k->next;
	else
		*head = k->next;
	if (k->next != NULL)
		k->next->prev = k->prev;
	else
		*tail = k->prev;
	k->next = k->prev = NULL;
}

/* Take k off its session and the live table; it is the caller's to answer. */
static void
detach(dm_core *c, struct dm_call *k)
{
	dm_sess *s = k->sess;

	if (k->write)
		queue_del(&s->whead, &s->wtail, k);
	else
		queue_del(&s->rhead, &s->rtail, k);
	live_del(c, k);
	if (k->write)
		c->io.waiting_writes -= k->parked;
	else
		c->io.waiting_reads -= k->parked;
}

/* --- answering (never under core->iomu) ----------------------------------- */

/* Count an answer: every answer goes through send_write or send_read. */
static void
count_answer(dm_core *c, bool write, int err, size_t done)
{
	atomic_fetch_add(write ? &c->io_writes : &c->io_reads, 1);
	if (err != 0 && done == 0)
		atomic_fetch_add(&c->io_errors, 1);
}

static void
send_write(dm_core *c, uint64_t unique, int err, size_t accepted)
{
	count_answer(c, true, err, accepted);
	/* Accepted requests are always reported: the error goes with the next write. */
	if (accepted > 0)
		err = 0;
	c->sink.answer_write(c->sink.ctx, unique, err, accepted * REQ);
}

static void
send_read(dm_core *c, uint64_t unique, int err, const void *data, size_t taken)
{
	count_answer(c, false, err, taken);
	if (taken > 0)
		err = 0;
	c->sink.answer_read(c->sink.ctx, unique, err, data, taken * RESP);
}

/* Free a call no longer in any list. */
static void
call_free(dm_core *c, struct dm_call *k)
{
	if (k->peer != NULL) {
		dm_peer_unpin(k->peer);
		dm_peer_unref(k->peer);
	}
	if (k->charged > 0)
		dm_core_meta_release(c, k->sess->user, k->charged);
	free(k->buf);
	free(k);
}

/* Answer k with its result (err when it has nothing) and free it. */
static void
finish(dm_core *c, struct dm_call *k)
{
	/* Answered, the writer leaves its write: its tid no longer names its space for sure. */
	if (k->peer != NULL)
		dm_peer_unpin(k->peer);
	if (k->write)
		send_write(c, k->unique, k->aerr, k->done);
	else
		send_read(c, k->unique, k->aerr, k->buf, k->done);
	call_free(c, k);
}

/* Answer every call on the chain (linked by next), in the order they were pushed. */
static void
finish_chain(dm_core *c, struct dm_call *chain)
{
	struct dm_call *reversed = NULL;

	while (chain != NULL) {
		struct dm_call *k = chain;

		chain = k->next;
		k->next = reversed;
		reversed = k;
	}
	chain = reversed;
	while (chain != NULL) {
		struct dm_call *k = chain;

		chain = k->next;
		finish(c, k);
	}
}

static void
chain_push(struct dm_call **chain, struct dm_call *k, int err)
{
	k->aerr = err;
	k->next = *chain;
	*chain = k;
}

/* The poll handles of s to wake, taken off it (call under iomu). */
static unsigned
take_polls(dm_sess *s, uint64_t **out)
{
	unsigned n = s->npolls;

	*out = NULL;
	if (n == 0)
		return 0;
	*out = s->polls;
	s->polls = NULL;
	s->npolls = s->cpolls = 0;
	return n;
}

static void
wake_polls(dm_core *c, uint64_t *kh, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		c->sink.wake_poll(c->sink.ctx, kh[i]);
	atomic_fetch_add(&c->io_wakeups, n);
	free(kh);
}

/* --- the rule ------------------------------------------------------------- */

/*
 * How many whole structs of unit bytes a transfer of len serves; false when
 * it holds none (EINVAL).  The kernel cuts a write or read anywhere: at its
 * transfer size, or where a scattered buffer's pages run out (a writev of
 * 39-byte segments, one a page, comes as pieces of 256 pages).  A piece is
 * served by its whole structs and the rest comes back short, for the
 * client's next call, as a pipe does.
 */
static bool
whole_structs(size_t len, size_t unit, size_t *count)
{
	*count = len / unit;
	return len == 0 || *count > 0;
}

/* Shutting down, or the session closed: what waits ends with ENXIO (iomu). */
static bool
ending(dm_sess *s)
{
	return s->core->down || s->closing;
}

/* Can s serve calls now?  0, or the errno every call gets. */
static int
usable(dm_sess *s)
{
	int func;
	bool external;

	if (s->core->down)
		return ENXIO;
	return dm_sess_fn(s, &func, &external) == NULL ? ENXIO : 0;
}

/*
 * The checks every read and write passes first, in NetBSD's order: a whole
 * number of structs of unit bytes (*count of them), then a function.  A call
 * past them is stamped in *stamp (atime or mtime), EAGAIN and failing
 * requests included.  0 or the errno.
 */
static int
admit(dm_sess *s, size_t len, size_t unit, size_t *count, atomic_int_fast64_t *stamp)
{
	int err = whole_structs(len, unit, count) ? usable(s) : EINVAL;

	if (err == 0)
		atomic_store(stamp, dm_clock_ns(CLOCK_REALTIME));
	return err;
}

static bool
call_nonblock(dm_sess *s, const struct dm_call_in *in)
{
	return in->nonblock != 0 || atomic_load(&s->nonblock);
}

/*
 * Take responses into dest for a read that has *done of want: a blocking read
 * takes them only once all it still needs (or a whole queue's worth, for a
 * read longer than the queue) are ready, so an interrupted read never holds
 * responses it could lose.  True when the read is complete.
 */
static bool
read_fill(dm_sess *s, unsigned char *dest, size_t want, size_t *done, bool nonblock)
{
	while (*done < want) {
		size_t left = want - *done;
		size_t min = nonblock ? 1 : left < s->depth ? left : s->depth;
		size_t n = dm_sess_take_some(s, dest + *done * RESP, left, min);

		if (n == 0)
			break;
		*done += n;
		if (nonblock)
			break;
	}
	return *done == want;
}

/* Ready responses of s (under iomu, with s->mu inside). */
static unsigned
ready_now(dm_sess *s)
{
	unsigned ready;

	dm_sess_counts(s, NULL, &ready);
	return ready;
}

/* Would a blocking read of s that has done of want take something now? */
static bool
read_can_progress(dm_sess *s, const struct dm_call *k)
{
	size_t left = k->want - k->done;
	size_t min = left < s->depth ? left : s->depth;

	return ready_now(s) >= min;
}

void
dm_sess_call_read(dm_sess *s, const struct dm_call_in *in, size_t len, void *scratch)
{
	dm_core *c = s->core;
	struct dm_call *k;
	size_t want, done = 0;
	bool nonblock = call_nonblock(s, in), complete;
	int err;

	err = admit(s, len, RESP, &want, &s->atime_ns);
	if (err != 0 || want == 0) {
		send_read(c, in->unique, err, NULL, 0);
		return;
	}
	pthread_mutex_lock(&c->iomu);
	/* Blocking readers are served in order: a new one waits behind the parked. */
	complete = nonblock || s->rhead == NULL ?
	    read_fill(s, scratch, want, &done, nonblock) || nonblock : false;
	if (complete) {
		bool kick = done > 0 && (s->whead != NULL || s->npolls > 0);

		pthread_mutex_unlock(&c->iomu);
		send_read(c, in->unique, EAGAIN, scratch, done);
		if (kick)
			dm_io_kick(s);	/* room for writers, news for pollers */
		return;
	}
	if (c->sink.is_own_thread != NULL && c->sink.is_own_thread(c->sink.ctx, in->tid)) {
		/* The server faulting on a mapping of a session file: waiting here
		 * would wait on itself. */
		pthread_mutex_unlock(&c->iomu);
		send_read(c, in->unique, EIO, scratch, done);
		return;
	}
	k = calloc(1, sizeof(*k));
	if (k != NULL) {
		k->sess = s;
		k->unique = in->unique;
		k->tid = in->tid;
		k->want = want;
		k->done = done;
		k->parked = 1;
	}
	if (k == NULL || (done > 0 && (k->buf = malloc(want * RESP)) == NULL) || live_add(c, k) != 0) {
		/* Responses taken into scratch still go to the caller. */
		pthread_mutex_unlock(&c->iomu);
		if (k != NULL)
			free(k->buf);
		free(k);
		send_read(c, in->unique, ENOMEM, scratch, done);
		return;
	}
	if (done > 0)
		memcpy(k->buf, scratch, done * RESP);
	queue_add(&s->rhead, &s->rtail, k);
	c->io.waiting_reads++;
	c->io.parked_reads++;
	pthread_mutex_unlock(&c->iomu);
	if (done > 0)
		dm_io_kick(s);
}

/* Take k off its session and answer it with err: called under iomu, returns
 * without it. */
static void
end_call(dm_core *c, struct dm_call *k, int err)
{
	struct dm_call *chain = NULL;

	detach(c, k);
	pthread_mutex_unlock(&c->iomu);
	chain_push(&chain, k, err);
	finish_chain(c, chain);
}

/*
 * Keep k's requests past the caller's buffer: 0, or EAGAIN when the copy
 * would pass the cap on request metadata (waiting writes count against it,
 * so that threads blocked in write() cannot grow the server without bound),
 * or ENOMEM.
 */
static int
own(dm_core *c, struct dm_call *k)
{
	size_t n = k->want * REQ;

	if (k->buf != NULL || !k->write)
		return 0;
	if (dm_core_meta_reserve(c, k->sess->user, n) != 0)
		return EAGAIN;
	if ((k->buf = malloc(n)) == NULL) {
		dm_core_meta_release(c, k->sess->user, n);
		return ENOMEM;
	}
	k->charged = n;
	memcpy(k->buf, k->data, n);
	k->data = k->buf;
	return 0;
}

/* Submit the queued writes of s until none can go on, or until a step's
 * decoding is spent: the rest is then a worker's, at the session's next
 * turn.  The caller owns the pump (s->pumping) and a session reference; x
 * is its context. */
static void
pump(dm_sess *s, struct dm_exec *x)
{
	dm_core *c = s->core;

	x->decode_left = DM_DECODE_STEP;
	for (;;) {
		struct dm_call *k, *chain = NULL;
		size_t room, n, acc;
		unsigned outstanding;
		int err = 0;

		pthread_mutex_lock(&c->iomu);
		k = s->whead;
		if (k == NULL) {
			s->pumping = false;
			pthread_mutex_unlock(&c->iomu);
			return;
		}
		if (k->answered || ending(s) || k->cancel) {
			detach(c, k);
			pthread_mutex_unlock(&c->iomu);
			if (k->answered) {
				call_free(c, k);
			} else {
				chain_push(&chain, k, ending(s) ? ENXIO : EINTR);
				finish_chain(c, chain);
			}
			continue;
		}
		dm_sess_counts(s, &outstanding, NULL);
		room = s->depth - outstanding;
		if (room == 0) {
			if (k->nonblock) {
				end_call(c, k, EAGAIN);
				continue;
			}
			/* Wait for a read to free room (dm_io_kick restarts the pump). */
			if ((err = own(c, k)) != 0) {
				end_call(c, k, err);
				continue;
			}
			if (!k->parked) {
				k->parked = 1;
				c->io.waiting_writes++;
				c->io.parked_writes++;
			}
			/* Non-blocking writes queued behind it would only wait: EAGAIN. */
			for (struct dm_call *b = k->next, *next; b != NULL; b = next) {
				next = b->next;
				if (b->nonblock) {
					detach(c, b);
					chain_push(&chain, b, EAGAIN);
				}
			}
			s->pumping = false;
			pthread_mutex_unlock(&c->iomu);
			finish_chain(c, chain);
			return;
		}
		k->busy = true;
		pthread_mutex_unlock(&c->iomu);

		n = k->want - k->done < room ? k->want - k->done : room;
		acc = dm_sess_submit_x(s, x, k->peer, k->data + k->done * REQ, n, &err);
		if (err == EPERM)
			dm_sess_note_eperm(s, k->tid);

		pthread_mutex_lock(&c->iomu);
		k->busy = false;
		k->done += acc;
		if (err != 0 || k->done == k->want || k->answered || k->cancel || ending(s)) {
			bool silent = k->answered;
			int why = err != 0 ? err : ending(s) ? ENXIO : EINTR;

			detach(c, k);
			pthread_mutex_unlock(&c->iomu);
			if (silent) {
				call_free(c, k);
			} else {
				chain_push(&chain, k, why);
				finish_chain(c, chain);
			}
		} else if (x->decode_left == 0) {
			/* The step is spent: keep the rest of the write and go on
			 * at the session's next turn (s->pumping stays set). */
			if ((err = own(c, k)) != 0) {
				end_call(c, k, err);
				continue;
			}
			pthread_mutex_unlock(&c->iomu);
			if (acc > 0)
				dm_io_kick(s);
			dm_core_enqueue_pump(c, s);
			return;
		} else {
			pthread_mutex_unlock(&c->iomu);
		}
		if (acc > 0)
			dm_io_kick(s);	/* requests run at once have responses */
	}
}

void
dm_sess_call_write(dm_sess *s, struct dm_exec *x, const struct dm_call_in *in, const void *data, size_t len)
{
	dm_core *c = s->core;
	struct dm_call *k;
	size_t nreq;
	int err;

	err = admit(s, len, REQ, &nreq, &s->mtime_ns);
	if (err != 0 || nreq == 0) {
		send_write(c, in->unique, err, 0);
		return;
	}
	/* The writer's thread is inside this write: its address space is exact. */
	if ((k = calloc(1, sizeof(*k))) == NULL || (k->peer = dm_peer_new(in->tid, -1, true, &s->cancel)) == NULL) {
		free(k);
		send_write(c, in->unique, ENOMEM, 0);
		return;
	}
	dm_peer_rights(k->peer, in->uid, in->gid);
	k->sess = s;
	k->unique = in->unique;
	k->tid = in->tid;
	k->write = true;
	k->nonblock = call_nonblock(s, in);
	k->want = nreq;
	k->data = data;

	pthread_mutex_lock(&c->iomu);
	/* A non-blocking write never waits behind one that waits for room. */
	if (ending(s))
		err = ENXIO;
	else if (k->nonblock && s->whead != NULL && !s->pumping)
		err = EAGAIN;
	else if (live_add(c, k) != 0)
		err = ENOMEM;
	if (err != 0) {
		pthread_mutex_unlock(&c->iomu);
		call_free(c, k);
		send_write(c, in->unique, err, 0);
		return;
	}
	queue_add(&s->whead, &s->wtail, k);
	if (s->pumping || k != s->whead || x == NULL) {
		/* It outlives this call: queued behind others, or for a worker. */
		if ((err = own(c, k)) != 0) {
			detach(c, k);
			pthread_mutex_unlock(&c->iomu);
			call_free(c, k);
			send_write(c, in->unique, err, 0);
			return;
		}
		if (!s->pumping) {
			s->pumping = true;
			pthread_mutex_unlock(&c->iomu);
			dm_core_enqueue_pump(c, s);
			return;
		}
		pthread_mutex_unlock(&c->iomu);
		return;
	}
	s->pumping = true;
	pthread_mutex_unlock(&c->iomu);
	dm_sess_ref(s);
	pump(s, x);
	dm_sess_unref(s);
}

void
dm_io_pump(dm_sess *s, struct dm_exec *x)
{
	pump(s, x);
}

void
dm_io_kick(dm_sess *s)
{
	dm_core *c = s->core;
	struct dm_call *k, *chain = NULL;
	uint64_t *kh;
	unsigned nkh;
	bool restart = false;

	if (!c->have_sink)
		return;
	pthread_mutex_lock(&c->iomu);
	while ((k = s->rhead) != NULL) {
		bool complete;

		if (!read_can_progress(s, k))
			break;
		if (k->buf == NULL && (k->buf = malloc(k->want * RESP)) == NULL) {
			detach(c, k);
			chain_push(&chain, k, ENOMEM);
			continue;
		}
		complete = read_fill(s, k->buf, k->want, &k->done, false);
		if (!complete)
			break;
		detach(c, k);
		chain_push(&chain, k, 0);
	}
	nkh = take_polls(s, &kh);
	if (s->whead != NULL && !s->pumping && !ending(s)) {
		unsigned outstanding;

		dm_sess_counts(s, &outstanding, NULL);
		if (outstanding < s->depth) {
			s->pumping = true;
			restart = true;
		}
	}
	pthread_mutex_unlock(&c->iomu);
	finish_chain(c, chain);
	if (nkh > 0)
		wake_polls(c, kh, nkh);
	if (restart)
		dm_core_enqueue_pump(c, s);
}

unsigned
dm_sess_call_poll(dm_sess *s, uint64_t kh, int notify)
{
	dm_core *c = s->core;
	unsigned outstanding, ready, events = 0;

	pthread_mutex_lock(&c->iomu);
	if (c->down) {
		events = EV_ALL;
	} else {
		dm_sess_counts(s, &outstanding, &ready);
		if (ready > 0)
			events |= EV_IN;
		if (outstanding < s->depth)
			events |= EV_OUT;
	}
	if (notify && !c->down) {
		bool known = false;

		for (unsigned i = 0; i < s->npolls && !known; i++)
			known = s->polls[i] == kh;
		if (!known && s->npolls == s->cpolls) {
			unsigned n = s->cpolls ? s->cpolls * 2 : 4;
			uint64_t *p = realloc(s->polls, n * sizeof(*p));

			if (p != NULL) {
				s->polls = p;
				s->cpolls = n;
			}
		}
		/* Out of memory: the handle is not kept and the poller times out. */
		if (!known && s->npolls < s->cpolls)
			s->polls[s->npolls++] = kh;
	}
	pthread_mutex_unlock(&c->iomu);
	atomic_fetch_add(&c->io_polls, 1);
	return events;
}

/* --- signals ------------------------------------------------------------- */

static uint64_t
hex_field(const char *text, const char *name)
{
	const char *p = strstr(text, name);

	return p != NULL ? strtoull(p + strlen(name), NULL, 16) : 0;
}

/*
 * What the signals pending for thread tid mean for its blocked call:
 * V_FATAL when a fatal signal is pending (the kernel queues SIGKILL to every
 * thread of a dying group), V_HANDLED for one the thread does not block and
 * has a handler for, V_WAIT for anything else.  *tgid: its process.  A
 * thread that cannot be looked at (it is gone) ends its call.
 */
static enum verdict
signal_verdict(int tid, int *tgid)
{
	char path[48], text[4096];
	uint64_t pending, caught, blocked;
	ssize_t n;
	int fd;
	const char *p;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return V_FATAL;
	n = read(fd, text, sizeof(text) - 1);
	close(fd);
	if (n <= 0)
		return V_FATAL;
	text[n] = '\0';
	if ((p = strstr(text, "\nTgid:")) != NULL)
		*tgid = atoi(p + 6);
	pending = hex_field(text, "\nSigPnd:") | hex_field(text, "\nShdPnd:");
	blocked = hex_field(text, "\nSigBlk:");
	caught = hex_field(text, "\nSigCgt:");
	if (pending & ((uint64_t)1 << (SIGKILL - 1)))
		return V_FATAL;
	return pending & caught & ~blocked ? V_HANDLED : V_WAIT;
}

/* Act on a verdict for live call k (under iomu); calls to answer go on chain. */
static void
judge(dm_core *c, struct dm_call *k, enum verdict v, struct dm_call **chain)
{
	if (v == V_WAIT) {
		if (!k->waiting_signal) {
			k->waiting_signal = true;
			c->nsignal++;
			c->io.interrupts_ignored++;
			pthread_cond_signal(&c->watchcv);
		}
		k->recheck_ns = dm_clock_ns(CLOCK_MONOTONIC) + RECHECK_NS;
		return;
	}
	c->io.interrupts_eintr++;
	if (k->write && k->busy) {
		/* Its pump is in the client's memory.  A handled signal: the pump
		 * answers when back.  A dying caller must not wait for that (the
		 * memory may be a slow FUSE file): answer now, with what is known
		 * to be accepted, and let the pump drop the call. */
		if (k->waiting_signal) {
			k->waiting_signal = false;
			c->nsignal--;
		}
		if (v == V_FATAL && !k->answered) {
			k->answered = true;
			dm_peer_unpin(k->peer);
			send_write(c, k->unique, EINTR, k->done);
		} else {
			k->cancel = true;
		}
		return;
	}
	detach(c, k);
	chain_push(chain, k, EINTR);
}

void
dm_core_call_interrupt(dm_core *c, uint64_t unique)
{
	struct dm_call *k, *chain = NULL;
	enum verdict v;
	int tid, tgid = 0;

	pthread_mutex_lock(&c->iomu);
	k = live_find(c, unique);
	if (k == NULL) {
		/* Answered already, or not a session call: nothing to do. */
		pthread_mutex_unlock(&c->iomu);
		return;
	}
	tid = k->tid;
	c->io.interrupts++;
	pthread_mutex_unlock(&c->iomu);

	v = signal_verdict(tid, &tgid);

	pthread_mutex_lock(&c->iomu);
	if ((k = live_find(c, unique)) != NULL) {
		k->tgid = tgid;
		judge(c, k, v, &chain);
	}
	pthread_mutex_unlock(&c->iomu);
	finish_chain(c, chain);
}

/* A call that needs a second look: its request id and thread. */
struct due {
	uint64_t unique;
	int tid, tgid;
	enum verdict v;
};

static void *
watch_main(void *arg)
{
	dm_core *c = arg;
	struct due *due = malloc(RECHECK_BATCH * sizeof(*due));

	pthread_mutex_lock(&c->iomu);
	while (c->watching) {
		struct dm_call *chain = NULL;
		struct timespec until;
		int64_t now;
		size_t n = 0;

		/* A tick: workers stuck in a client's memory, then callers to look at again. */
		clock_gettime(CLOCK_MONOTONIC, &until);
		until.tv_nsec += RECHECK_NS / 2;
		until.tv_sec += until.tv_nsec / 1000000000;
		until.tv_nsec %= 1000000000;
		pthread_cond_timedwait(&c->watchcv, &c->iomu, &until);
		if (!c->watching)
			break;
		pthread_mutex_unlock(&c->iomu);
		dm_core_check_stalls(c);
		pthread_mutex_lock(&c->iomu);
		if (c->nsignal == 0 || due == NULL)
			continue;
		now = dm_clock_ns(CLOCK_MONOTONIC);
		for (size_t b = 0; b < c->cbuckets && n < RECHECK_BATCH; b++)
			for (struct dm_call *k = c->ctab[b]; k != NULL && n < RECHECK_BATCH; k = k->hnext)
				if (k->waiting_signal && k->recheck_ns <= now)
					due[n++] = (struct due){ k->unique, k->tid, k->tgid, V_WAIT };
		pthread_mutex_unlock(&c->iomu);

		/* One dying thread means a dying group: its other threads need no look. */
		for (size_t i = 0; i < n; i++) {
			for (size_t j = 0; j < i && due[i].v == V_WAIT; j++)
				if (due[j].v == V_FATAL && due[j].tgid != 0 && due[j].tgid == due[i].tgid)
					due[i].v = V_FATAL;
			if (due[i].v == V_WAIT)
				due[i].v = signal_verdict(due[i].tid, &due[i].tgid);
		}

		pthread_mutex_lock(&c->iomu);
		for (size_t i = 0; i < n; i++) {
			struct dm_call *k = live_find(c, due[i].unique);

			if (k != NULL && k->waiting_signal)
				judge(c, k, due[i].v, &chain);
		}
		if (chain != NULL) {
			pthread_mutex_unlock(&c->iomu);
			finish_chain(c, chain);
			pthread_mutex_lock(&c->iomu);
		}
	}
	pthread_mutex_unlock(&c->iomu);
	free(due);
	return NULL;
}

int
dm_io_start(dm_core *c)
{
	sigset_t all, old;
	int err;

	c->watching = true;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&c->watcher, NULL, watch_main, c);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0)
		c->watching = false;
	else
		c->have_watcher = true;
	return err;
}

void
dm_io_stop(dm_core *c)
{
	if (!c->have_watcher)
		return;
	pthread_mutex_lock(&c->iomu);
	c->watching = false;
	pthread_cond_broadcast(&c->watchcv);
	pthread_mutex_unlock(&c->iomu);
	pthread_join(c->watcher, NULL);
	c->have_watcher = false;
}

/* --- shutdown and close ---------------------------------------------------- */

/* Take every call of s that is not in a pump's hands onto chain (under iomu). */
static void
drain_calls(dm_core *c, dm_sess *s, int err, struct dm_call **chain)
{
	struct dm_call *k, *next;

	for (k = s->rhead; k != NULL; k = next) {
		next = k->next;
		detach(c, k);
		chain_push(chain, k, err);
	}
	for (k = s->whead; k != NULL; k = next) {
		next = k->next;
		if (k->busy) {
			k->cancel = true;	/* its pump answers */
			continue;
		}
		if (s->pumping && k == s->whead)
			continue;		/* a pump is about to take it: it sees down */
		detach(c, k);
		chain_push(chain, k, err);
	}
}

void
dm_core_shutdown(dm_core *c)
{
	struct dm_call *chain = NULL;
	struct woken {
		uint64_t *kh;
		unsigned n;
	} *woken = NULL;
	size_t nwoken = 0, cap = 0;

	pthread_mutex_lock(&c->iomu);
	c->down = true;
	pthread_mutex_lock(&c->mu);
	for (dm_sess *s = c->sessions; s != NULL; s = s->snext) {
		drain_calls(c, s, ENXIO, &chain);
		if (s->npolls > 0) {
			if (nwoken == cap) {
				size_t n = cap ? cap * 2 : 16;
				struct woken *w = realloc(woken, n * sizeof(*w));

				if (w == NULL)
					continue;
				woken = w;
				cap = n;
			}
			woken[nwoken].n = take_polls(s, &woken[nwoken].kh);
			nwoken++;
		}
	}
	pthread_mutex_unlock(&c->mu);
	pthread_mutex_unlock(&c->iomu);
	if (c->have_sink) {
		finish_chain(c, chain);
		for (size_t i = 0; i < nwoken; i++)
			wake_polls(c, woken[i].kh, woken[i].n);
	} else {
		for (size_t i = 0; i < nwoken; i++)
			free(woken[i].kh);
	}
	free(woken);
}

void
dm_io_close(dm_sess *s)
{
	dm_core *c = s->core;
	struct dm_call *chain = NULL;
	uint64_t *kh;

	pthread_mutex_lock(&c->iomu);
	s->closing = true;
	drain_calls(c, s, ENXIO, &chain);
	take_polls(s, &kh);
	pthread_mutex_unlock(&c->iomu);
	free(kh);
	if (c->have_sink)
		finish_chain(c, chain);
	else
		while (chain != NULL) {
			struct dm_call *k = chain;

			chain = k->next;
			call_free(c, k);
		}
}

/* Every call still live when the core goes away: nobody can answer them. */
void
dm_io_free_all(dm_core *c)
{
	for (size_t b = 0; b < c->cbuckets; b++) {
		while (c->ctab[b] != NULL) {
			struct dm_call *k = c->ctab[b];

			c->ctab[b] = k->hnext;
			call_free(c, k);
		}
	}
	free(c->ctab);
	c->ctab = NULL;
	c->cbuckets = c->ncalls = 0;
}

void
dm_core_set_sink(dm_core *c, const struct dm_sink *sink)
{
	c->sink = *sink;
	c->have_sink = true;
}

void
dm_core_io_stats(dm_core *c, struct dm_io_stats *out)
{
	pthread_mutex_lock(&c->iomu);
	*out = c->io;
	pthread_mutex_unlock(&c->iomu);
	out->reads = atomic_load(&c->io_reads);
	out->writes = atomic_load(&c->io_writes);
	out->errors = atomic_load(&c->io_errors);
	out->polls = atomic_load(&c->io_polls);
	out->poll_wakeups = atomic_load(&c->io_wakeups);
}
