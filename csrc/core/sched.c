/*
 * sched.c - who the workers serve next: deficit round robin over users,
 * then over each user's sessions.
 *
 * Work is queued per session: requests to run (a long one is run a slice
 * at a time and goes back to the head of its session's queue between
 * slices) and at most one pump step (submitting the session's queued
 * writes, a bounded amount of decoding at a time).  A session with work is
 * on its user's ring, a user with such a session on the core's ring.  The
 * worker serves the user at the head of the ring while its deficit is
 * positive, and within it the session at the head of its ring the same
 * way; an exhausted one gets a quantum of credit and goes to the tail.
 * Credit is time on a worker: an item is charged an estimate when it is
 * taken (so that two workers cannot both spend one quantum) and corrected
 * to the time it took when it ends.  A debt is capped, so that one slice
 * stuck in a slow client costs its session a few turns, not forever.
 *
 * All of it is under core->qmu.
 */
#include <stdlib.h>

#include "dmint.h"

#define QUANTUM_NS	((int64_t)1000000)	/* credit a turn brings: 1 ms */
#define DEBT_MAX_NS	(4 * QUANTUM_NS)	/* the most a user or session can owe */
#define PUMP_EST_NS	((int64_t)20000)	/* a pump step's charge until it is measured */
#define BYTES_PER_NS	4			/* a slice's charge until it is measured */

/* --- the rings ------------------------------------------------------------ */

static void
user_ring_add(dm_core *c, struct dm_user *u)
{
	u->rnext = NULL;
	u->rprev = c->rtail;
	if (c->rtail != NULL)
		c->rtail->rnext = u;
	else
		c->rhead = u;
	c->rtail = u;
	u->in_ring = true;
}

static void
user_ring_del(dm_core *c, struct dm_user *u)
{
	if (u->rprev != NULL)
		u->rprev->rnext = u->rnext;
	else
		c->rhead = u->rnext;
	if (u->rnext != NULL)
		u->rnext->rprev = u->rprev;
	else
		c->rtail = u->rprev;
	u->rnext = u->rprev = NULL;
	u->in_ring = false;
}

static void
sess_ring_add(struct dm_user *u, dm_sess *s)
{
	s->rnext = NULL;
	s->rprev = u->stail;
	if (u->stail != NULL)
		u->stail->rnext = s;
	else
		u->shead = s;
	u->stail = s;
	s->in_ring = true;
}

static void
sess_ring_del(struct dm_user *u, dm_sess *s)
{
	if (s->rprev != NULL)
		s->rprev->rnext = s->rnext;
	else
		u->shead = s->rnext;
	if (s->rnext != NULL)
		s->rnext->rprev = s->rprev;
	else
		u->stail = s->rprev;
	s->rnext = s->rprev = NULL;
	s->in_ring = false;
}

static bool
has_work(const dm_sess *s)
{
	return s->rqhead != NULL || s->pump_queued;
}

/* s gained work: put it (and its user) on the rings if not there. */
static void
became_ready(dm_core *c, dm_sess *s)
{
	struct dm_user *u = s->user;

	if (s->in_ring)
		return;
	/* A session that was idle (nothing running either) starts afresh. */
	if (s->running == 0)
		s->deficit = QUANTUM_NS;
	sess_ring_add(u, s);
	if (!u->in_ring) {
		if (u->running == 0)
			u->deficit = QUANTUM_NS;
		user_ring_add(c, u);
	}
	pthread_cond_signal(&c->qcv);
}

/* s may have lost its last queued work: take it off the rings then. */
static void
maybe_idle(dm_core *c, dm_sess *s)
{
	struct dm_user *u = s->user;

	if (!s->in_ring || has_work(s))
		return;
	sess_ring_del(u, s);
	if (u->shead == NULL)
		user_ring_del(c, u);
}

/* --- queueing ------------------------------------------------------------- */

void
dm_sched_add_req(dm_core *c, struct dm_req *r)
{
	dm_sess *s = r->sess;

	r->next = NULL;
	*s->rqtail = r;
	s->rqtail = &r->next;
	s->user->queued++;
	became_ready(c, s);
}

bool
dm_sched_add_pump(dm_core *c, dm_sess *s)
{
	if (s->pump_queued)
		return false;
	s->pump_queued = true;
	became_ready(c, s);
	return true;
}

/* Put an unfinished request back at the head of its session's queue. */
static void
requeue_front(dm_core *c, struct dm_req *r)
{
	dm_sess *s = r->sess;

	r->next = s->rqhead;
	s->rqhead = r;
	if (s->rqtail == &s->rqhead)
		s->rqtail = &r->next;
	s->user->queued++;
	became_ready(c, s);
}

/* --- choosing ------------------------------------------------------------- */

static int64_t
estimate(const struct dm_req *r, uint64_t slice)
{
	uint64_t left = r->total - r->done;
	uint64_t bytes = slice != 0 && left > slice ? slice : left;
	int nops = r->fn->ninputs + (r->out.cnt > 0);

	return (int64_t)(bytes * (uint64_t)nops / BYTES_PER_NS) + 1000;
}

bool
dm_sched_pick(dm_core *c, struct dm_item *it)
{
	for (;;) {
		struct dm_user *u = c->rhead;
		dm_sess *s;

		if (u == NULL)
			return false;
		if (u->deficit <= 0) {
			u->deficit += QUANTUM_NS;
			if (u->rnext != NULL) {
				user_ring_del(c, u);
				user_ring_add(c, u);
			}
			continue;
		}
		s = u->shead;
		if (s->deficit <= 0) {
			s->deficit += QUANTUM_NS;
			if (s->rnext != NULL) {
				sess_ring_del(u, s);
				sess_ring_add(u, s);
			}
			continue;
		}
		it->s = s;
		if (s->pump_queued) {
			/* Its writes' requests come before its queued ones. */
			s->pump_queued = false;
			it->r = NULL;
			it->charged = PUMP_EST_NS;
		} else {
			struct dm_req *r = s->rqhead;

			s->rqhead = r->next;
			if (s->rqhead == NULL)
				s->rqtail = &s->rqhead;
			u->queued--;
			it->r = r;
			it->charged = estimate(r, c->slice_bytes);
		}
		s->deficit -= it->charged;
		u->deficit -= it->charged;
		s->running++;
		u->running++;
		maybe_idle(c, s);
		return true;
	}
}

static int64_t
charge(int64_t deficit, int64_t ns)
{
	deficit -= ns;
	return deficit < -DEBT_MAX_NS ? -DEBT_MAX_NS : deficit;
}

void
dm_sched_done(dm_core *c, struct dm_item *it, int64_t took_ns, bool unfinished)
{
	dm_sess *s = it->s;
	struct dm_user *u = s->user;

	/* The estimate was charged when it was taken: settle the difference. */
	s->deficit = charge(s->deficit, took_ns - it->charged);
	u->deficit = charge(u->deficit, took_ns - it->charged);
	c->slices++;
	/* Back on the rings before it stops counting as running: a slice's
	 * debt or credit stays with the request's session and user. */
	if (unfinished)
		requeue_front(c, it->r);
	s->running--;
	u->running--;
}

bool
dm_sched_waiting(const dm_core *c)
{
	return c->rhead != NULL;	/* a user is on the ring while one of its sessions has work */
}

void
dm_sched_free_queued(dm_core *c, dm_sess *s)
{
	while (s->rqhead != NULL) {
		struct dm_req *r = s->rqhead;

		s->rqhead = r->next;
		free(r);
	}
	s->rqtail = &s->rqhead;
	s->pump_queued = false;
	maybe_idle(c, s);
}
