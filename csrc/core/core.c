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

static void
run_queued(dm_core *c, struct dm_exec *x, struct dm_req *r)
{
	dm_sess *s = r->sess;
	struct dmio_usrresp resp;

	dm_exec_recheck(x);	/* the client may have exited while r waited */
	dm_exec_run(x, r, &resp);
	dm_core_count(c, r, resp.resp_error);
	atomic_fetch_sub(&c->executing_bytes, r->total);
	dm_req_free(c, r);
	atomic_fetch_sub(&c->executing, 1);
	atomic_fetch_add(&c->worker_runs, 1);
	dm_sess_finish(s, &resp);
}

static void *
worker_main(void *arg)
{
	struct dm_worker *w = arg;
	dm_core *c = w->core;

	for (;;) {
		struct dm_req *r;

		pthread_mutex_lock(&c->qmu);
		while (c->qhead == NULL && c->phead == NULL && !atomic_load(&c->stopping))
			pthread_cond_wait(&c->qcv, &c->qmu);
		if (atomic_load(&c->stopping)) {
			pthread_mutex_unlock(&c->qmu);
			return NULL;
		}
		if (c->phead != NULL) {
			/* Writes waiting to be submitted come before requests to run. */
			dm_sess *s = c->phead;

			c->phead = s->pnext;
			if (c->phead == NULL)
				c->ptail = &c->phead;
			s->pump_queued = false;
			pthread_mutex_unlock(&c->qmu);
			dm_io_pump(s, w->x);
			dm_sess_unref(s);
			continue;
		}
		r = c->qhead;
		c->qhead = r->next;
		if (c->qhead == NULL)
			c->qtail = &c->qhead;
		pthread_mutex_unlock(&c->qmu);
		run_queued(c, w->x, r);
	}
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
	if (c->qhead != NULL || c->phead != NULL) {
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

int
dm_core_meta_reserve(dm_core *c, size_t n)
{
	if (c->cfg.max_meta_bytes != 0 && atomic_load(&c->meta_bytes) + n > c->cfg.max_meta_bytes) {
		atomic_fetch_add(&c->refused_limits, 1);
		return EAGAIN;
	}
	atomic_fetch_add(&c->meta_bytes, n);
	return 0;
}

void
dm_core_meta_release(dm_core *c, size_t n)
{
	atomic_fetch_sub(&c->meta_bytes, n);
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
	c->qtail = &c->qhead;
	c->xtail = &c->xhead;
	c->ptail = &c->phead;

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
	if ((c->inl = dm_exec_new(c, c->cfg.chunk_bytes)) == NULL) {
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
	while (c->qhead != NULL) {
		struct dm_req *r = c->qhead;

		c->qhead = r->next;
		free(r);
	}
	/* External requests never completed (taken or not) go the same way. */
	while (c->xall != NULL) {
		struct dm_req *r = c->xall;

		c->xall = r->xnext;
		free(r);
	}
	/* Sessions whose writes waited for a pump: their references go with them. */
	while (c->phead != NULL) {
		dm_sess *s = c->phead;

		c->phead = s->pnext;
		s->pump_queued = false;
	}
	dm_io_free_all(c);
	while (c->sessions != NULL)
		dm_sess_destroy(c->sessions);

	if (c->workers != NULL)
		for (unsigned i = 0; i < c->nworkers; i++)
			dm_exec_free(c->workers[i].x);
	free(c->workers);
	dm_exec_free(c->inl);
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

void
dm_core_attach(dm_core *c, dm_sess *s)
{
	pthread_mutex_lock(&c->mu);
	s->sprev = NULL;
	s->snext = c->sessions;
	if (c->sessions != NULL)
		c->sessions->sprev = s;
	c->sessions = s;
	pthread_mutex_unlock(&c->mu);
}

void
dm_core_detach(dm_core *c, dm_sess *s)
{
	pthread_mutex_lock(&c->mu);
	if (s->sprev != NULL)
		s->sprev->snext = s->snext;
	else
		c->sessions = s->snext;
	if (s->snext != NULL)
		s->snext->sprev = s->sprev;
	pthread_mutex_unlock(&c->mu);
}

void
dm_core_enqueue(dm_core *c, struct dm_req *r)
{
	r->next = NULL;
	atomic_fetch_add(&c->executing_bytes, r->total);
	pthread_mutex_lock(&c->qmu);
	*c->qtail = r;
	c->qtail = &r->next;
	pthread_cond_signal(&c->qcv);
	pthread_mutex_unlock(&c->qmu);
}

void
dm_core_enqueue_pump(dm_core *c, dm_sess *s)
{
	dm_sess_ref(s);
	pthread_mutex_lock(&c->qmu);
	if (s->pump_queued) {
		pthread_mutex_unlock(&c->qmu);
		dm_sess_unref(s);
		return;
	}
	s->pump_queued = true;
	s->pnext = NULL;
	*c->ptail = s;
	c->ptail = &s->pnext;
	pthread_cond_signal(&c->qcv);
	pthread_mutex_unlock(&c->qmu);
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
		out->executing_bytes = atomic_load(&c->executing_bytes);
		out->run_bytes = atomic_load(&c->run_bytes);
		out->busy_ns = atomic_load(&c->busy_ns);
		out->external = atomic_load(&c->external);
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
