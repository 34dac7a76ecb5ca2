/*
 * sess.c - sessions: the response ring, submission, hand-out, reference
 * counting and close.
 *
 * outstanding counts accepted requests whose responses were not taken;
 * since ready <= outstanding <= depth, a ring of depth entries never
 * overflows.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dmint.h"

dm_sess *
dm_sess_open(dm_core *core, uint64_t id, int pid, int pidfd, uint32_t uid, unsigned depth, int *err)
{
	dm_sess *s;
	int64_t now = dm_clock_ns(CLOCK_REALTIME);

	/* An opener without a pidfd could not be told from a reused pid: refuse.
	 * No opener (pid 0) is for sessions written only through the transport. */
	*err = EINVAL;
	if (core == NULL || depth == 0 || pid < 0 || (pid > 0 && pidfd < 0))
		return NULL;
	*err = ENOMEM;
	s = calloc(1, sizeof(*s) + (size_t)depth * sizeof(s->ring[0]));
	if (s == NULL)
		return NULL;
	atomic_init(&s->cancel, false);
	if (pid > 0 && (s->opener = dm_peer_new(pid, pidfd, false, &s->cancel)) == NULL) {
		free(s);
		return NULL;
	}
	s->core = core;
	s->rqtail = &s->rqhead;
	s->id = id;
	pthread_mutex_init(&s->mu, NULL);
	s->func = -1;
	s->depth = depth;
	s->refs = 1;
	atomic_init(&s->nonblock, false);
	atomic_init(&s->atime_ns, now);
	atomic_init(&s->mtime_ns, now);
	atomic_init(&s->ctime_ns, now);
	atomic_init(&s->completed, 0);
	atomic_init(&s->failed, 0);
	atomic_init(&s->bytes, 0);
	/* Last: from here on the core's threads can see it. */
	if ((*err = dm_core_attach(core, s, uid)) != 0) {
		if (s->opener != NULL) {
			s->opener->pidfd = -1;	/* the caller still owns it */
			dm_peer_unref(s->opener);
		}
		pthread_mutex_destroy(&s->mu);
		free(s);
		return NULL;
	}
	return s;
}

dm_sess *
dm_sess_new(dm_core *core, uint64_t id, int pid, int pidfd, unsigned depth)
{
	int err;

	return dm_sess_open(core, id, pid, pidfd, 0, depth, &err);
}

void
dm_sess_destroy(dm_sess *s)
{
	dm_shared_free(s);	/* its registrations are charged to its user */
	dm_core_detach(s->core, s);
	if (s->opener != NULL)
		dm_peer_unref(s->opener);
	pthread_mutex_destroy(&s->mu);
	free(s->polls);
	free(s);
}

void
dm_sess_ref(dm_sess *s)
{
	pthread_mutex_lock(&s->mu);
	s->refs++;
	pthread_mutex_unlock(&s->mu);
}

void
dm_sess_unref(dm_sess *s)
{
	bool last;

	pthread_mutex_lock(&s->mu);
	last = --s->refs == 0;
	pthread_mutex_unlock(&s->mu);
	if (last)
		dm_sess_destroy(s);
}

void
dm_sess_close(dm_sess *s)
{
	dm_core *c = s->core;
	unsigned dropped;
	bool last;

	dm_io_close(s);
	dm_shared_close(s);	/* requests still running hold what they use */
	pthread_mutex_lock(&s->mu);
	s->dead = true;
	atomic_store(&s->cancel, true);
	dropped = s->ready;
	s->outstanding -= dropped;
	s->ready = 0;
	dm_core_notify_del(c, s);
	last = --s->refs == 0;
	pthread_mutex_unlock(&s->mu);
	dm_core_req_release(c, s->user, dropped);
	if (last)
		dm_sess_destroy(s);
}

int
dm_sess_setfunc(dm_sess *s, int func)
{
	int err = 0;

	pthread_mutex_lock(&s->mu);
	if (s->func >= 0 || s->external)
		err = EBUSY;
	else if (dm_func_get(func) == NULL)
		err = ESRCH;
	else
		s->func = func;
	pthread_mutex_unlock(&s->mu);
	return err;
}

int
dm_sess_set_external(dm_sess *s, int func, int ninputs, int has_output)
{
	const struct dm_func *fn = dm_func_get(func);
	int err = 0;

	pthread_mutex_lock(&s->mu);
	if (s->func >= 0 || s->external)
		err = EBUSY;
	else if (func != -1 && fn == NULL)
		err = ESRCH;
	else if (ninputs < 0 || ninputs > DM_MAX_INPUTS || (has_output != 0 && has_output != 1) ||
	    (ninputs == 0 && has_output == 0))
		err = EINVAL;	/* a function needs an operand */
	else if (fn != NULL && (fn->ninputs != ninputs || fn->has_output != (has_output == 1)))
		err = EINVAL;	/* all functions of a name have one shape */
	else {
		s->external = true;
		s->func = func;
		s->shape = (struct dm_func){ .name = NULL, .ninputs = ninputs,
		    .has_output = has_output == 1, .run = NULL };
	}
	pthread_mutex_unlock(&s->mu);
	return err;
}

const struct dm_func *
dm_sess_fn(dm_sess *s, int *func, bool *external)
{
	const struct dm_func *fn;

	pthread_mutex_lock(&s->mu);
	*func = s->func;
	*external = s->external;
	fn = s->func >= 0 ? dm_func_get(s->func) : s->external ? &s->shape : NULL;
	pthread_mutex_unlock(&s->mu);
	return fn;
}

/* Call under s->mu. */
static void
ring_push(dm_sess *s, const struct dmio_usrresp *resp)
{
	s->ring[(s->head + s->ready) % s->depth] = *resp;
	s->ready++;
}

void
dm_sess_finish(dm_sess *s, const struct dmio_usrresp *resp)
{
	dm_core *c = s->core;
	bool signal = false, kick = false;

	pthread_mutex_lock(&s->mu);
	if (s->dead) {
		s->outstanding--;
		dm_core_req_release(c, s->user, 1);
	} else {
		ring_push(s, resp);
		/* The transport's calls are woken directly; others learn from the eventfd. */
		if (c->cfg.transport)
			kick = true;
		else
			signal = dm_core_notify_add(c, s);
	}
	pthread_mutex_unlock(&s->mu);
	if (signal)
		dm_core_signal(c);
	if (kick)
		dm_io_kick(s);	/* s lives on: this request still holds a reference */
	dm_sess_unref(s);
}

void
dm_sess_note_eperm(dm_sess *s, int pid)
{
	bool signal = false;

	pthread_mutex_lock(&s->mu);
	if (s->eperm_pid == 0 && !s->dead) {
		s->eperm_pid = pid > 0 ? pid : -1;
		signal = dm_core_notify_add(s->core, s);
	}
	pthread_mutex_unlock(&s->mu);
	if (signal)
		dm_core_signal(s->core);
}

int
dm_sess_take_eperm(dm_sess *s)
{
	int pid;

	pthread_mutex_lock(&s->mu);
	pid = s->eperm_pid;
	s->eperm_pid = 0;
	pthread_mutex_unlock(&s->mu);
	return pid;
}

/* Run n accepted small requests in this thread and deliver their responses
 * (the caller checks the counts itself: no notification). */
static void
run_inline(dm_core *c, struct dm_exec *x, struct dm_req *const *r, size_t n)
{
	dm_sess *s = r[0]->sess;
	struct dmio_usrresp *resp = x->resp;

	pthread_mutex_lock(&s->mu);
	s->outstanding += (unsigned)n;
	pthread_mutex_unlock(&s->mu);
	for (size_t i = 0; i < n; i++)
		atomic_fetch_add(&c->fstats[r[i]->func].submitted, 1);
	dm_exec_run_batch(x, r, n, resp);
	for (size_t i = 0; i < n; i++) {
		dm_core_count(c, r[i], resp[i].resp_error);
		dm_req_free(c, r[i]);
	}
	atomic_fetch_add(&c->inline_runs, n);
	pthread_mutex_lock(&s->mu);
	for (size_t i = 0; i < n; i++)
		ring_push(s, &resp[i]);
	pthread_mutex_unlock(&s->mu);
}

/* A request about to outlive its write holds its writer's address space;
 * when that cannot be done it fails with the errno (r->err).  0 or that. */
static int
outlive(struct dm_req *r)
{
	int e;

	if (r->err != 0)
		return 0;	/* fails without touching memory anyway */
	if ((e = dm_peer_hold(r->peer)) != 0)
		r->err = e;
	return e;
}

/* Queue an accepted large request to the workers. */
static void
start_worker(dm_core *c, struct dm_req *r)
{
	dm_sess *s = r->sess;

	pthread_mutex_lock(&s->mu);
	s->outstanding++;
	s->refs++;
	pthread_mutex_unlock(&s->mu);
	atomic_fetch_add(&c->fstats[r->func].submitted, 1);
	atomic_fetch_add(&c->executing, 1);
	dm_core_enqueue(c, r);
}

/* How many leading requests of r[0..n) are small enough to run inline. */
static size_t
inline_length(dm_core *c, struct dm_req *const *r, size_t n)
{
	size_t k = 0;

	while (k < n && r[k]->moved <= c->cfg.inline_bytes)
		k++;
	return k;
}

/* An accepted request of an external session: hold a session reference
 * until dm_req_run or dm_req_complete, and queue it for the taker. */
static void
park(dm_core *c, struct dm_req *r)
{
	dm_sess *s = r->sess;

	pthread_mutex_lock(&s->mu);
	s->outstanding++;
	s->refs++;
	pthread_mutex_unlock(&s->mu);
	if (r->func >= 0)
		atomic_fetch_add(&c->fstats[r->func].submitted, 1);
	dm_core_park(c, r);
}

/* Decode, validate and start requests of peer with context x (see
 * dm_sess_submit); the caller is the only one submitting to s now. */
static size_t
submit(dm_sess *s, struct dm_exec *x, struct dm_peer *peer, const void *reqs, size_t nreq, int *err)
{
	dm_core *c = s->core;
	const unsigned char *wire = reqs;
	const struct dm_func *fn;
	size_t n = 0;
	int func, e = 0;
	bool external;

	fn = dm_sess_fn(s, &func, &external);
	if (fn == NULL) {
		*err = ENXIO;
		return 0;
	}
	if (peer == NULL) {
		*err = EFAULT;	/* no writer to act for (a session of the transport only) */
		return 0;
	}
	x->peer = peer;
	dm_exec_recheck(x);	/* the client may have exited since the last call */
	/* Window by window.  Only the submitter adds to outstanding, so the
	 * room seen here is still there below. */
	while (n < nreq && e == 0 && x->decode_left > 0) {
		size_t room, want, k, i;

		pthread_mutex_lock(&s->mu);
		room = s->depth - s->outstanding;
		pthread_mutex_unlock(&s->mu);
		want = nreq - n;
		if (want > room)
			want = room;
		if (want > dm_decode_max(fn))
			want = dm_decode_max(fn);
		if (want == 0)
			break;
		k = dm_decode(x, s, fn, func, wire + n * sizeof(struct dmio_usrreq), want, x->win, &e);
		for (i = 0; i < k; i++) {
			int ge = dm_core_req_reserve(c, s->user);

			if (ge != 0) {
				for (size_t j = i; j < k; j++)
					dm_req_free(c, x->win[j]);
				e = ge;
				break;
			}
		}
		k = i;	/* the reserved ones */
		if (!external)
			dm_shared_attach(s, x, x->win, k);
		for (i = 0; i < k;) {
			size_t b = external ? 0 : inline_length(c, x->win + i, k - i);

			if (b > 0) {
				run_inline(c, x, x->win + i, b);
				i += b;
			} else if (outlive(x->win[i]) != 0) {
				run_inline(c, x, x->win + i, 1);	/* fails with its errno */
				i++;
			} else if (external) {
				park(c, x->win[i++]);
			} else {
				start_worker(c, x->win[i++]);
			}
		}
		n += k;
	}
	x->peer = NULL;
	*err = e;
	return n;
}

size_t
dm_sess_submit(dm_sess *s, const void *reqs, size_t nreq, int *err)
{
	dm_core *c = s->core;
	size_t n;

	/* Callers from Python share the core's inline context; they act for the opener. */
	pthread_mutex_lock(&c->submit_mu);
	c->inl->decode_left = SIZE_MAX;
	n = submit(s, c->inl, s->opener, reqs, nreq, err);
	pthread_mutex_unlock(&c->submit_mu);
	return n;
}

size_t
dm_sess_submit_x(dm_sess *s, struct dm_exec *x, struct dm_peer *peer, const void *reqs, size_t nreq, int *err)
{
	return submit(s, x, peer, reqs, nreq, err);
}

size_t
dm_sess_take_some(dm_sess *s, void *resps, size_t max, size_t min)
{
	struct dmio_usrresp *out = resps;
	size_t n, first;

	pthread_mutex_lock(&s->mu);
	n = s->ready < max ? s->ready : max;
	if (n < min)
		n = 0;
	if (n > 0) {
		/* At most two runs: to the end of the ring, then from its start. */
		first = s->depth - s->head < n ? s->depth - s->head : n;
		memcpy(out, &s->ring[s->head], first * sizeof(*out));
		memcpy(out + first, &s->ring[0], (n - first) * sizeof(*out));
		s->head = (unsigned)((s->head + n) % s->depth);
		s->ready -= (unsigned)n;
		s->outstanding -= (unsigned)n;
	}
	pthread_mutex_unlock(&s->mu);
	dm_core_req_release(s->core, s->user, n);
	return n;
}

size_t
dm_sess_take(dm_sess *s, void *resps, size_t max)
{
	return dm_sess_take_some(s, resps, max, 1);
}

void
dm_sess_counts(dm_sess *s, unsigned *outstanding, unsigned *ready)
{
	pthread_mutex_lock(&s->mu);
	if (outstanding != NULL)
		*outstanding = s->outstanding;
	if (ready != NULL)
		*ready = s->ready;
	pthread_mutex_unlock(&s->mu);
}

void
dm_sess_set_nonblock(dm_sess *s, int on)
{
	atomic_store(&s->nonblock, on != 0);
}

int
dm_sess_nonblock(dm_sess *s)
{
	return atomic_load(&s->nonblock);
}

void
dm_sess_times(dm_sess *s, int64_t *times)
{
	times[0] = atomic_load(&s->atime_ns);
	times[1] = atomic_load(&s->mtime_ns);
	times[2] = atomic_load(&s->ctime_ns);
}

void
dm_sess_waiting(dm_sess *s, unsigned *counts)
{
	dm_core *c = s->core;
	unsigned reads = 0, writes = 0;

	pthread_mutex_lock(&c->iomu);
	for (struct dm_call *k = s->rhead; k != NULL; k = k->next)
		reads++;
	for (struct dm_call *k = s->whead; k != NULL; k = k->next)
		writes++;
	counts[2] = s->npolls;
	pthread_mutex_unlock(&c->iomu);
	counts[0] = reads;
	counts[1] = writes;
}

void
dm_sess_count(dm_sess *s, int err, uint64_t bytes)
{
	if (err == 0) {
		atomic_fetch_add(&s->completed, 1);
		atomic_fetch_add(&s->bytes, bytes);
	} else
		atomic_fetch_add(&s->failed, 1);
}

void
dm_sess_stats(dm_sess *s, struct dm_sess_stats *out)
{
	pthread_mutex_lock(&s->mu);
	out->outstanding = s->outstanding;
	out->ready = s->ready;
	out->func = s->func;
	out->external = s->external;
	pthread_mutex_unlock(&s->mu);
	out->nonblock = atomic_load(&s->nonblock);
	out->completed = atomic_load(&s->completed);
	out->failed = atomic_load(&s->failed);
	out->bytes = atomic_load(&s->bytes);
	out->atime_ns = atomic_load(&s->atime_ns);
	out->mtime_ns = atomic_load(&s->mtime_ns);
	out->ctime_ns = atomic_load(&s->ctime_ns);
}
