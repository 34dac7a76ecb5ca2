/*
 * dmcore.h - the data-moving core of dmoverfs, as seen by the Python server.
 *
 * The server owns one dm_core (worker threads, bounce buffers, counters) and
 * one dm_sess per session.  The server's transport hands each session read,
 * write and poll of the kernel to dm_sess_call_read / _write / _poll, from
 * any of its threads; the core decides there, once, whether to answer now,
 * fail or wait, parks what waits, and answers through the sink when the
 * session changes, when the kernel interrupts the call, or at shutdown.
 * The other dm_sess_* calls come from the control plane, and dm_sess_close
 * only once no call of the session can still arrive.
 *
 * Life of a request: dm_sess_submit() decodes and validates it (reading the
 * iovec arrays from the client with process_vm_readv), then either runs it at
 * once (small requests) or queues it to a worker.  Its 16-byte response lands
 * in the session's ring; workers announce sessions that gained responses
 * through the core's eventfd, and dm_core_drain() lists them.  dm_sess_take()
 * hands responses out in completion order.
 *
 * The block between the cdef markers is read verbatim by the cffi builder:
 * it must stay plain declarations (no macros, no includes).
 */
#ifndef DMCORE_H
#define DMCORE_H

#include <stddef.h>
#include <stdint.h>

/* cdef begin */
typedef struct dm_core dm_core;
typedef struct dm_sess dm_sess;

/* Tunables fixed when the core is created. */
struct dm_config {
	unsigned workers;		/* worker threads, >= 1 */
	size_t chunk_bytes;		/* bounce buffer per operand per worker */
	size_t inline_bytes;		/* requests moving at most this run in the submitting thread */
	uint64_t max_requests;		/* global cap on outstanding requests, 0 = none */
	uint64_t max_meta_bytes;	/* global cap on decoded request metadata, 0 = none */
	uint64_t max_sessions;		/* global cap on open sessions, 0 = none */
	/* The same caps for each user (the uid a session was opened by), 0 = none. */
	uint64_t max_user_sessions;
	uint64_t max_user_requests;
	uint64_t max_user_meta_bytes;
	uint64_t slice_bytes;		/* a worker runs at most this much of a request before
					 * it turns to other work (rounded up to whole chunks);
					 * 0 = whole requests */
	int transport;			/* 1: sessions are served through dm_sess_call_* (completions
					 * wake those calls; the eventfd announces only external
					 * requests and EPERM); 0: completions are announced */
};

/* What the core's calls did, cumulative unless noted. */
struct dm_io_stats {
	uint64_t reads;			/* session reads answered */
	uint64_t writes;		/* session writes answered */
	uint64_t polls;			/* polls answered */
	uint64_t errors;		/* reads and writes answered with an error */
	uint64_t parked_reads;		/* reads that had to wait */
	uint64_t parked_writes;		/* writes that had to wait */
	uint64_t waiting_reads;		/* reads waiting now */
	uint64_t waiting_writes;	/* writes waiting now */
	uint64_t interrupts;		/* FUSE_INTERRUPTs for live calls */
	uint64_t interrupts_eintr;	/* of those, ended by a handled or fatal signal */
	uint64_t interrupts_ignored;	/* of those, for a signal that runs no handler: still waiting */
	uint64_t poll_wakeups;		/* poll notifications sent */
};

/* Counters per function, cumulative. */
struct dm_func_stats {
	uint64_t submitted;		/* accepted by dm_sess_submit */
	uint64_t completed;		/* finished with resp_error == 0 */
	uint64_t failed;		/* finished with resp_error != 0 */
	uint64_t bytes;			/* bytes of output (or input, for no-output functions) */
};

/* Counters of the whole core. */
struct dm_core_stats {
	uint64_t outstanding;		/* accepted, response not yet taken */
	uint64_t executing;		/* queued to or running on workers */
	uint64_t meta_bytes;		/* decoded request metadata held now */
	uint64_t inline_runs;		/* requests run in the submitting thread */
	uint64_t worker_runs;		/* requests run by workers */
	uint64_t refused_limits;	/* opens and submissions refused by a global cap */
	uint64_t refused_user_limits;	/* refused by a user's cap */
	uint64_t slices;		/* slices of requests and pump steps workers ran */
	uint64_t users;			/* users with a session open */
	/* The built-in back-end's load (requests run by the C code, external
	 * sessions' requests handed over with dm_req_run included). */
	uint64_t executing_bytes;	/* bytes of the requests queued to or running on workers */
	uint64_t run_bytes;		/* bytes of the requests run, cumulative */
	uint64_t busy_ns;		/* time spent running them (summed over threads) */
	uint64_t external;		/* external requests not yet completed */
	uint64_t shared_runs;		/* requests run directly on registered shared memory */
};

/* One session's state and counters (cumulative since it was opened). */
struct dm_sess_stats {
	uint32_t outstanding;		/* accepted, response not yet taken */
	uint32_t ready;			/* completed, response not yet taken */
	int func;			/* table index, -1 for none or an external one the table lacks */
	int external;			/* 1: its requests go to a back-end of the server */
	int nonblock;			/* the nonblock attribute */
	uint64_t completed;		/* requests finished with resp_error == 0 */
	uint64_t failed;		/* requests finished with resp_error != 0 */
	uint64_t bytes;			/* bytes of output (or input) of the completed ones */
	int64_t atime_ns, mtime_ns, ctime_ns;	/* last read, last write, open (ns since the epoch) */
};

/* A request of an external session (see dm_sess_set_external). */
typedef struct dm_req dm_req;

struct dm_req_info {
	uint64_t session;		/* the id given to dm_sess_new */
	uint32_t id;			/* req_id */
	int func;			/* table index, or -1 for a function the table lacks */
	int err;			/* function constraint error (e.g. EINVAL: output missing), or 0 */
	int ninputs;
	int has_output;
	uint64_t total;			/* bytes of the output, and of each input */
	uint8_t immediate[8];
};

/* The function table. Indices are stable for the life of the process. */
int dm_func_count(void);
const char *dm_func_name(int func);
int dm_func_ninputs(int func);		/* inputs the function takes */
int dm_func_has_output(int func);	/* 1 if it needs an output buffer, 0 if it must have none */
int dm_func_lookup(const char *name);	/* index, or -1 when unknown */

/* Create the core; NULL with *err set (an errno) on failure. */
dm_core *dm_core_new(const struct dm_config *cfg, int *err);
/* Stop the workers and free everything, including sessions not yet freed. */
void dm_core_free(dm_core *core);
/* Readable when dm_core_drain has something to report. */
int dm_core_eventfd(const dm_core *core);
/* Ids of sessions that gained responses from workers since the last call. */
size_t dm_core_drain(dm_core *core, uint64_t *ids, size_t max);
void dm_core_stats(dm_core *core, struct dm_core_stats *out,
    struct dm_func_stats *per_func, int nfunc);
/* A user's share of the caps, now. */
struct dm_user_stats {
	uint32_t uid;
	uint64_t sessions;		/* open */
	uint64_t outstanding;		/* requests accepted, responses not yet taken */
	uint64_t meta_bytes;		/* decoded request metadata held */
	uint64_t queued;		/* requests waiting for a worker */
	uint64_t refused;		/* opens and submissions refused by its caps, cumulative */
};
/* Up to max users (most outstanding first); returns how many were written
 * to out; *total, when not NULL, is how many there are. */
size_t dm_core_users(dm_core *core, struct dm_user_stats *out, size_t max, size_t *total);
/* Which CRC32C / XOR kernels are in use, e.g. "crc32c=isa-l xor=isa-l". */
const char *dm_core_kernels(const dm_core *core);

/*
 * A session serving the memory of process pid.  The session takes ownership
 * of pidfd (a pidfd_open of pid, closed when the session is freed) and uses
 * it to refuse to touch pid once that process has exited.
 */
dm_sess *dm_sess_new(dm_core *core, uint64_t id, int pid, int pidfd, unsigned depth);
/* The same for a session opened by user uid, counted against the caps on
 * sessions; NULL with *err ENFILE at a cap, EINVAL or ENOMEM (the caller
 * then still owns pidfd). */
dm_sess *dm_sess_open(dm_core *core, uint64_t id, int pid, int pidfd, uint32_t uid,
    unsigned depth, int *err);
/* Drop the server's reference: unread responses are discarded, requests
 * still executing finish harmlessly, the session is freed after the last. */
void dm_sess_close(dm_sess *s);
/* 0, or ESRCH for an unknown function, EBUSY when one is already set. */
int dm_sess_setfunc(dm_sess *s, int func);
/*
 * Validate and start up to nreq packed struct dmio_usrreq (40 bytes each),
 * stopping early when the session has depth requests outstanding.
 * Returns the number accepted.  *err is 0, or the errno that stopped the
 * request after the accepted ones (EINVAL, EFAULT, EPERM from validation;
 * EAGAIN from a global cap; ENXIO when no function is set).
 */
size_t dm_sess_submit(dm_sess *s, const void *reqs, size_t nreq, int *err);
/* Move up to max ready responses (16 bytes each) into resps; returns how many. */
size_t dm_sess_take(dm_sess *s, void *resps, size_t max);
/* Outstanding (accepted, not yet taken) and ready (completed, not yet taken). */
void dm_sess_counts(dm_sess *s, unsigned *outstanding, unsigned *ready);
/* The nonblock attribute (FIONBIO): every call of the session is non-blocking. */
void dm_sess_set_nonblock(dm_sess *s, int on);
int dm_sess_nonblock(dm_sess *s);
/* Times in ns since the epoch: [0] last read, [1] last write, [2] open. */
void dm_sess_times(dm_sess *s, int64_t *times);
/* A snapshot of the session's state and counters. */
void dm_sess_stats(dm_sess *s, struct dm_sess_stats *out);
/* 1 once after a write of the session met EPERM (the server explains it). */
int dm_sess_take_eperm(dm_sess *s);
/* Calls waiting now: [0] reads, [1] writes, [2] poll handles. */
void dm_sess_waiting(dm_sess *s, unsigned *counts);

/*
 * Shared memory (a dmoverfs extension): thread tid (inside its setxattr,
 * with the rights uid / gid) registers [addr, addr + len) of its address
 * space, which it maps MAP_SHARED, writable, from its descriptor fd (a
 * memfd, a /dev/shm or hugetlbfs file) at file offset off.  Requests that
 * thread's process writes to s whose operands all lie in its registrations
 * then run on the server's own mapping of those pages.  0, or EINVAL (bad
 * numbers, not page-aligned, not a shared-memory file, beyond its end, or
 * mapped there from another offset), EBADF (fd not open in the process),
 * EFAULT (the range is not wholly mapped from that file), EACCES (mapped
 * private or read-only, or the file not open for writing), EPERM (no
 * ptrace access), EEXIST (overlaps a registration of the process),
 * ENOSPC (the session's or the user's limit), ENOMEM.
 */
int dm_sess_register(dm_sess *s, int tid, uint32_t uid, uint32_t gid, int fd, uint64_t off,
    uint64_t addr, uint64_t len);
/* Drop the registration of tid's process at exactly [addr, addr + len):
 * 0, or ENOENT.  Requests in flight keep its pages mapped until they end. */
int dm_sess_unregister(dm_sess *s, int tid, uint64_t addr, uint64_t len);
/* Registrations of s: [0] count, [1] bytes. */
void dm_sess_shared(dm_sess *s, uint64_t *out);

/* Shutting down: answer every waiting call with ENXIO and wake every
 * poller; from now on calls fail with ENXIO and polls report every event. */
void dm_core_shutdown(dm_core *c);
void dm_core_io_stats(dm_core *c, struct dm_io_stats *out);

/*
 * External sessions: requests performed by someone else (a back-end of the
 * server).  Selects the session's function like dm_sess_setfunc, but every
 * request dm_sess_submit accepts (decoded and validated exactly as usual,
 * and counted against the same caps) is queued on the core's list of
 * external requests instead of running.  func is a table index, whose
 * shape ninputs / has_output must then match the table's, or -1 for a
 * function the table lacks, performed with that shape.  0, or ESRCH (bad
 * index), EINVAL (bad shape), EBUSY (a function is already set).
 */
int dm_sess_set_external(dm_sess *s, int func, int ninputs, int has_output);
/* Take up to max external requests, oldest first; call after dm_sess_submit. */
size_t dm_core_take_external(dm_core *core, dm_req **out, size_t max);
void dm_req_info(const dm_req *r, struct dm_req_info *info);
/*
 * Copy len bytes at offset off of input i (or of the output) between the
 * client and buf, through the request's scatter/gather lists.  0, or
 * EINVAL (no such operand, range beyond it), EFAULT (client memory),
 * EPERM (no ptrace access), ECANCELED (session closed, core stopping).
 * May be called from any thread, several at once, until r is completed.
 */
int dm_req_read(dm_req *r, unsigned input, uint64_t off, void *buf, size_t len);
int dm_req_write(dm_req *r, uint64_t off, const void *buf, size_t len);
/* Hand r to the built-in back-end (run now when small, else on a worker);
 * a function the table lacks fails with ENOSYS.  r is gone afterwards. */
void dm_req_run(dm_req *r);
/* Deliver r's response (imm may be NULL: zeros) and free r, as a worker's
 * completion does (waking the session's calls, or announcing it on the
 * eventfd without the transport); a closed session's response is discarded. */
void dm_req_complete(dm_req *r, int err, const uint8_t *imm);

/* --- the calls of the server's transport ------------------------------------ */

/* Where the core sends answers: the transport writes them to the kernel. */
struct dm_sink {
	void *ctx;
	/* Answer read request unique: err 0 with len bytes of responses, or an errno. */
	void (*answer_read)(void *ctx, uint64_t unique, int err, const void *data, size_t len);
	/* Answer write request unique: err 0 with the bytes accepted, or an errno. */
	void (*answer_write)(void *ctx, uint64_t unique, int err, size_t accepted);
	/* Tell the kernel that poll handle kh may have new events. */
	void (*wake_poll)(void *ctx, uint64_t kh);
	/* Is tid a thread of the server itself?  (A fault on a mapping of a
	 * session file inside the server's own access to a client: such a read
	 * must never wait.)  May be NULL. */
	int (*is_own_thread)(void *ctx, int tid);
};

/* The kernel's facts about one read or write. */
struct dm_call_in {
	uint64_t unique;	/* the request's id, the key of its answer */
	int tid;		/* the calling thread */
	int nonblock;		/* the file's O_NONBLOCK when the call was made */
	uint32_t uid, gid;	/* the caller's: a root server reaches its memory with these rights */
};

typedef struct dm_exec dm_exec;

/* Set once, before the first call. */
void dm_core_set_sink(dm_core *c, const struct dm_sink *sink);
/* A context for a thread that submits writes (bounce buffers, scratch). */
dm_exec *dm_core_exec_new(dm_core *c);
void dm_core_exec_free(dm_exec *x);
/*
 * A write of len bytes of requests.  x is the calling thread's context when
 * it may touch the client's memory, else NULL (a worker does it).  data
 * need not outlive the call: what waits is copied.  Answered through the
 * sink, now or later.
 */
void dm_sess_call_write(dm_sess *s, dm_exec *x, const struct dm_call_in *in, const void *data, size_t len);
/* A read of len bytes of responses; scratch holds len bytes for an answer made now. */
void dm_sess_call_read(dm_sess *s, const struct dm_call_in *in, size_t len, void *scratch);
/* Poll: the events ready now; with notify, kh is woken once they may have changed. */
unsigned dm_sess_call_poll(dm_sess *s, uint64_t kh, int notify);
/* The kernel interrupted request unique (the caller got a signal). */
void dm_core_call_interrupt(dm_core *c, uint64_t unique);
/* cdef end */

#endif /* DMCORE_H */
