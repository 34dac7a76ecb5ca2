/*
 * fuse_hooks.h - what the server's libfuse interposers (stream_open.c,
 * interrupts.c) offer to Python.  Loaded RTLD_GLOBAL before pyfuse3, so the
 * symbols they define are found before libfuse's own.
 */
#ifndef DMOVERFS_FUSE_HOOKS_H
#define DMOVERFS_FUSE_HOOKS_H

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
/* cdef end */

#endif
