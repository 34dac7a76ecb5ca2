/*
 * dmint.h - private structures of the core, shared by its source files.
 *
 * Locking: a session's fields are guarded by its mu unless noted; the core's
 * session list, user list, notify list and each session's notify links by
 * core->mu; the scheduler's queues and rings (sched.c) by core->qmu; every
 * session call (parked reads and writes, poll handles, the list of live
 * calls) by core->iomu.  Lock order: core->iomu, then sess->mu, then
 * core->mu, then core->qmu.  The inline execution context of the
 * Python-facing calls (and the decode scratch in it) is used under
 * core->submit_mu; the server's threads bring contexts of their own.
 * Counters are atomics.
 */
#ifndef DMINT_H
#define DMINT_H

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include <dev/dmover/dmover_io.h>
#include "dmcore.h"

#if IOV_MAX != 1024
#error "the wire format assumes IOV_MAX == 1024 (Linux UIO_MAXIOV)"
#endif

#define DM_MAX_INPUTS	16		/* xor16 */
#define DM_NBUF		(DM_MAX_INPUTS + 1)	/* bounce buffers per context */
#define DM_ALIGN	64		/* bounce buffer alignment (ISA-L wants 32) */
#define DM_CHUNK_MAX	((size_t)64 << 20)	/* bounce buffer size limit */
#define DM_RW_MAX	((size_t)0x7ffff000)	/* Linux moves at most this per syscall */
#define DM_XFER_MAX	((size_t)1 << 30)	/* bytes per pattern write syscall */
_Static_assert(DM_NBUF * DM_CHUNK_MAX <= DM_RW_MAX, "a gather into every buffer fits one syscall");
_Static_assert(DM_XFER_MAX <= DM_RW_MAX, "a pattern write fits one syscall");
#define DM_NFUNCS	22		/* entries of the function table */
#define DM_IMM		8		/* bytes of an immediate */

struct dm_exec;
struct dm_req;
struct dm_parts;
struct dm_shset;
struct dm_shuse;

/* Nanoseconds on clock id. */
static inline int64_t
dm_clock_ns(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * Run bytes [from, from + len) of one decoded request whose function
 * constraints already hold (the whole request is from 0, len total; a
 * worker runs it in slices, from a multiple of the chunk size).  imm holds
 * the request's immediate on entry to the first slice and what the next
 * slice needs after each (a CRC so far); after the last, the response's.
 * Returns 0, the errno for resp_error, or DM_DONE when the request is
 * complete before its end (compare found a difference).
 */
typedef int dm_run_fn(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len,
    uint8_t imm[DM_IMM]);
#define DM_DONE		(-1)

struct dm_func {
	const char *name;
	int ninputs;
	bool has_output;
	dm_run_fn *run;
};

const struct dm_func *dm_func_get(int func);	/* NULL when out of range */

/* --- kernels.c ---------------------------------------------------------- */

struct dm_kernels {
	/* Advance a raw (not inverted) CRC32C register over n bytes. */
	uint32_t (*crc)(const struct dm_kernels *k, uint32_t raw, const uint8_t *p, size_t n);
	/* dst = src[0] ^ ... ^ src[nsrc-1]; all pointers DM_ALIGN-aligned. */
	void (*xor)(const struct dm_kernels *k, uint8_t *dst, uint8_t *const *src, int nsrc, size_t n);
	unsigned (*isal_crc)(unsigned char *buf, int len, unsigned init);
	int (*isal_xor)(int vects, int len, void **array);
	void *isal;			/* dlopen handle, or NULL */
	uint32_t slice[8][256];		/* slicing-by-8 tables */
	uint32_t shift[4][256];		/* raw register advanced over DM_CRC_LANE zero bytes */
	char name[48];			/* what dm_core_kernels reports */
};

/* mode: NULL or "auto", "sse4.2" (no ISA-L), "portable".  0 or EINVAL. */
int dm_kernels_init(struct dm_kernels *k, const char *mode);
void dm_kernels_fini(struct dm_kernels *k);

/* --- remote.c ------------------------------------------------------------ */

/*
 * The address space requests act on: the writer's (as NetBSD's dmio_write
 * takes a reference on the writing process's vmspace).  While the writer is
 * inside its write() (pinned), its thread id names that address space
 * exactly: the thread can neither exit nor exec.  A request that outlives
 * the write holds the address space itself, /proc/TID/mem opened while
 * pinned, which fails once that space is gone (exit, exec); its data moves
 * with process_vm_* on the thread while a thread pidfd says it lives, after
 * a look through the held descriptor that the space still is, else through
 * that descriptor.  Sessions made by the control plane's own calls
 * (dm_sess_submit) use a peer of the opener, checked through a pidfd.
 */
struct dm_peer {
	atomic_uint refs;
	int pid;			/* the writer's thread (or the opener) */
	int pidfd;			/* readable once pid may name another: -1 if none */
	int memfd;			/* /proc/PID/mem held for the space, or -1 */
	atomic_bool pinned;		/* the writer is inside its write */
	atomic_bool gone;		/* the space is gone: never touch it again */
	atomic_bool pid_gone;		/* pid exited: it may name another (a held space lives on) */
	atomic_bool *cancel;		/* the session's: closed, stop working for it */
	atomic_int_fast64_t alive_ns;	/* CLOCK_MONOTONIC when last found alive */
	bool as_writer;			/* reach it with the writer's rights (a root server) */
	uint32_t uid, gid;		/* the writer's */
};

/* A peer (one reference); NULL when out of memory.  pidfd is the peer's. */
struct dm_peer *dm_peer_new(int pid, int pidfd, bool pinned, atomic_bool *cancel);
/* The server never lends its privilege: a root server reaches this peer
 * with the writer's uid and gid (each access a thread makes takes them for
 * the call), so the kernel's own ptrace check refuses what the writer could
 * not reach alone - another user's process, a setuid or non-dumpable image. */
void dm_peer_rights(struct dm_peer *p, uint32_t uid, uint32_t gid);
void dm_peer_ref(struct dm_peer *p);
void dm_peer_unref(struct dm_peer *p);
/* While pinned: hold the address space so that requests can outlive the
 * write.  0, or the errno its requests then fail with. */
int dm_peer_hold(struct dm_peer *p);
/* The writer's write() is answered: from now on pid is not exact. */
void dm_peer_unpin(struct dm_peer *p);

/* A position in a client's iovec list (a local copy of it). */
struct dm_rcur {
	const struct iovec *iov;
	size_t cnt;
	size_t idx;
	size_t off;
};

void dm_rcur_init(struct dm_rcur *c, const struct iovec *iov, size_t cnt);
/* One process_vm_readv between x->loc[0..nloc) and x->rem[0..nrem): 0 when
 * all bytes came, else the errno, *got saying how many did. */
int dm_readv(struct dm_exec *x, struct dm_peer *p, size_t nloc, size_t nrem,
    size_t bytes, size_t *got);
/* The same with process_vm_writev. */
int dm_writev(struct dm_exec *x, struct dm_peer *p, size_t nloc, size_t nrem,
    size_t bytes, size_t *got);
/* Take / give back the writer's rights in this thread (see dm_peer_rights):
 * 0, or EPERM when they cannot be taken. */
int dm_peer_become(const struct dm_peer *p);
void dm_peer_unbecome(const struct dm_peer *p);
/* May requests of p still touch its address space?  0, or the errno they
 * fail with (ECANCELED: closed or stopping; EFAULT: the space is gone). */
int dm_peer_live(struct dm_exec *x, struct dm_peer *p);
/* Is the address space held by a /proc/PID/mem descriptor gone (exit, exec)? */
bool dm_mem_gone(int memfd);
/* Move the cursor n bytes on (to the end at most). */
void dm_rcur_skip(struct dm_rcur *c, uint64_t n);
/* Read len bytes from each of the n client lists under cur into dst[i]. */
int dm_gather(struct dm_exec *x, struct dm_peer *p, struct dm_rcur *cur,
    uint8_t *const *dst, int n, size_t len);
/* Write len bytes to the client list under cur; the local data is the
 * first unit bytes of src, repeated (unit >= len for a plain copy). */
int dm_put(struct dm_exec *x, struct dm_peer *p, struct dm_rcur *cur,
    const uint8_t *src, size_t unit, size_t len);

/* --- exec.c -------------------------------------------------------------- */

struct dm_ival {
	uint64_t lo, hi;		/* [lo, hi], both inclusive */
};

/* Everything one thread needs to run requests, allocated once. */
struct dm_exec {
	dm_core *core;
	size_t chunk;
	uint64_t budget;		/* bytes that may move before the pidfd is polled again */
	atomic_int_fast64_t in_xfer_ns;	/* CLOCK_MONOTONIC when its current transfer began, 0 if none */
	struct dm_peer *peer;		/* whose requests are being decoded (the submitter's) */
	size_t decode_left;		/* bytes of iovec arrays a pump step may still read */
	uint8_t *buf[DM_NBUF];		/* chunk bytes each, DM_ALIGN-aligned */
	void *mem;
	struct iovec loc[IOV_MAX];	/* syscall scratch */
	struct iovec rem[IOV_MAX];
	/* decode scratch, used in the inline context only */
	struct dm_ival ival[IOV_MAX];	/* overlap check */
	uint8_t inbufs[IOV_MAX * sizeof(dmio_buffer)];	/* a window's dmio_buffers */
	struct dm_req *win[IOV_MAX];	/* a window's decoded requests */
	struct dmio_usrresp resp[IOV_MAX];	/* a batch's responses */
};

struct dm_exec *dm_exec_new(dm_core *core, size_t chunk);
void dm_exec_free(struct dm_exec *x);
/* Forget that the client was found alive: poll before the next transfer. */
static inline void dm_exec_recheck(struct dm_exec *x) { x->budget = 0; }
/* Run r (or report its constraint error) into *resp. */
void dm_exec_run(struct dm_exec *x, const struct dm_req *r, struct dmio_usrresp *resp);
/* Run the next at most max bytes of r (all when max is 0), keeping its
 * progress in r; true, with *resp filled, when r is complete. */
bool dm_exec_slice(struct dm_exec *x, struct dm_req *r, uint64_t max, struct dmio_usrresp *resp);
/* Run r[0..n) (requests of one session) into resp[0..n), as dm_exec_run
 * does; consecutive zero requests have their outputs zeroed with as few
 * process_vm_writev calls as the iovec limits allow. */
void dm_exec_run_batch(struct dm_exec *x, struct dm_req *const *r, size_t n,
    struct dmio_usrresp *resp);

/* The raw CRC register for the CRC so far in an immediate (little-endian). */
static inline uint32_t
dm_crc_seed(const uint8_t imm[DM_IMM])
{
	return ~((uint32_t)imm[0] | (uint32_t)imm[1] << 8 | (uint32_t)imm[2] << 16 | (uint32_t)imm[3] << 24);
}

/* An immediate holding value, little-endian. */
static inline void
dm_put_le(uint8_t imm[DM_IMM], uint64_t value)
{
	for (int i = 0; i < DM_IMM; i++)
		imm[i] = (uint8_t)(value >> (8 * i));
}

dm_run_fn dm_run_zero, dm_run_fill8, dm_run_copy, dm_run_xor, dm_run_crc32c;
/* dmoverfs extensions, beyond NetBSD's functions. */
dm_run_fn dm_run_fill64, dm_run_compare, dm_run_copy_crc32c;

/* --- decode.c ------------------------------------------------------------ */

struct dm_list {
	const struct iovec *iov;	/* inside the request's allocation */
	uint32_t cnt;
};

/* A decoded, validated request: one allocation, iovec copies at the end. */
struct dm_req {
	struct dm_req *next;		/* worker queue, or the core's untaken external requests */
	struct dm_req *xprev, *xnext;	/* the core's live external requests (core->mu) */
	dm_sess *sess;
	struct dm_peer *peer;		/* the writer's address space (a reference) */
	const struct dm_func *fn;	/* the table's entry, or the session's shape (run NULL) */
	int func;			/* table index, or -1 */
	int err;			/* function constraint error, found at submit */
	uint32_t id;
	uint8_t imm[DM_IMM];
	size_t size;			/* of this allocation, counted in meta_bytes */
	uint64_t total;			/* bytes of the output, and of each input */
	uint64_t moved;			/* bytes read plus bytes written */
	uint64_t done;			/* bytes of total run so far (a worker's slices) */
	struct dm_shuse *shared;	/* non-NULL: every operand lies in shared memory (shared.c) */
	struct dm_list out;		/* cnt 0: no output */
	struct dm_list in[];		/* fn->ninputs */
};

/* Bytes of iovec arrays one pump step decodes (at least one request, so a
 * step may pass it by one request's arrays): a write of many requests with
 * long lists is decoded over several steps, each a worker's turn charged to
 * its session, and never holds the reader that brought it for long. */
#define DM_DECODE_STEP	((size_t)1 << 20)

/* Most requests of function fn that dm_decode takes at once. */
size_t dm_decode_max(const struct dm_func *fn);
/*
 * Decode and validate n (<= dm_decode_max) consecutive 40-byte wire
 * requests for function fn (table index func, or -1) of session s.  Returns
 * how many leading ones are valid, in out[]; *err is the errno of the one
 * after them, or 0 (also when x->decode_left stopped it early: what it
 * read is taken off x->decode_left).
 */
size_t dm_decode(struct dm_exec *x, dm_sess *s, const struct dm_func *fn, int func,
    const unsigned char *wire, size_t n, struct dm_req **out, int *err);
void dm_req_free(dm_core *c, struct dm_req *r);

/* --- sess.c -------------------------------------------------------------- */

struct dm_sess {
	dm_core *core;
	uint64_t id;
	struct dm_peer *opener;		/* for dm_sess_submit: the opener, or NULL */
	atomic_bool cancel;		/* closed: requests still running stop */
	pthread_mutex_t mu;
	int func;			/* -1 until set */
	bool external;			/* requests go to dm_core_take_external */
	struct dm_func shape;		/* an external function the table lacks (func -1) */
	struct dm_shset *shared;	/* registered shared memory, or NULL (shared.c) */
	unsigned depth;
	unsigned outstanding;		/* accepted, not yet taken */
	unsigned ready;			/* responses in the ring */
	unsigned head;			/* ring index of the oldest response */
	unsigned refs;			/* server + queued/running requests */
	bool dead;			/* closed by the server */
	bool listed;			/* on the notify list (core->mu) */
	int eperm_pid;			/* a write of this thread met EPERM: the server explains it */
	/* Calls from the server's transport (core->iomu): */
	struct dm_call *rhead, *rtail;	/* blocking reads waiting for responses, oldest first */
	struct dm_call *whead, *wtail;	/* writes not yet answered, oldest first */
	bool pumping;			/* a thread is submitting the writes */
	bool closing;			/* closed: what still waits ends with ENXIO */
	/* Scheduling (core->qmu): */
	struct dm_user *user;		/* whose it is (set at open, then fixed) */
	struct dm_req *rqhead, **rqtail;	/* requests waiting for a worker, in order */
	bool pump_queued;		/* a worker is to pump its writes */
	bool in_ring;			/* on its user's ring (it has work queued) */
	unsigned running;		/* its items on workers now */
	int64_t deficit;		/* ns of worker time it may still take this turn */
	dm_sess *rnext, *rprev;		/* its user's ring */
	uint64_t *polls;		/* kernel poll handles to wake on a change */
	unsigned npolls, cpolls;
	atomic_bool nonblock;		/* the nonblock attribute: every call is non-blocking */
	atomic_int_fast64_t atime_ns, mtime_ns, ctime_ns;	/* last read, last write, open */
	/* What the session's requests did, cumulative (dm_sess_stats). */
	atomic_uint_fast64_t completed, failed, bytes;
	dm_sess *nprev, *nnext;		/* notify list (core->mu) */
	dm_sess *sprev, *snext;		/* all sessions (core->mu) */
	struct dmio_usrresp ring[];	/* depth entries */
};

/* Hold / drop a reference (the last one frees the session). */
void dm_sess_ref(dm_sess *s);
void dm_sess_unref(dm_sess *s);
/* A write of thread pid met EPERM: have the server explain it. */
void dm_sess_note_eperm(dm_sess *s, int pid);
/* Validate and start up to nreq requests of writer peer with the caller's
 * context x (the caller is the session's only submitter); see dm_sess_submit. */
size_t dm_sess_submit_x(dm_sess *s, struct dm_exec *x, struct dm_peer *peer, const void *reqs,
    size_t nreq, int *err);
/* Move up to max ready responses into resps, none unless at least min are ready. */
size_t dm_sess_take_some(dm_sess *s, void *resps, size_t max, size_t min);

/* The function requests of s are decoded for: NULL until one is set. */
const struct dm_func *dm_sess_fn(dm_sess *s, int *func, bool *external);
/* A worker finished r: deliver or discard its response, drop r's reference. */
void dm_sess_finish(dm_sess *s, const struct dmio_usrresp *resp);
/* One request of s finished with err after moving bytes (for dm_sess_stats). */
void dm_sess_count(dm_sess *s, int err, uint64_t bytes);
/* Free a session (refs gone, or the core is going away). */
void dm_sess_destroy(dm_sess *s);

/* --- io.c ---------------------------------------------------------------- */

/* A read or write of a session, from the kernel through the server's
 * transport, until it is answered. */
struct dm_call {
	struct dm_call *next, *prev;	/* the session's reads or writes (core->iomu) */
	struct dm_call *hnext;		/* the core's live calls, by unique (core->iomu) */
	struct dm_peer *peer;		/* write: the writer's address space */
	dm_sess *sess;
	uint64_t unique;		/* the kernel's request id */
	int tid;			/* the calling thread */
	int tgid;			/* its process, once an interrupt asked (else 0) */
	bool write;
	bool nonblock;
	bool busy;			/* a pump is submitting its requests now */
	bool answered;			/* answered early (a fatal signal): the pump drops it */
	bool cancel;			/* a handled signal: answer after the current window */
	bool waiting_signal;		/* interrupted by a signal that runs no handler */
	unsigned parked;		/* 1 once it had to wait (counted in the stats) */
	size_t charged;			/* bytes of buf counted as request metadata */
	int aerr;			/* the errno to answer with when it has nothing */
	int64_t recheck_ns;		/* when to look at the caller's signals again */
	size_t want;			/* responses asked for / requests written */
	size_t done;			/* responses taken / requests accepted */
	unsigned char *buf;		/* taken responses / an owned copy of the requests */
	const unsigned char *data;	/* write: the requests (buf once owned) */
};

/* A session changed (responses arrived, room freed): serve what waits. */
void dm_io_kick(dm_sess *s);
/* Run the queued writes of s with context x (a worker's pump job). */
void dm_io_pump(dm_sess *s, struct dm_exec *x);
/* Answer every call of s and forget its poll handles (the session closes). */
void dm_io_close(dm_sess *s);
/* Start / stop the thread that rechecks interrupted calls. */
int dm_io_start(dm_core *c);
void dm_io_stop(dm_core *c);
/* Free every call still live (the core is going away). */
void dm_io_free_all(dm_core *c);

/* --- sched.c ------------------------------------------------------------- */

/* A user: the caps' accounting and the scheduler's share. */
struct dm_user {
	uint32_t uid;
	struct dm_user *next;		/* the core's users (core->mu) */
	unsigned sessions;		/* open (core->mu) */
	unsigned shared_regs;		/* shared memory registered in its sessions (core->mu) */
	uint64_t shared_bytes;
	atomic_uint_fast64_t outstanding, meta_bytes, refused;
	/* Scheduling (core->qmu): */
	dm_sess *shead, *stail;		/* its sessions with work queued */
	struct dm_user *rnext, *rprev;	/* the core's users with work queued */
	bool in_ring;
	unsigned running;		/* its items on workers now */
	uint64_t queued;		/* its requests waiting for a worker */
	int64_t deficit;		/* ns of worker time it may still take this turn */
};

/* What a worker takes: a slice of a request, or a pump step of a session. */
struct dm_item {
	dm_sess *s;
	struct dm_req *r;		/* NULL: pump the writes of s */
	int64_t charged;		/* the estimate charged when taken, ns */
};

/* Queue a request / a pump step of s (false: one is queued already).  Under qmu. */
void dm_sched_add_req(dm_core *c, struct dm_req *r);
bool dm_sched_add_pump(dm_core *c, dm_sess *s);
/* The next item by deficit round robin; false when nothing waits.  Under qmu. */
bool dm_sched_pick(dm_core *c, struct dm_item *it);
/* The item took took_ns; an unfinished request goes back to the head of its
 * session's queue.  Under qmu. */
void dm_sched_done(dm_core *c, struct dm_item *it, int64_t took_ns, bool unfinished);
/* Does work wait for a worker?  Under qmu. */
bool dm_sched_waiting(const dm_core *c);
/* Free what s still has queued (the core is going away).  Under qmu. */
void dm_sched_free_queued(dm_core *c, dm_sess *s);

/* --- core.c -------------------------------------------------------------- */

struct dm_fstats {
	atomic_uint_fast64_t submitted, completed, failed, bytes;
};

struct dm_worker {
	dm_core *core;
	pthread_t tid;
	struct dm_exec *x;
};

struct dm_core {
	struct dm_config cfg;		/* chunk_bytes rounded up to DM_ALIGN */
	struct dm_kernels kern;
	const uint8_t *zeros;		/* chunk_bytes of read-only zeros */
	int efd;
	atomic_bool stopping;

	pthread_mutex_t submit_mu;
	struct dm_exec *inl;		/* the submitting thread's context */

	pthread_mutex_t qmu;
	pthread_cond_t qcv;
	struct dm_user *rhead, *rtail;	/* users with work queued (qmu) */
	uint64_t slices;		/* items workers ran (qmu) */
	uint64_t slice_bytes;		/* of a request a worker runs at once; 0: all */
	unsigned nworkers;		/* started (qmu) */
	unsigned maxworkers;		/* room in workers: the configured ones and spares */
	struct dm_worker *workers;

	pthread_mutex_t mu;
	dm_sess *sessions;
	dm_sess *nhead, *ntail;
	struct dm_req *xhead, **xtail;	/* external requests not yet taken */
	struct dm_req *xall;		/* every external request not yet completed */
	struct dm_user *users;		/* every user with a session (mu) */
	uint64_t nsessions;		/* open sessions (mu) */

	pthread_mutex_t iomu;		/* every session call */
	struct dm_sink sink;		/* where answers go */
	bool have_sink;
	bool down;			/* shutting down: every call ENXIO, every poll all events */
	struct dm_call **ctab;		/* every live call, hashed by unique (for interrupts) */
	size_t cbuckets, ncalls;
	unsigned nsignal;		/* calls waiting_signal */
	pthread_t watcher;		/* rechecks calls waiting_signal */
	pthread_cond_t watchcv;
	bool watching, have_watcher;
	struct dm_io_stats io;		/* counters kept under iomu */
	atomic_uint_fast64_t io_reads, io_writes, io_errors, io_polls, io_wakeups;

	atomic_uint_fast64_t outstanding, executing, meta_bytes;
	atomic_uint_fast64_t inline_runs, worker_runs, refused_limits, refused_user_limits;
	atomic_uint_fast64_t executing_bytes, run_bytes, busy_ns, external;
	struct dm_fstats fstats[DM_NFUNCS];
	struct dm_parts *parts;		/* parts of large requests, for idle workers (parts.c) */
	atomic_uint_fast64_t shared_runs;
};

/* Link s into the core's list of sessions as a session of user uid:
 * 0, or ENFILE at the global or the user's cap on sessions, or ENOMEM. */
int dm_core_attach(dm_core *c, dm_sess *s, uint32_t uid);
void dm_core_detach(dm_core *c, dm_sess *s);
/* Queue r to the workers (r holds a session reference). */
void dm_core_enqueue(dm_core *c, struct dm_req *r);
/* Have a worker pump the writes of s (takes a session reference). */
void dm_core_enqueue_pump(dm_core *c, dm_sess *s);
/* Start a spare worker when work waits and every worker is stuck in one
 * transfer (a client's memory on a slow FUSE file): a stalled request
 * delays only itself. */
void dm_core_check_stalls(dm_core *c);
/* Count n bytes of request metadata of user u against the global cap and
 * the user's: 0 or EAGAIN. */
int dm_core_meta_reserve(dm_core *c, struct dm_user *u, size_t n);
void dm_core_meta_release(dm_core *c, struct dm_user *u, size_t n);
/* Count one more outstanding request of user u against the caps: 0 or EAGAIN. */
int dm_core_req_reserve(dm_core *c, struct dm_user *u);
void dm_core_req_release(dm_core *c, struct dm_user *u, uint64_t n);
/* Put s on / take s off the notify list; call under s->mu.  Adding returns
 * true when the list was empty (the eventfd then needs a signal). */
bool dm_core_notify_add(dm_core *c, dm_sess *s);
void dm_core_notify_del(dm_core *c, dm_sess *s);
/* Make the eventfd readable. */
void dm_core_signal(dm_core *c);
/* Account a finished request. */
void dm_core_count(dm_core *c, const struct dm_req *r, int err);
/* Queue an accepted request of an external session for dm_core_take_external. */
void dm_core_park(dm_core *c, struct dm_req *r);
/* Forget an external request (it is being run or completed). */
void dm_core_unpark(dm_core *c, struct dm_req *r);

/* --- parts.c -------------------------------------------------------------- */

/*
 * Large requests split into parts that idle workers help with.  The thread
 * that posts a job runs parts itself until none is left untaken, then waits
 * for the ones other threads took: a job never waits for a free worker.
 */
typedef void dm_part_fn(void *job, size_t part, struct dm_exec *x);

/* A board; wake(arg) is called after a post, to wake the idle workers. */
struct dm_parts *dm_parts_new(void (*wake)(void *), void *arg);
void dm_parts_free(struct dm_parts *b);
/* Run fn(job, 0..n-1, x of whichever thread) and return when all are done. */
void dm_parts_run(struct dm_parts *b, dm_part_fn *fn, void *job, size_t n, struct dm_exec *x);
/* Are parts waiting to be taken?  (A worker checks it before sleeping.) */
bool dm_parts_pending(struct dm_parts *b);
/* Run waiting parts with x until none is left. */
void dm_parts_help(struct dm_parts *b, struct dm_exec *x);

/* --- fault.c -------------------------------------------------------------- */

/* Run fn(arg) in this thread; a SIGBUS inside it (a shared file truncated
 * under the server, hugetlbfs out of pages) ends it with EFAULT instead of
 * the server.  Returns fn's result or EFAULT. */
int dm_fault_guard(int (*fn)(void *), void *arg);

/* --- shared.c ------------------------------------------------------------- */

/* Drop every registration of s (the session closes). */
void dm_shared_close(dm_sess *s);
/* Free what dm_shared_close left (s is freed: nothing can reach it). */
void dm_shared_free(dm_sess *s);
/* Point the requests r[0..n) of writer x->peer whose operands all lie in
 * memory their writer registered with s at the server's mapping of it. */
void dm_shared_attach(dm_sess *s, struct dm_exec *x, struct dm_req *const *r, size_t n);
/* Drop the registrations r holds. */
void dm_shared_release(struct dm_req *r);

/* --- shrun.c -------------------------------------------------------------- */

/* Run bytes [from, from + len) of a request dm_shared_attach pointed at
 * shared memory, as a dm_run_fn does. */
dm_run_fn dm_shared_run;
/* A shared-memory request's slices are this many times slice_bytes. */
#define DM_SHARED_SLICES	4

#endif /* DMINT_H */
