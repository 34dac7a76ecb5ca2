/*
 * stream_open.c - answer FUSE opens of session files with FOPEN_STREAM.
 *
 * A session file is a regular file to the VFS, so without FOPEN_STREAM every
 * read() and write() on a descriptor shared by threads takes the file's
 * f_pos lock: one thread blocked in read() waiting for responses would stop
 * another thread from writing the requests that produce them.  libfuse
 * (3.14) and pyfuse3 have no way to ask for FOPEN_STREAM, so this library
 * interposes fuse_reply_open(): loaded RTLD_GLOBAL before pyfuse3, it is
 * found first when pyfuse3 binds the symbol.  It builds the same reply
 * libfuse would, plus FOPEN_STREAM for opens marked nonseekable, and sends
 * it with the public fuse_reply_buf().
 */
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stdatomic.h>
#include <string.h>

#include "fuse_hooks.h"

static atomic_ulong stream_opens;	/* how many opens this reply served */

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
	struct fuse_open_out out;

	memset(&out, 0, sizeof(out));
	out.fh = fi->fh;
	if (fi->direct_io)
		out.open_flags |= FOPEN_DIRECT_IO;
	if (fi->keep_cache)
		out.open_flags |= FOPEN_KEEP_CACHE;
	if (fi->cache_readdir)
		out.open_flags |= FOPEN_CACHE_DIR;
	if (fi->noflush)
		out.open_flags |= FOPEN_NOFLUSH;
	if (fi->nonseekable) {
		out.open_flags |= FOPEN_NONSEEKABLE | FOPEN_STREAM;
		atomic_fetch_add(&stream_opens, 1);
	}
	return fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

unsigned long dmoverfs_stream_opens(void)
{
	return atomic_load(&stream_opens);
}
