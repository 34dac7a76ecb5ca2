/* stream_open.h - see stream_open.c. */
#ifndef DMOVERFS_STREAM_OPEN_H
#define DMOVERFS_STREAM_OPEN_H

/* cdef begin */
/* Opens answered with FOPEN_STREAM since the library was loaded. */
unsigned long dmoverfs_stream_opens(void);
/* cdef end */

#endif
