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
#include <unistd.h>

#include "dmint.h"

dm_sess *
dm_sess_new(dm_core *core, uint64_t id, int pid, int pidfd, unsigned depth)
{
	dm_sess *s;

	/* Without a pidfd a reused pid could not be told apart: refuse. */
	if (core == NULL || pidfd < 0 || pid <= 0 || depth == 0)
		return NULL;
	s = calloc(1, sizeof(*s) + (size_t)depth * sizeof(s->ring[0]));
	if (s == NULL)
		return NULL;
	s->core = core;
	s->id = id;
	s->peer.pid = pid;
	s->peer.pidfd = pidfd;
	atomic_init(&s->peer.gone, false);
	atomic_init(&s->peer.cancel, false);
	atomic_init(&s->peer.alive_ns, INT64_MIN / 2);
	pthread_mutex_init(&s->mu, NULL);
	s->func = -1;
	s->depth = depth;
	s->refs = 1;
	dm_core_attach(core, s);
	return s;
}

void
dm_sess_destroy(dm_sess *s)
{
	dm_core_detach(s->core, s);
	close(s->peer.pidfd);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

void
dm_sess_close(dm_sess *s)
{
	dm_core *c = s->core;
	unsigned dropped;
	bool last;

	pthread_mutex_lock(&s->mu);
	s->dead = true;
	atomic_store(&s->peer.cancel, true);
	dropped = s->ready;
	s->outstanding -= dropped;
	s->ready = 0;
	dm_core_notify_del(c, s);
	last = --s->refs == 0;
	pthread_mutex_unlock(&s->mu);
	atomic_fetch_sub(&c->outstanding, dropped);
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
	bool signal = false, last;

	pthread_mutex_lock(&s->mu);
	if (s->dead) {
		s->outstanding--;
		atomic_fetch_sub(&c->outstanding, 1);
	} else {
		ring_push(s, resp);
		signal = dm_core_notify_add(c, s);
	}
	last = --s->refs == 0;
	pthread_mutex_unlock(&s->mu);
	if (signal)
		dm_core_signal(c);
	if (last)
		dm_sess_destroy(s);
}

/* Count one more outstanding request against the global cap. */
static int
reserve_global(dm_core *c)
{
	uint64_t cap = c->cfg.max_requests;

	if (atomic_fetch_add(&c->outstanding, 1) >= cap && cap != 0) {
		atomic_fetch_sub(&c->outstanding, 1);
		atomic_fetch_add(&c->refused_limits, 1);
		return EAGAIN;
	}
	return 0;
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

static size_t
submit(dm_sess *s, const void *reqs, size_t nreq, bool whole, int *err)
{
	dm_core *c = s->core;
	const unsigned char *wire = reqs;
	const struct dm_func *fn;
	struct dm_exec *x;
	size_t n = 0;
	int func, e = 0;
	bool external;

	fn = dm_sess_fn(s, &func, &external);
	if (fn == NULL) {
		*err = ENXIO;
		return 0;
	}

	pthread_mutex_lock(&c->submit_mu);
	x = c->inl;
	if (whole) {
		bool room;

		/* Only submit (serialised by submit_mu) adds to outstanding. */
		pthread_mutex_lock(&s->mu);
		room = s->depth - s->outstanding >= nreq;
		pthread_mutex_unlock(&s->mu);
		if (!room) {
			pthread_mutex_unlock(&c->submit_mu);
			*err = 0;
			return 0;
		}
	}
	dm_exec_recheck(x);	/* the client may have exited since the last call */
	/* Window by window.  Only submit (serialised by submit_mu) adds to
	 * outstanding, so the room seen here is still there below. */
	while (n < nreq && e == 0) {
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
			int ge = reserve_global(c);

			if (ge != 0) {
				for (size_t j = i; j < k; j++)
					dm_req_free(c, x->win[j]);
				e = ge;
				break;
			}
		}
		k = i;	/* the reserved ones */
		for (i = 0; i < k;) {
			size_t b = external ? 0 : inline_length(c, x->win + i, k - i);

			if (b > 0) {
				run_inline(c, x, x->win + i, b);
				i += b;
			} else if (external) {
				park(c, x->win[i++]);
			} else {
				start_worker(c, x->win[i++]);
			}
		}
		n += k;
	}
	pthread_mutex_unlock(&c->submit_mu);
	*err = e;
	return n;
}

size_t
dm_sess_submit(dm_sess *s, const void *reqs, size_t nreq, int *err)
{
	return submit(s, reqs, nreq, false, err);
}

size_t
dm_sess_submit_whole(dm_sess *s, const void *reqs, size_t nreq, int *err)
{
	return submit(s, reqs, nreq, true, err);
}

size_t
dm_sess_take_if(dm_sess *s, void *resps, size_t max, size_t min)
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
	atomic_fetch_sub(&s->core->outstanding, n);
	return n;
}

size_t
dm_sess_take(dm_sess *s, void *resps, size_t max)
{
	return dm_sess_take_if(s, resps, max, 1);
}

void
dm_sess_watch(dm_sess *s, int on)
{
	pthread_mutex_lock(&s->mu);
	s->watched = on != 0;
	pthread_mutex_unlock(&s->mu);
}

void
dm_sess_poke(dm_sess *s)
{
	bool signal = false;

	/* Under s->mu, so a watch set before the watcher's last look at the
	 * counts is seen here, or that look saw what this poke announces. */
	pthread_mutex_lock(&s->mu);
	if (s->watched && !s->dead)
		signal = dm_core_notify_add(s->core, s);
	pthread_mutex_unlock(&s->mu);
	if (signal)
		dm_core_signal(s->core);
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
