/*
 * interrupts.c - pass FUSE_INTERRUPT on to the server.
 *
 * A client blocked in read() or write() on a session waits for the server's
 * answer; when it gets a signal the kernel sends FUSE_INTERRUPT, and libfuse
 * calls the interrupt function registered on that request with
 * fuse_req_interrupt_func().  pyfuse3 never registers one and does not let a
 * handler see its request, so a killed client would stay in uninterruptible
 * sleep until its request completed.  This file interposes
 * fuse_session_new() to wrap pyfuse3's read, write and write_buf operations:
 * the wrappers remember the request being dispatched, which the Python
 * handler (running right after, before any await) takes with
 * dmoverfs_current_request(), and watches when it is about to block.
 *
 * State: one FUSE session per server process, dispatched by one thread, so
 * the state is per process by nature; an interposer has no other place to
 * keep it.
 */
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <fuse_lowlevel.h>
#include <string.h>

#include "fuse_hooks.h"

typedef void read_op(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef void write_op(fuse_req_t, fuse_ino_t, const char *, size_t, off_t, struct fuse_file_info *);
typedef void write_buf_op(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t, struct fuse_file_info *);
typedef struct fuse_session *session_new_fn(struct fuse_args *, const struct fuse_lowlevel_ops *,
    size_t, void *);

static struct {
	struct fuse_lowlevel_ops ops;	/* pyfuse3's, with the data ops wrapped */
	read_op *read;
	write_op *write;
	write_buf_op *write_buf;
	fuse_req_t current;		/* the request dispatched last */
	void (*handler)(void *req);
	int installed;
} hooks;

static void
on_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	hooks.current = req;
	hooks.read(req, ino, size, off, fi);
}

static void
on_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
    struct fuse_file_info *fi)
{
	hooks.current = req;
	hooks.write(req, ino, buf, size, off, fi);
}

static void
on_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
    struct fuse_file_info *fi)
{
	hooks.current = req;
	hooks.write_buf(req, ino, bufv, off, fi);
}

struct fuse_session *
fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size,
    void *userdata)
{
	session_new_fn *real;

	*(void **)&real = dlsym(RTLD_NEXT, "fuse_session_new");
	if (real == NULL)
		return NULL;
	/* An ops table larger than ours comes from a newer libfuse: leave it alone. */
	if (op == NULL || op_size > sizeof(hooks.ops))
		return real(args, op, op_size, userdata);
	memset(&hooks.ops, 0, sizeof(hooks.ops));
	memcpy(&hooks.ops, op, op_size);
	if (hooks.ops.read != NULL) {
		hooks.read = hooks.ops.read;
		hooks.ops.read = on_read;
	}
	if (hooks.ops.write != NULL) {
		hooks.write = hooks.ops.write;
		hooks.ops.write = on_write;
	}
	if (hooks.ops.write_buf != NULL) {
		hooks.write_buf = hooks.ops.write_buf;
		hooks.ops.write_buf = on_write_buf;
	}
	hooks.installed = 1;
	return real(args, &hooks.ops, op_size, userdata);
}

int
dmoverfs_hooks_installed(void)
{
	return hooks.installed;
}

void *
dmoverfs_current_request(void)
{
	return hooks.current;
}

void
dmoverfs_set_interrupt_handler(void (*handler)(void *req))
{
	hooks.handler = handler;
}

static void
interrupted(fuse_req_t req, void *data)
{
	(void)data;
	if (hooks.handler != NULL)
		hooks.handler(req);
}

void
dmoverfs_watch_interrupt(void *req)
{
	fuse_req_interrupt_func(req, interrupted, NULL);
}

void
dmoverfs_unwatch_interrupt(void *req)
{
	fuse_req_interrupt_func(req, NULL, NULL);
}
