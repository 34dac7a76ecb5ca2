/*
 * core.c - the core's life cycle, the worker pool, the eventfd through which
 * workers announce sessions with new responses, and the counters.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "dmint.h"

#define DM_WORKERS_MAX	1024
#define DM_SPARE_WORKERS	64		/* started when every worker is stuck */
#define DM_STALL_NS	((int64_t)100000000)	/* a transfer this long counts as stuck */

/* A request a worker has finished: account it and deliver its response. */
static void
complete_queued(dm_core *c, struct dm_req *r, const struct dmio_usrresp *resp)
{
	dm_sess *s = r->sess;

	dm_core_count(c, r, resp->resp_error);
	atomic_fetch_sub(&c->executing_bytes, r->total);
	dm_req_free(c, r);
	atomic_fetch_sub(&c->executing, 1);
	atomic_fetch_add(&c->worker_runs, 1);
	dm_sess_finish(s, resp);
}

/* Run one item: true when it is a request left unfinished (another slice). */
static bool
run_item(dm_core *c, struct dm_exec *x, const struct dm_item *it, struct dmio_usrresp *resp)
{
	if (it->r == NULL) {
		dm_io_pump(it->s, x);
		return false;
	}
	dm_exec_recheck(x);	/* the client may have exited while r waited */
	return !dm_exec_slice(x, it->r, c->slice_bytes, resp);
}

static void *
worker_main(void *arg)
{
	struct dm_worker *w = arg;
	dm_core *c = w->core;

	for (;;) {
		struct dm_item it;
		struct dmio_usrresp resp;
		int64_t t0;
		bool unfinished, help;

		pthread_mutex_lock(&c->qmu);
		for (;;) {
			if (atomic_load(&c->stopping)) {
				pthread_mutex_unlock(&c->qmu);
				return NULL;
			}
			/* Parts of a slice of a shared-memory request another worker
			 * runs: a slice's worth, so they come before the next turn. */
			if ((help = dm_parts_pending(c->parts)) || dm_sched_pick(c, &it))
				break;
			pthread_cond_wait(&c->qcv, &c->qmu);
		}
		pthread_mutex_unlock(&c->qmu);
		if (help) {
			dm_parts_help(c->parts, w->x);
			continue;
		}

		t0 = dm_clock_ns(CLOCK_MONOTONIC);
		unfinished = run_item(c, w->x, &it, &resp);
		pthread_mutex_lock(&c->qmu);
		dm_sched_done(c, &it, dm_clock_ns(CLOCK_MONOTONIC) - t0, unfinished);
		pthread_mutex_unlock(&c->qmu);
		/* The item's session reference goes last: it keeps the session
		 * (and its user) alive through the scheduler's accounting. */
		if (it.r == NULL)
			dm_sess_unref(it.s);
		else if (!unfinished)
			complete_queued(c, it.r, &resp);
	}
}

/* Parts of a large request were posted: wake the idle workers. */
static void
wake_workers(void *arg)
{
	dm_core *c = arg;

	pthread_mutex_lock(&c->qmu);
	pthread_cond_broadcast(&c->qcv);
	pthread_mutex_unlock(&c->qmu);
}

/* Start one more worker (call with qmu held, or before any runs). */
static int
start_worker(dm_core *c)
{
	struct dm_worker *w = &c->workers[c->nworkers];
	sigset_t all, old;
	int err;

	if (c->nworkers >= c->maxworkers)
		return EAGAIN;
	w->core = c;
	if ((w->x = dm_exec_new(c, c->cfg.chunk_bytes)) == NULL)
		return ENOMEM;
	/* Workers inherit a full mask: signals go to the server's own threads. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = pthread_create(&w->tid, NULL, worker_main, w);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0) {
		dm_exec_free(w->x);
		w->x = NULL;
		return err;
	}
	c->nworkers++;
	return 0;
}

static int
start_workers(dm_core *c)
{
	int err = 0;

	c->maxworkers = c->cfg.workers + (c->cfg.transport ? DM_SPARE_WORKERS : 0);
	c->workers = calloc(c->maxworkers, sizeof(c->workers[0]));
	if (c->workers == NULL)
		return ENOMEM;
	pthread_mutex_lock(&c->qmu);
	for (unsigned i = 0; i < c->cfg.workers && err == 0; i++)
		err = start_worker(c);
	pthread_mutex_unlock(&c->qmu);
	return err;
}

void
dm_core_check_stalls(dm_core *c)
{
	int64_t now = dm_clock_ns(CLOCK_MONOTONIC);

	pthread_mutex_lock(&c->qmu);
	if (dm_sched_waiting(c)) {
		unsigned stuck = 0;

		for (unsigned i = 0; i < c->nworkers; i++) {
			int64_t since = atomic_load_explicit(&c->workers[i].x->in_xfer_ns, memory_order_relaxed);

			if (since != 0 && now - since >= DM_STALL_NS)
				stuck++;
		}
		if (stuck == c->nworkers)
			(void)start_worker(c);	/* at the limit, the work waits */
	}
	pthread_mutex_unlock(&c->qmu);
}

/* Count n more against a cap (0: none) unless it would pass it. */
static bool
take_under(atomic_uint_fast64_t *count, uint64_t n, uint64_t cap)
{
	uint64_t now = atomic_load(count);

	do {
		if (cap != 0 && (now + n > cap || now + n < now))
			return false;
	} while (!atomic_compare_exchange_weak(count, &now, now + n));
	return true;
}

/* Count n more of user u against the global cap and the user's. */
static int
reserve(dm_core *c, struct dm_user *u, atomic_uint_fast64_t *global, uint64_t gcap,
    atomic_uint_fast64_t *mine, uint64_t ucap, uint64_t n)
{
	if (!take_under(global, n, gcap)) {
		atomic_fetch_add(&c->refused_limits, 1);
		return EAGAIN;
	}
	if (!take_under(mine, n, ucap)) {
		atomic_fetch_sub(global, n);
		atomic_fetch_add(&c->refused_user_limits, 1);
		atomic_fetch_add(&u->refused, 1);
		return EAGAIN;
	}
	return 0;
}

int
dm_core_meta_reserve(dm_core *c, struct dm_user *u, size_t n)
{
	return reserve(c, u, &c->meta_bytes, c->cfg.max_meta_bytes, &u->meta_bytes,
	    c->cfg.max_user_meta_bytes, n);
}

void
dm_core_meta_release(dm_core *c, struct dm_user *u, size_t n)
{
	atomic_fetch_sub(&c->meta_bytes, n);
	atomic_fetch_sub(&u->meta_bytes, n);
}

int
dm_core_req_reserve(dm_core *c, struct dm_user *u)
{
	return reserve(c, u, &c->outstanding, c->cfg.max_requests, &u->outstanding,
	    c->cfg.max_user_requests, 1);
}

void
dm_core_req_release(dm_core *c, struct dm_user *u, uint64_t n)
{
	atomic_fetch_sub(&c->outstanding, n);
	atomic_fetch_sub(&u->outstanding, n);
}

dm_core *
dm_core_new(const struct dm_config *cfg, int *err)
{
	dm_core *c;
	void *zeros;
	int e;

	if (cfg == NULL || cfg->workers == 0 || cfg->workers > DM_WORKERS_MAX ||
	    cfg->chunk_bytes == 0 || cfg->chunk_bytes > DM_CHUNK_MAX) {
		*err = EINVAL;
		return NULL;
	}
	if ((c = calloc(1, sizeof(*c))) == NULL) {
		*err = ENOMEM;
		return NULL;
	}
	c->cfg = *cfg;
	c->cfg.chunk_bytes = (cfg->chunk_bytes + DM_ALIGN - 1) & ~(size_t)(DM_ALIGN - 1);
	c->efd = -1;
	pthread_mutex_init(&c->submit_mu, NULL);
	pthread_mutex_init(&c->qmu, NULL);
	pthread_cond_init(&c->qcv, NULL);
	pthread_mutex_init(&c->mu, NULL);
	pthread_mutex_init(&c->iomu, NULL);
	{
		pthread_condattr_t ca;

		/* The watcher's ticks are timed on the monotonic clock. */
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&c->watchcv, &ca);
		pthread_condattr_destroy(&ca);
	}
	c->xtail = &c->xhead;
	/* Slices are whole chunks: a pattern's phase and a CRC's order hold across them. */
	c->slice_bytes = (cfg->slice_bytes + c->cfg.chunk_bytes - 1) / c->cfg.chunk_bytes * c->cfg.chunk_bytes;

	if ((e = dm_kernels_init(&c->kern, getenv("DMOVERFS_KERNELS"))) != 0)
		goto fail;
	/* Read-only anonymous memory: zero pages, no RSS whatever the chunk. */
	zeros = mmap(NULL, c->cfg.chunk_bytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (zeros == MAP_FAILED) {
		e = errno;
		goto fail;
	}
	c->zeros = zeros;
	if ((c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
		e = errno;
		goto fail;
	}
	if ((c->inl = dm_exec_new(c, c->cfg.chunk_bytes)) == NULL ||
	    (c->parts = dm_parts_new(wake_workers, c)) == NULL) {
		e = ENOMEM;
		goto fail;
	}
	if ((e = start_workers(c)) != 0)
		goto fail;
	if (c->cfg.transport && (e = dm_io_start(c)) != 0)
		goto fail;
	return c;
fail:
	dm_core_free(c);
	*err = e;
	return NULL;
}

void
dm_core_free(dm_core *c)
{
	if (c == NULL)
		return;
	dm_io_stop(c);
	pthread_mutex_lock(&c->qmu);
	atomic_store(&c->stopping, true);	/* running requests stop at their next transfer */
	pthread_cond_broadcast(&c->qcv);
	pthread_mutex_unlock(&c->qmu);
	for (unsigned i = 0; i < c->nworkers; i++)
		pthread_join(c->workers[i].tid, NULL);

	/* Requests never started and every session go: nothing can reach them. */
	for (dm_sess *s = c->sessions; s != NULL; s = s->snext)
		dm_sched_free_queued(c, s);
	/* External requests never completed (taken or not) go the same way. */
	while (c->xall != NULL) {
		struct dm_req *r = c->xall;

		c->xall = r->xnext;
		free(r);
	}
	dm_io_free_all(c);
	while (c->sessions != NULL)
		dm_sess_destroy(c->sessions);

	if (c->workers != NULL)
		for (unsigned i = 0; i < c->nworkers; i++)
			dm_exec_free(c->workers[i].x);
	free(c->workers);
	dm_exec_free(c->inl);
	dm_parts_free(c->parts);
	if (c->efd >= 0)
		close(c->efd);
	if (c->zeros != NULL)
		munmap((void *)c->zeros, c->cfg.chunk_bytes);
	dm_kernels_fini(&c->kern);
	pthread_mutex_destroy(&c->mu);
	pthread_mutex_destroy(&c->iomu);
	pthread_cond_destroy(&c->watchcv);
	pthread_cond_destroy(&c->qcv);
	pthread_mutex_destroy(&c->qmu);
	pthread_mutex_destroy(&c->submit_mu);
	free(c);
}

int
dm_core_eventfd(const dm_core *c)
{
	return c->efd;
}

const char *
dm_core_kernels(const dm_core *c)
{
	return c->kern.name;
}

/* The user uid, made when missing (under mu); NULL when out of memory. */
static struct dm_user *
user_get(dm_core *c, uint32_t uid)
{
	struct dm_user *u;

	for (u = c->users; u != NULL; u = u->next)
		if (u->uid == uid)
			return u;
	if ((u = calloc(1, sizeof(*u))) == NULL)
		return NULL;
	u->uid = uid;
	atomic_init(&u->outstanding, 0);
	atomic_init(&u->meta_bytes, 0);
	atomic_init(&u->refused, 0);
	u->next = c->users;
	c->users = u;
	return u;
}

int
dm_core_attach(dm_core *c, dm_sess *s, uint32_t uid)
{
	struct dm_user *u;
	int err = 0;

	pthread_mutex_lock(&c->mu);
	if (c->cfg.max_sessions != 0 && c->nsessions >= c->cfg.max_sessions) {
		err = ENFILE;
		atomic_fetch_add(&c->refused_limits, 1);
	} else if ((u = user_get(c, uid)) == NULL) {
		err = ENOMEM;
	} else if (c->cfg.max_user_sessions != 0 && u->sessions >= c->cfg.max_user_sessions) {
		err = ENFILE;
		atomic_fetch_add(&c->refused_user_limits, 1);
		atomic_fetch_add(&u->refused, 1);
	} else {
		u->sessions++;
		c->nsessions++;
		s->user = u;
		s->sprev = NULL;
		s->snext = c->sessions;
		if (c->sessions != NULL)
			c->sessions->sprev = s;
		c->sessions = s;
	}
	pthread_mutex_unlock(&c->mu);
	return err;
}

void
dm_core_detach(dm_core *c, dm_sess *s)
{
	struct dm_user *u = s->user, **p;

	pthread_mutex_lock(&c->mu);
	if (s->sprev != NULL)
		s->sprev->snext = s->snext;
	else
		c->sessions = s->snext;
	if (s->snext != NULL)
		s->snext->sprev = s->sprev;
	c->nsessions--;
	/* A user goes with its last session: nothing of it is queued or running. */
	if (--u->sessions == 0) {
		for (p = &c->users; *p != u; p = &(*p)->next)
			;
		*p = u->next;
		free(u);
	}
	pthread_mutex_unlock(&c->mu);
}

void
dm_core_enqueue(dm_core *c, struct dm_req *r)
{
	atomic_fetch_add(&c->executing_bytes, r->total);
	pthread_mutex_lock(&c->qmu);
	dm_sched_add_req(c, r);
	pthread_mutex_unlock(&c->qmu);
}

void
dm_core_enqueue_pump(dm_core *c, dm_sess *s)
{
	bool added;

	dm_sess_ref(s);
	pthread_mutex_lock(&c->qmu);
	added = dm_sched_add_pump(c, s);
	pthread_mutex_unlock(&c->qmu);
	if (!added)
		dm_sess_unref(s);
}

struct dm_exec *
dm_core_exec_new(dm_core *c)
{
	return dm_exec_new(c, c->cfg.chunk_bytes);
}

void
dm_core_exec_free(struct dm_exec *x)
{
	dm_exec_free(x);
}

/* Call under c->mu. */
static void
notify_unlink(dm_core *c, dm_sess *s)
{
	if (s->nprev != NULL)
		s->nprev->nnext = s->nnext;
	else
		c->nhead = s->nnext;
	if (s->nnext != NULL)
		s->nnext->nprev = s->nprev;
	else
		c->ntail = s->nprev;
	s->listed = false;
}

bool
dm_core_notify_add(dm_core *c, dm_sess *s)
{
	bool was_empty = false;

	pthread_mutex_lock(&c->mu);
	if (!s->listed) {
		/* The eventfd is already readable unless the list was empty. */
		was_empty = c->nhead == NULL;
		s->listed = true;
		s->nnext = NULL;
		s->nprev = c->ntail;
		if (c->ntail != NULL)
			c->ntail->nnext = s;
		else
			c->nhead = s;
		c->ntail = s;
	}
	pthread_mutex_unlock(&c->mu);
	return was_empty;
}

void
dm_core_notify_del(dm_core *c, dm_sess *s)
{
	pthread_mutex_lock(&c->mu);
	if (s->listed)
		notify_unlink(c, s);
	pthread_mutex_unlock(&c->mu);
}

void
dm_core_signal(dm_core *c)
{
	uint64_t one = 1;
	/* Fails only with EAGAIN, when the counter is near overflow: readable anyway. */
	ssize_t n = write(c->efd, &one, sizeof(one));

	(void)n;
}

size_t
dm_core_drain(dm_core *c, uint64_t *ids, size_t max)
{
	uint64_t v;
	size_t n = 0;
	bool more;
	/* Clear before taking the list: a session listed after this read
	 * signals again, so no announcement is lost. */
	ssize_t rd = read(c->efd, &v, sizeof(v));

	(void)rd;
	pthread_mutex_lock(&c->mu);
	while (n < max && c->nhead != NULL) {
		ids[n++] = c->nhead->id;
		notify_unlink(c, c->nhead);
	}
	more = c->nhead != NULL;
	pthread_mutex_unlock(&c->mu);
	if (more)
		dm_core_signal(c);
	return n;
}

void
dm_core_count(dm_core *c, const struct dm_req *r, int err)
{
	struct dm_fstats *f;

	dm_sess_count(r->sess, err, r->total);
	if (r->func < 0)
		return;		/* a function the table lacks: its back-end counts it */
	f = &c->fstats[r->func];
	if (err == 0) {
		atomic_fetch_add(&f->completed, 1);
		atomic_fetch_add(&f->bytes, r->total);
	} else
		atomic_fetch_add(&f->failed, 1);
}

void
dm_core_stats(dm_core *c, struct dm_core_stats *out, struct dm_func_stats *per_func, int nfunc)
{
	if (out != NULL) {
		out->outstanding = atomic_load(&c->outstanding);
		out->executing = atomic_load(&c->executing);
		out->meta_bytes = atomic_load(&c->meta_bytes);
		out->inline_runs = atomic_load(&c->inline_runs);
		out->worker_runs = atomic_load(&c->worker_runs);
		out->refused_limits = atomic_load(&c->refused_limits);
		out->refused_user_limits = atomic_load(&c->refused_user_limits);
		pthread_mutex_lock(&c->qmu);
		out->slices = c->slices;
		pthread_mutex_unlock(&c->qmu);
		pthread_mutex_lock(&c->mu);
		out->users = 0;
		for (struct dm_user *u = c->users; u != NULL; u = u->next)
			out->users++;
		pthread_mutex_unlock(&c->mu);
		out->executing_bytes = atomic_load(&c->executing_bytes);
		out->run_bytes = atomic_load(&c->run_bytes);
		out->busy_ns = atomic_load(&c->busy_ns);
		out->external = atomic_load(&c->external);
		out->shared_runs = atomic_load(&c->shared_runs);
	}
	for (int i = 0; per_func != NULL && i < nfunc && i < DM_NFUNCS; i++) {
		per_func[i].submitted = atomic_load(&c->fstats[i].submitted);
		per_func[i].completed = atomic_load(&c->fstats[i].completed);
		per_func[i].failed = atomic_load(&c->fstats[i].failed);
		per_func[i].bytes = atomic_load(&c->fstats[i].bytes);
	}
}

void
dm_core_park(dm_core *c, struct dm_req *r)
{
	atomic_fetch_add(&c->external, 1);
	pthread_mutex_lock(&c->mu);
	r->next = NULL;
	*c->xtail = r;
	c->xtail = &r->next;
	r->xprev = NULL;
	r->xnext = c->xall;
	if (c->xall != NULL)
		c->xall->xprev = r;
	c->xall = r;
	pthread_mutex_unlock(&c->mu);
	/* Under the transport nobody else tells the server's dispatcher. */
	if (c->cfg.transport)
		dm_core_signal(c);
}

void
dm_core_unpark(dm_core *c, struct dm_req *r)
{
	pthread_mutex_lock(&c->mu);
	if (r->xprev != NULL)
		r->xprev->xnext = r->xnext;
	else
		c->xall = r->xnext;
	if (r->xnext != NULL)
		r->xnext->xprev = r->xprev;
	r->xprev = r->xnext = NULL;
	pthread_mutex_unlock(&c->mu);
	atomic_fetch_sub(&c->external, 1);
}

size_t
dm_core_take_external(dm_core *c, dm_req **out, size_t max)
{
	size_t n = 0;

	pthread_mutex_lock(&c->mu);
	while (n < max && c->xhead != NULL) {
		struct dm_req *r = c->xhead;

		c->xhead = r->next;
		r->next = NULL;
		out[n++] = r;
	}
	if (c->xhead == NULL)
		c->xtail = &c->xhead;
	pthread_mutex_unlock(&c->mu);
	return n;
}

static int
by_outstanding(const void *a, const void *b)
{
	const struct dm_user_stats *x = a, *y = b;

	return (x->outstanding < y->outstanding) - (x->outstanding > y->outstanding);
}

size_t
dm_core_users(dm_core *c, struct dm_user_stats *out, size_t max, size_t *total)
{
	struct dm_user_stats *all;
	size_t n = 0, cap = 0;

	pthread_mutex_lock(&c->mu);
	for (struct dm_user *u = c->users; u != NULL; u = u->next)
		cap++;
	all = calloc(cap ? cap : 1, sizeof(*all));
	pthread_mutex_lock(&c->qmu);	/* queued is the scheduler's */
	for (struct dm_user *u = c->users; all != NULL && u != NULL; u = u->next)
		all[n++] = (struct dm_user_stats){ .uid = u->uid, .sessions = u->sessions,
		    .outstanding = atomic_load(&u->outstanding), .meta_bytes = atomic_load(&u->meta_bytes),
		    .queued = u->queued, .refused = atomic_load(&u->refused) };
	pthread_mutex_unlock(&c->qmu);
	pthread_mutex_unlock(&c->mu);
	if (total != NULL)
		*total = cap;
	if (all == NULL)
		return 0;
	qsort(all, n, sizeof(*all), by_outstanding);
	if (n > max)
		n = max;
	memcpy(out, all, n * sizeof(*out));
	free(all);
	return n;
}
