/*
 * transport.h - the server's data plane: it owns /dev/fuse.
 *
 * The transport mounts the file system (through libfuse's public API),
 * reads every request the kernel sends, and serves the reads, writes, polls
 * and interrupts of session files itself, through the C core (dmcore.h).
 * Everything else goes, unchanged, to libfuse and pyfuse3 over one end of a
 * SOCK_SEQPACKET socket pair, which the control plane hands to libfuse as
 * the mount point "/dev/fd/N" (libfuse then uses that descriptor as its
 * connection and mounts nothing); their answers come back the same way and
 * go to the kernel, session opens marked FOPEN_STREAM on the way.
 *
 * The block between the cdef markers is read by the cffi builder.
 */
#ifndef DM_TRANSPORT_H
#define DM_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "dmcore.h"

/* cdef begin */
typedef struct dm_transport dm_transport;

struct dm_transport_config {
	const char *mountpoint;
	const char *options;		/* mount options, comma-separated (fsname=...,allow_other,...) */
	unsigned max_readers;		/* threads reading /dev/fuse, at most */
	unsigned min_proto_minor;	/* refuse a kernel speaking an older FUSE protocol */
};

/* What the transport is doing (dm_transport_state). */
enum {
	DM_TRANSPORT_RUNNING = 0,
	DM_TRANSPORT_UNMOUNTED = 1,	/* the kernel ended the connection */
	DM_TRANSPORT_REFUSED = 2,	/* it cannot work here: see dm_transport_message */
	DM_TRANSPORT_FAILED = 3,	/* /dev/fuse failed: see dm_transport_message */
};

struct dm_transport_stats {
	uint32_t proto_major, proto_minor;	/* the FUSE protocol in use (0 before FUSE_INIT) */
	uint32_t max_write;		/* bytes of a WRITE, at most */
	uint32_t readers;		/* threads reading /dev/fuse */
	uint32_t idle_readers;		/* of those, waiting in read() now */
	uint32_t max_readers;
	uint64_t requests;		/* read from /dev/fuse */
	uint64_t forwarded;		/* passed to libfuse */
	uint64_t answered_by_libfuse;	/* answers and notifications from libfuse */
	uint64_t session_calls;		/* reads, writes and polls of sessions served here */
	uint64_t interrupts;		/* FUSE_INTERRUPTs read */
	uint64_t stream_opens;		/* session opens answered with FOPEN_STREAM */
	uint64_t self_reads;		/* session reads by the server's own threads, refused */
	uint64_t handed_to_workers;	/* writes a worker submitted (no spare reader) */
	uint64_t files;			/* open session files registered */
};

/*
 * Mount at cfg->mountpoint and prepare to serve it with core.  NULL on
 * failure, with *err an errno and msg (msglen bytes) saying why.
 */
dm_transport *dm_transport_new(dm_core *core, const struct dm_transport_config *cfg, char *msg,
    size_t msglen, int *err);
/* The descriptor libfuse is to use: mount pyfuse3 at "/dev/fd/<this>". */
int dm_transport_libfuse_fd(dm_transport *t);
/* Start serving (the reader, relay and forwarding threads).  0 or an errno. */
int dm_transport_start(dm_transport *t);
/* Readable once the state is no longer DM_TRANSPORT_RUNNING. */
int dm_transport_eventfd(dm_transport *t);
int dm_transport_state(dm_transport *t);
const char *dm_transport_message(dm_transport *t);
/* Serve open file fh as a file of session s here (before the open is answered). */
int dm_transport_register(dm_transport *t, uint64_t fh, dm_sess *s);
/* fh is released: forget it (before its session may close). */
void dm_transport_unregister(dm_transport *t, uint64_t fh);
void dm_transport_stats(dm_transport *t, struct dm_transport_stats *out);
/* Unmount (lazily: clients still holding files see the connection end when
 * the transport is freed) and stop every thread of the transport.  Call
 * after libfuse's session is gone. */
void dm_transport_stop(dm_transport *t);
/* Free it, ending the connection: after the core is freed, since the core's
 * threads answer through the transport until then. */
void dm_transport_free(dm_transport *t);
/* cdef end */

#endif
