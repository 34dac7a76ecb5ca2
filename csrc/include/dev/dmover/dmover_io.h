/*
 * dmover_io.h - client ABI of the dmoverfs data-mover device.
 *
 * The structures below are byte-for-byte the wire format of a dmoverfs
 * session file: write() an array of struct dmio_usrreq, read() back an
 * array of struct dmio_usrresp.  The layout is the native Linux x86-64 one
 * of NetBSD's <dev/dmover/dmover_io.h> (the post-2002 layout, with the
 * immediate in its own field and echoed back in the response), so programs
 * written for NetBSD's /dev/dmoverio compile unchanged.
 */
#ifndef DEV_DMOVER_DMOVER_IO_H
#define DEV_DMOVER_DMOVER_IO_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One scatter/gather list in the client's address space. */
typedef struct {
	struct iovec *dmbuf_iov;	/* array of dmbuf_iovcnt segments */
	unsigned int dmbuf_iovcnt;	/* 0 for "no buffer" (output only) */
} dmio_buffer;

/* A request, as written to a session. */
struct dmio_usrreq {
	dmio_buffer req_outbuf;		/* output region */
	uint8_t req_immediate[8];	/* immediate input, least significant byte first */
	dmio_buffer *req_inbuf;		/* one dmio_buffer per input of the function */
	uint32_t req_id;		/* echoed in the response */
};

/* A response, as read from a session. */
struct dmio_usrresp {
	uint32_t resp_id;		/* req_id of the request */
	int resp_error;			/* 0 or an errno value */
	uint8_t resp_immediate[8];	/* immediate result (e.g. the CRC) */
};

#define DMIO_MAX_FUNCNAME 64

/* Argument of DMIO_SETFUNC: the name of the function for the session. */
struct dmio_setfunc {
	char dsf_name[DMIO_MAX_FUNCNAME];
};

#define DMIO_SETFUNC	_IOW('D', 0, struct dmio_setfunc)

/* Requests a session may have outstanding (written, not yet read back) by default. */
#define DMIO_NREQS_MAX	64

/*
 * dmoverfs extensions: Linux FUSE has no ioctl for regular files, so a
 * session is configured through extended attributes on its descriptor.
 *   fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, "zero", 4, 0)   == DMIO_SETFUNC
 *   fsetxattr(fd, DMOVERFS_XATTR_NONBLOCK, "1", 1, 0)      == FIONBIO on
 */
#define DMOVERFS_XATTR_FUNCTION	"user.dmover.function"
#define DMOVERFS_XATTR_NONBLOCK	"user.dmover.nonblock"
/* Read-only: the pid of the server, in decimal; present on every session. */
#define DMOVERFS_XATTR_SERVER	"user.dmover.server"

/*
 * dmoverfs extension, shared buffers: memory the server maps too.  Requests
 * of a process whose every buffer lies in ranges it registered with the
 * session run on that memory directly (no copy, no system call per
 * transfer).  A range must be mapped MAP_SHARED and writable from a memfd,
 * a /dev/shm or a hugetlbfs file, page-aligned:
 *   fsetxattr(fd, DMOVERFS_XATTR_REGISTER, "FD OFFSET ADDR LEN", ...)
 *   fsetxattr(fd, DMOVERFS_XATTR_UNREGISTER, "ADDR LEN", ...)
 * (decimal, or 0x hex).  The server works on the registered pages until the
 * range is unregistered or the session closes, even if the process remaps
 * it meanwhile; requests in flight keep the pages they use.
 */
#define DMOVERFS_XATTR_REGISTER	"user.dmover.register"
#define DMOVERFS_XATTR_UNREGISTER	"user.dmover.unregister"

/*
 * The same through libdmoverio.so (link with -ldmoverio, or preload it):
 * len bytes of zeroed memory from a new memfd, registered with session fd,
 * or NULL with errno set (ENOSPC past the server's limits); and its release
 * (unregister, unmap): 0, or -1 with errno.  Not part of NetBSD's ABI.
 */
void *dmoverfs_shared_alloc(int fd, size_t len);
int dmoverfs_shared_free(int fd, void *buf, size_t len);

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && defined(__x86_64__)
_Static_assert(sizeof(dmio_buffer) == 16, "dmio_buffer is 16 bytes");
_Static_assert(sizeof(struct dmio_usrreq) == 40, "dmio_usrreq is 40 bytes");
_Static_assert(sizeof(struct dmio_usrresp) == 16, "dmio_usrresp is 16 bytes");
_Static_assert(sizeof(struct dmio_setfunc) == 64, "dmio_setfunc is 64 bytes");
#endif

#ifdef __cplusplus
}
#endif

#endif /* DEV_DMOVER_DMOVER_IO_H */
