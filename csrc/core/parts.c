/*
 * parts.c - splitting one large request across the workers.  A worker that
 * runs a large job posts it on the board; idle workers take its parts one
 * at a time, and the poster takes them too, so a job finishes even when no
 * other worker is free.  The poster waits only for parts already taken.
 */
#include <stdlib.h>

#include "dmint.h"

struct dm_job {
	dm_part_fn *fn;
	void *arg;
	size_t n;
	size_t next;			/* the first part not yet taken (board mu) */
	size_t running;			/* parts taken, not yet done (board mu) */
	struct dm_job *link;		/* the board's posted jobs */
};

struct dm_parts {
	pthread_mutex_t mu;
	pthread_cond_t done;		/* a part of some job finished */
	struct dm_job *head;		/* jobs with parts not yet taken */
	atomic_uint posted;		/* how many of those */
	void (*wake)(void *);
	void *arg;
};

struct dm_parts *
dm_parts_new(void (*wake)(void *), void *arg)
{
	struct dm_parts *b = calloc(1, sizeof(*b));

	if (b == NULL)
		return NULL;
	pthread_mutex_init(&b->mu, NULL);
	pthread_cond_init(&b->done, NULL);
	atomic_init(&b->posted, 0);
	b->wake = wake;
	b->arg = arg;
	return b;
}

void
dm_parts_free(struct dm_parts *b)
{
	if (b == NULL)
		return;
	pthread_cond_destroy(&b->done);
	pthread_mutex_destroy(&b->mu);
	free(b);
}

bool
dm_parts_pending(struct dm_parts *b)
{
	return b != NULL && atomic_load(&b->posted) > 0;
}

/* Take the board's job off it (call under mu, once its last part is taken). */
static void
unpost(struct dm_parts *b, struct dm_job *j)
{
	for (struct dm_job **p = &b->head; *p != NULL; p = &(*p)->link)
		if (*p == j) {
			*p = j->link;
			atomic_fetch_sub(&b->posted, 1);
			return;
		}
}

/* Take the next part of j (call under mu): true with *part set, or false. */
static bool
take(struct dm_parts *b, struct dm_job *j, size_t *part)
{
	if (j->next == j->n)
		return false;
	*part = j->next++;
	j->running++;
	if (j->next == j->n)
		unpost(b, j);
	return true;
}

/* Run part of j, then count it done (mu is not held on entry or exit). */
static void
run_part(struct dm_parts *b, struct dm_job *j, size_t part, struct dm_exec *x)
{
	j->fn(j->arg, part, x);
	pthread_mutex_lock(&b->mu);
	j->running--;
	pthread_cond_broadcast(&b->done);
	pthread_mutex_unlock(&b->mu);
}

void
dm_parts_run(struct dm_parts *b, dm_part_fn *fn, void *arg, size_t n, struct dm_exec *x)
{
	struct dm_job j = { .fn = fn, .arg = arg, .n = n };
	size_t part;

	if (n <= 1) {
		if (n == 1)
			fn(arg, 0, x);
		return;
	}
	pthread_mutex_lock(&b->mu);
	j.link = b->head;
	b->head = &j;
	atomic_fetch_add(&b->posted, 1);
	pthread_mutex_unlock(&b->mu);
	b->wake(b->arg);
	for (;;) {
		bool got;

		pthread_mutex_lock(&b->mu);
		got = take(b, &j, &part);
		pthread_mutex_unlock(&b->mu);
		if (!got)
			break;
		run_part(b, &j, part, x);
	}
	/* Every part is taken: wait for those other workers run. */
	pthread_mutex_lock(&b->mu);
	while (j.running > 0)
		pthread_cond_wait(&b->done, &b->mu);
	pthread_mutex_unlock(&b->mu);
}

void
dm_parts_help(struct dm_parts *b, struct dm_exec *x)
{
	for (;;) {
		struct dm_job *j;
		size_t part;

		pthread_mutex_lock(&b->mu);
		j = b->head;
		if (j == NULL || !take(b, j, &part)) {
			pthread_mutex_unlock(&b->mu);
			return;
		}
		pthread_mutex_unlock(&b->mu);
		run_part(b, j, part, x);
	}
}
