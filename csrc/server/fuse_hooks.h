/*
 * fuse_hooks.h - what the server's libfuse interposers (stream_open.c,
 * interrupts.c, fastpath.c) offer to Python.  Loaded RTLD_GLOBAL before pyfuse3, so the
 * symbols they define are found before libfuse's own.
 */
#ifndef DMOVERFS_FUSE_HOOKS_H
#define DMOVERFS_FUSE_HOOKS_H

#include <stddef.h>
#include <stdint.h>

/* cdef begin */
/* Opens answered with FOPEN_STREAM since the library was loaded. */
unsigned long dmoverfs_stream_opens(void);

/* 1 once fuse_session_new went through the interposer (read/write wrapped). */
int dmoverfs_hooks_installed(void);
/* The request whose handler pyfuse3 dispatched last: a read or write handler
 * that asks before its first await gets its own request. */
void *dmoverfs_current_request(void);
/* Who is told (with the request) when the kernel interrupts a watched request. */
void dmoverfs_set_interrupt_handler(void (*handler)(void *req));
/* Start watching req for FUSE_INTERRUPT (the handler runs at once if it was
 * already interrupted); stop before the request is answered. */
void dmoverfs_watch_interrupt(void *req);
void dmoverfs_unwatch_interrupt(void *req);

/* --- fastpath.c: session reads and writes answered in C --- */
typedef struct dm_sess dm_sess;	/* the C core's session (dmcore.h) */

/* The core's entry points the fast path uses (given by address from Python). */
struct dmoverfs_fast_core {
	size_t (*submit)(dm_sess *s, const void *reqs, size_t nreq, int *err);
	size_t (*submit_whole)(dm_sess *s, const void *reqs, size_t nreq, int *err);
	size_t (*take_if)(dm_sess *s, void *resps, size_t max, size_t min);
	void (*poke)(dm_sess *s);
};

struct dmoverfs_fast_stats {
	uint64_t writes;		/* writes answered in C */
	uint64_t reads;			/* reads answered in C */
	uint64_t errors;		/* of those, answered with an error */
	uint64_t forwarded;		/* FUSE requests passed on to pyfuse3 */
};

/* Call before pyfuse3.init(): its fuse_session_fd() then starts the reader
 * thread.  0, EINVAL (an entry point missing) or EBUSY (already running). */
int dmoverfs_fast_prepare(const struct dmoverfs_fast_core *core);
/* Allow or stop fast answers (everything goes to pyfuse3 while off). */
void dmoverfs_fast_enable(int on);
/* 1 while the reader thread serves and fast answers are allowed. */
int dmoverfs_fast_running(void);
/* Serve open file fh of session sess (depth: its queue depth) here.
 * Registering a known fh updates it (e.g. its nonblock flag).  0, EINVAL
 * or ENOMEM. */
int dmoverfs_fast_register(uint64_t fh, dm_sess *sess, unsigned depth, int nonblock);
/* Stop serving fh; returns once no fast request uses its session. */
void dmoverfs_fast_unregister(uint64_t fh);
/* The times of fh's last fast read and write (0: none); 0 if fh is unknown. */
int dmoverfs_fast_times(uint64_t fh, int64_t *atime_ns, int64_t *mtime_ns);
size_t dmoverfs_fast_registered(void);
void dmoverfs_fast_stats(struct dmoverfs_fast_stats *out);
/* cdef end */

#endif
