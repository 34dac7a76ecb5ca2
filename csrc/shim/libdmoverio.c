/*
 * libdmoverio.c - an LD_PRELOAD shim that lets programs written for
 * NetBSD's /dev/dmoverio run unmodified on a dmoverfs mount.
 *
 * Linux FUSE has no ioctl() for regular files, so a dmoverfs session is
 * configured with extended attributes.  This library interposes the libc
 * calls a NetBSD program uses and, on a descriptor that is a dmoverfs
 * session, turns them into those attributes:
 *
 *   ioctl(fd, DMIO_SETFUNC, &dsf)  -> fsetxattr(fd, "user.dmover.function")
 *   ioctl(fd, FIONBIO, &on)        -> fsetxattr(fd, "user.dmover.nonblock"),
 *                                     then the real FIONBIO (kernel flag)
 *   fcntl(fd, F_SETFL, flags)      -> fsetxattr(fd, "user.dmover.nonblock"),
 *                                     then the real fcntl
 *   ioctl(fd, FIOASYNC, &on)       -> 0, as NetBSD's dmio_ioctl
 *   ioctl(fd, FIOCLEX / FIONCLEX)  -> the real ioctl (NetBSD handles these
 *                                     in the descriptor layer, before the
 *                                     device sees them)
 *   any other ioctl                -> -1, ENOTTY
 *
 *   open("/dev/dmoverio", ...)     -> when /dev/dmoverio does not exist,
 *                                     $DMOVERIO_PATH if set, else "dmoverio"
 *                                     under the default mount point
 *   write(fd, ...) failing EPERM   -> the server may not read this process
 *                                     (Yama ptrace_scope): grant it with
 *                                     prctl(PR_SET_PTRACER, server) and
 *                                     retry once
 *
 * Every other descriptor and call goes to libc untouched, with errno as
 * libc leaves it.
 *
 * A descriptor is a session when fstatfs() says FUSE (FUSE_SUPER_MAGIC) and
 * fgetxattr("user.dmover.server") answers a pid: only dmoverfs sessions
 * have that attribute.  The answer is cached per descriptor.
 *
 * Process-wide state (what an interposer needs, nothing more):
 *   - real[]: the next definition of each interposed function
 *     (dlsym(RTLD_NEXT)), resolved by the constructor and, for calls made
 *     before it ran (other libraries' constructors), on first use;
 *   - fdcache[]: for descriptors below FDCACHE_SIZE, what the shim learnt
 *     about them; descriptors beyond are queried every time.  Each slot is
 *     one atomic word: a generation that close()/dup2()/dup3()/
 *     close_range()/closefrom()/fclose()/open() bump, and the answer
 *     (unknown / not a session / the server's pid).  An answer is stored
 *     only if the generation did not move while it was being found out, so
 *     a descriptor closed and reused meanwhile is never given the old
 *     file's answer.  Descriptors closed behind libc's back (a raw close
 *     syscall) are not seen; such a program gets stale answers for that
 *     number.
 * Both are lock-free, so the interposed calls stay async-signal-safe and
 * fork-safe.  Neither needs the constructor: the zero state is valid.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -O2 -fPIC -shared
 *        -I../include -o libdmoverio.so libdmoverio.c -ldl
 */
#undef _FORTIFY_SOURCE		/* we define open() & co: no fortify inlines */
#undef _FILE_OFFSET_BITS	/* open and open64 are separate symbols here */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#define SHIM_EXPORT	__attribute__((visibility("default")))

#define FUSE_MAGIC	0x65735546L	/* FUSE_SUPER_MAGIC */
#define DEVICE		"/dev/dmoverio"
#define FDCACHE_SIZE	16384

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER	0x59616d61
#endif

/* glibc's fortify entry points: called instead of open() & co when the
 * program is built with _FORTIFY_SOURCE and the flags are not constant. */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "the descriptor cache must be lock-free");

/* -- the real functions -------------------------------------------------------------- */

enum real_id {
	R_IOCTL, R_FCNTL, R_FCNTL64, R_WRITE, R_CLOSE, R_DUP, R_DUP2, R_DUP3,
	R_FCLOSE, R_CLOSE_RANGE, R_CLOSEFROM,
	R_OPEN, R_OPEN64, R_OPENAT, R_OPENAT64,
	R_OPEN_2, R_OPEN64_2, R_OPENAT_2, R_OPENAT64_2,
	R_COUNT
};

static const char *const real_names[R_COUNT] = {
	[R_IOCTL] = "ioctl", [R_FCNTL] = "fcntl", [R_FCNTL64] = "fcntl64",
	[R_WRITE] = "write", [R_CLOSE] = "close", [R_DUP] = "dup",
	[R_DUP2] = "dup2", [R_DUP3] = "dup3", [R_FCLOSE] = "fclose",
	[R_CLOSE_RANGE] = "close_range", [R_CLOSEFROM] = "closefrom",
	[R_OPEN] = "open", [R_OPEN64] = "open64", [R_OPENAT] = "openat",
	[R_OPENAT64] = "openat64", [R_OPEN_2] = "__open_2",
	[R_OPEN64_2] = "__open64_2", [R_OPENAT_2] = "__openat_2",
	[R_OPENAT64_2] = "__openat64_2",
};

/* A function pointer of no particular type; each caller converts it back
 * to the real function's type (C11 6.3.2.3p8 allows the round trip). */
typedef void (*any_fn)(void);

/* Next definitions of the interposed functions; NULL until looked up. */
static _Atomic(any_fn) real[R_COUNT];

/* The next definition of function id, or NULL if there is none (then the
 * callers fall back to the system call).  Safe before the constructor. */
static any_fn
real_fn(enum real_id id)
{
	any_fn fn = atomic_load_explicit(&real[id], memory_order_acquire);

	if (fn == NULL) {
		int saved = errno;
		void *sym = dlsym(RTLD_NEXT, real_names[id]);

		errno = saved;
		/* POSIX: a function's address from dlsym converts to a
		 * function pointer; memcpy keeps -Wpedantic quiet. */
		memcpy(&fn, &sym, sizeof(fn));
		if (fn != NULL)
			atomic_store_explicit(&real[id], fn, memory_order_release);
	}
	return fn;
}

/* The real functions' types. */
typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef int (*fcntl_fn)(int, int, ...);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef int (*close_fn)(int);
typedef int (*dup_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);
typedef int (*fclose_fn)(FILE *);
typedef int (*close_range_fn)(unsigned, unsigned, int);
typedef void (*closefrom_fn)(int);
typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open2_fn)(const char *, int);
typedef int (*openat2_fn)(int, const char *, int);

#define REAL(type, id)	((type)real_fn(id))

__attribute__((constructor(101)))
static void
shim_init(void)
{
	/* Look everything up now, so that later calls (from signal handlers,
	 * after fork) never run dlsym. */
	for (int id = 0; id < R_COUNT; id++)
		(void)real_fn((enum real_id)id);
}

/* -- which descriptors are sessions ----------------------------------------------- */

/* The low half of a cache slot; the high half is the generation. */
#define ANSWER_UNKNOWN	0u
#define ANSWER_NO	0xffffffffu	/* not a session */
/* anything else: a session, served by that pid */

static _Atomic uint64_t fdcache[FDCACHE_SIZE];

/* What fd is now: >0 the server's pid; 0 not a session; -1 unknown
 * (fd not open, or a transient failure: do not remember it). */
static long
query_session(int fd)
{
	struct statfs sfs;
	char buf[24];
	ssize_t n;
	long pid = 0;

	if (fstatfs(fd, &sfs) != 0)
		return -1;
	if ((long)sfs.f_type != FUSE_MAGIC)
		return 0;
	n = fgetxattr(fd, DMOVERFS_XATTR_SERVER, buf, sizeof(buf) - 1);
	if (n < 0)
		return (errno == ENODATA || errno == ENOTSUP || errno == ERANGE) ? 0 : -1;
	if (n == 0 || n > 10)
		return 0;
	for (ssize_t i = 0; i < n; i++) {
		if (buf[i] < '0' || buf[i] > '9')
			return 0;
		pid = pid * 10 + (buf[i] - '0');
	}
	return (pid > 0 && pid <= INT_MAX) ? pid : 0;
}

/* The server's pid if fd is a dmoverfs session, else 0.  Keeps errno. */
static pid_t
session_server(int fd)
{
	int saved = errno;
	_Atomic uint64_t *slot;
	uint64_t seen;
	uint32_t answer;
	long q;

	if (fd < 0)
		return 0;
	if (fd >= FDCACHE_SIZE) {
		q = query_session(fd);
		errno = saved;
		return q > 0 ? (pid_t)q : 0;
	}
	slot = &fdcache[fd];
	seen = atomic_load_explicit(slot, memory_order_acquire);
	answer = (uint32_t)seen;
	if (answer == ANSWER_UNKNOWN) {
		q = query_session(fd);
		errno = saved;
		if (q < 0)
			return 0;
		answer = q > 0 ? (uint32_t)q : ANSWER_NO;
		/* Only if no close()/dup2() over fd happened meanwhile. */
		(void)atomic_compare_exchange_strong(slot, &seen,
		    (seen & ~(uint64_t)UINT32_MAX) | answer);
	}
	return answer == ANSWER_NO ? 0 : (pid_t)answer;
}

/* fd now names another file (or none): forget what was known about it. */
static void
forget(int fd)
{
	if (fd >= 0 && fd < FDCACHE_SIZE) {
		_Atomic uint64_t *slot = &fdcache[fd];
		uint64_t old = atomic_load_explicit(slot, memory_order_relaxed);

		/* New generation, answer unknown. */
		while (!atomic_compare_exchange_weak(slot, &old,
		    ((old >> 32) + 1) << 32))
			;
	}
}

static void
forget_range(unsigned first, unsigned last)
{
	if (last >= FDCACHE_SIZE)
		last = FDCACHE_SIZE - 1;
	for (unsigned fd = first; fd <= last && fd < FDCACHE_SIZE; fd++)
		forget((int)fd);
}

/* -- ioctl ------------------------------------------------------------------------- */

/* Copy n bytes of this process's memory at addr, failing with EFAULT
 * instead of crashing when addr is bad (NetBSD's copyin does the same). */
static int
copy_in(void *dst, const void *addr, size_t n)
{
	struct iovec local = { dst, n };
	struct iovec remote = { (void *)(uintptr_t)addr, n };
	ssize_t got;

	if (addr == NULL) {
		errno = EFAULT;
		return -1;
	}
	got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
	if (got == (ssize_t)n)
		return 0;
	if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
		/* Reading oneself refused (seccomp, say): trust the pointer. */
		memcpy(dst, addr, n);
		return 0;
	}
	errno = EFAULT;
	return -1;
}

static int
set_nonblock(int fd, bool on)
{
	return fsetxattr(fd, DMOVERFS_XATTR_NONBLOCK, on ? "1" : "0", 1, 0);
}

/* The real ioctl. */
static int
next_ioctl(int fd, unsigned long req, void *arg)
{
	ioctl_fn next = REAL(ioctl_fn, R_IOCTL);

	return next != NULL ? next(fd, req, arg) : (int)syscall(SYS_ioctl, fd, req, arg);
}

/* ioctl on a dmoverfs session: NetBSD's dmio_ioctl. */
static int
session_ioctl(int fd, unsigned long req, void *arg)
{
	struct dmio_setfunc dsf;
	int on;

	switch ((unsigned int)req) {	/* the kernel compares 32 bits too */
	case DMIO_SETFUNC:
		if (copy_in(&dsf, arg, sizeof(dsf)) != 0)
			return -1;
		/* NetBSD cuts the name at DMIO_MAX_FUNCNAME - 1 bytes. */
		return fsetxattr(fd, DMOVERFS_XATTR_FUNCTION, dsf.dsf_name,
		    strnlen(dsf.dsf_name, DMIO_MAX_FUNCNAME - 1), 0);
	case FIONBIO:
		if (copy_in(&on, arg, sizeof(on)) != 0)
			return -1;
		if (set_nonblock(fd, on != 0) != 0)
			return -1;
		/* Keep the open file's O_NONBLOCK (fcntl F_GETFL) in step. */
		return next_ioctl(fd, req, arg);
	case FIOASYNC:
		return 0;
	case FIOCLEX:
	case FIONCLEX:
		return next_ioctl(fd, req, arg);
	default:
		errno = ENOTTY;
		return -1;
	}
}

SHIM_EXPORT int
ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;

	/* ioctl's third argument is a pointer or an int; glibc reads it as a
	 * pointer too, and passes the register on unchanged. */
	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (session_server(fd) > 0)
		return session_ioctl(fd, req, arg);
	return next_ioctl(fd, req, arg);
}

/* -- fcntl ------------------------------------------------------------------------- */

enum arg_kind { ARG_NONE, ARG_INT, ARG_PTR };

/* The type of fcntl's third argument for cmd (unknown commands: a pointer,
 * as glibc reads it). */
static enum arg_kind
fcntl_arg(int cmd)
{
	switch (cmd) {
	case F_GETFD:
	case F_GETFL:
	case F_GETOWN:
#ifdef F_GETSIG
	case F_GETSIG:
#endif
#ifdef F_GETLEASE
	case F_GETLEASE:
#endif
#ifdef F_GETPIPE_SZ
	case F_GETPIPE_SZ:
#endif
#ifdef F_GET_SEALS
	case F_GET_SEALS:
#endif
		return ARG_NONE;
	case F_DUPFD:
	case F_DUPFD_CLOEXEC:
	case F_SETFD:
	case F_SETFL:
	case F_SETOWN:
#ifdef F_SETSIG
	case F_SETSIG:
#endif
#ifdef F_SETLEASE
	case F_SETLEASE:
#endif
#ifdef F_NOTIFY
	case F_NOTIFY:
#endif
#ifdef F_SETPIPE_SZ
	case F_SETPIPE_SZ:
#endif
#ifdef F_ADD_SEALS
	case F_ADD_SEALS:
#endif
		return ARG_INT;
	default:
		return ARG_PTR;
	}
}

static int
shim_fcntl(enum real_id id, int fd, int cmd, va_list ap)
{
	fcntl_fn next = REAL(fcntl_fn, id);
	int iarg = 0, r;
	void *parg = NULL;
	enum arg_kind kind = fcntl_arg(cmd);

	if (kind == ARG_INT)
		iarg = va_arg(ap, int);
	else if (kind == ARG_PTR)
		parg = va_arg(ap, void *);

	if (cmd == F_SETFL && session_server(fd) > 0 &&
	    set_nonblock(fd, (iarg & O_NONBLOCK) != 0) != 0)
		return -1;

	if (next == NULL)
		r = (int)syscall(SYS_fcntl, fd, cmd, kind == ARG_PTR ? (long)(uintptr_t)parg : (long)iarg);
	else if (kind == ARG_NONE)
		r = next(fd, cmd);
	else if (kind == ARG_INT)
		r = next(fd, cmd, iarg);
	else
		r = next(fd, cmd, parg);

	if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) {
		int saved = errno;

		forget(r);	/* the new descriptor is learnt when used */
		errno = saved;
	}
	return r;
}

SHIM_EXPORT int
fcntl(int fd, int cmd, ...)
{
	va_list ap;
	int r;

	va_start(ap, cmd);
	r = shim_fcntl(R_FCNTL, fd, cmd, ap);
	va_end(ap);
	return r;
}

SHIM_EXPORT int
fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	int r;

	va_start(ap, cmd);
	r = shim_fcntl(R_FCNTL64, fd, cmd, ap);
	va_end(ap);
	return r;
}

/* -- write: Yama ------------------------------------------------------------------- */

SHIM_EXPORT ssize_t
write(int fd, const void *buf, size_t len)
{
	write_fn next = REAL(write_fn, R_WRITE);
	ssize_t r = next != NULL ? next(fd, buf, len) : syscall(SYS_write, fd, buf, len);
	pid_t server;

	if (r >= 0 || errno != EPERM)
		return r;
	/*
	 * A session refuses a write with EPERM when its server may not read
	 * this process's memory; under Yama (ptrace_scope 1) naming the server
	 * as our ptracer allows it.  Otherwise the EPERM stands.
	 */
	server = session_server(fd);
	if (server > 0 && prctl(PR_SET_PTRACER, (unsigned long)server, 0UL, 0UL, 0UL) == 0)
		return next != NULL ? next(fd, buf, len) : syscall(SYS_write, fd, buf, len);
	errno = EPERM;
	return -1;
}

/* -- descriptors going away -------------------------------------------------------- */

/*
 * A descriptor that is closed or replaced is forgotten twice: before, so
 * that another thread which gets the number from a call the shim does not
 * see (pipe, socket, accept...) right after the close finds nothing stale;
 * and after, in case a thread learnt the old file's answer in between.
 */
SHIM_EXPORT int
close(int fd)
{
	close_fn next = REAL(close_fn, R_CLOSE);
	int r, saved;

	forget(fd);
	r = next != NULL ? next(fd) : (int)syscall(SYS_close, fd);
	saved = errno;
	/* Linux releases fd even when close fails (EINTR, EIO). */
	forget(fd);
	errno = saved;
	return r;
}

SHIM_EXPORT int
dup(int old)
{
	dup_fn next = REAL(dup_fn, R_DUP);
	int r = next != NULL ? next(old) : (int)syscall(SYS_dup, old);
	int saved = errno;

	forget(r);
	errno = saved;
	return r;
}

SHIM_EXPORT int
dup2(int old, int new)
{
	dup2_fn next = REAL(dup2_fn, R_DUP2);
	int r, saved;

	if (old != new)
		forget(new);
	r = next != NULL ? next(old, new) : (int)syscall(SYS_dup2, old, new);
	saved = errno;
	if (old != new)
		forget(new);
	errno = saved;
	return r;
}

SHIM_EXPORT int
dup3(int old, int new, int flags)
{
	dup3_fn next = REAL(dup3_fn, R_DUP3);
	int r, saved;

	forget(new);
	r = next != NULL ? next(old, new, flags) : (int)syscall(SYS_dup3, old, new, flags);
	saved = errno;
	forget(new);
	errno = saved;
	return r;
}

SHIM_EXPORT int
fclose(FILE *stream)
{
	fclose_fn next = REAL(fclose_fn, R_FCLOSE);
	/*
	 * A NULL stream goes to libc's fclose untouched.  glibc >= 2.41
	 * declares the argument non-null, which lets the compiler drop a test
	 * of it (and warn about one): the test is made on a copy it cannot
	 * reason about.
	 */
	FILE *volatile any = stream;
	int fd = any != NULL ? fileno(any) : -1;
	int r, saved;

	if (next == NULL) {	/* cannot happen with a libc; be explicit */
		errno = ENOSYS;
		return EOF;
	}
	forget(fd);
	r = next(stream);
	saved = errno;
	forget(fd);
	errno = saved;
	return r;
}

#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 34)
SHIM_EXPORT int
close_range(unsigned int first, unsigned int last, int flags)
{
	close_range_fn next = REAL(close_range_fn, R_CLOSE_RANGE);
	int r, saved;

	/* CLOSE_RANGE_CLOEXEC closes nothing now; forgetting costs nothing. */
	forget_range(first, last);
	r = next != NULL ? next(first, last, flags) : (int)syscall(SYS_close_range, first, last, flags);
	saved = errno;
	forget_range(first, last);
	errno = saved;
	return r;
}

SHIM_EXPORT void
closefrom(int lowfd)
{
	closefrom_fn next = REAL(closefrom_fn, R_CLOSEFROM);
	int saved;

	if (lowfd >= 0)
		forget_range((unsigned)lowfd, FDCACHE_SIZE - 1);
	if (next != NULL)
		next(lowfd);
	else
		(void)syscall(SYS_close_range, (unsigned)lowfd, ~0U, 0);
	saved = errno;
	if (lowfd >= 0)
		forget_range((unsigned)lowfd, FDCACHE_SIZE - 1);
	errno = saved;
}
#endif

/* -- open("/dev/dmoverio") --------------------------------------------------------- */

/*
 * The default mount point, as dmoverfs/paths.py default_mountpoint():
 * $DMOVERFS_MOUNTPOINT; /run/dmoverfs for root; $XDG_RUNTIME_DIR/dmoverfs
 * when that is a directory; else /tmp/dmoverfs-UID.
 */
static int
default_mountpoint(char *buf, size_t size)
{
	const char *env = getenv("DMOVERFS_MOUNTPOINT");
	const char *runtime;
	struct stat st;
	int n;

	if (env != NULL && env[0] != '\0')
		n = snprintf(buf, size, "%s", env);
	else if (geteuid() == 0)
		n = snprintf(buf, size, "/run/dmoverfs");
	else if ((runtime = getenv("XDG_RUNTIME_DIR")) != NULL && runtime[0] != '\0' &&
	    stat(runtime, &st) == 0 && S_ISDIR(st.st_mode))
		n = snprintf(buf, size, "%s/dmoverfs", runtime);
	else
		n = snprintf(buf, size, "/tmp/dmoverfs-%lu", (unsigned long)geteuid());
	if (n < 0 || (size_t)n >= size) {
		errno = ENAMETOOLONG;
		return -1;
	}
	return 0;
}

/* --- shared buffers (a dmoverfs extension, see dmover_io.h) ----------------- */

SHIM_EXPORT void *
dmoverfs_shared_alloc(int fd, size_t len)
{
	char value[96];
	void *buf = MAP_FAILED;
	int mfd, err = 0;

	if (len == 0 || len > (size_t)INT64_MAX) {
		errno = EINVAL;
		return NULL;
	}
	if ((mfd = (int)syscall(SYS_memfd_create, "dmoverfs-shared", 1u /* MFD_CLOEXEC */)) < 0)
		return NULL;
	if (ftruncate(mfd, (off_t)len) != 0 ||
	    (buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0)) == MAP_FAILED)
		err = errno;
	else {
		snprintf(value, sizeof(value), "%d 0 %ju %zu", mfd, (uintmax_t)(uintptr_t)buf, len);
		if (fsetxattr(fd, DMOVERFS_XATTR_REGISTER, value, strlen(value), 0) != 0) {
			err = errno;
			munmap(buf, len);
		}
	}
	close(mfd);	/* the mapping and the server hold the file */
	if (err != 0) {
		errno = err;
		return NULL;
	}
	return buf;
}

SHIM_EXPORT int
dmoverfs_shared_free(int fd, void *buf, size_t len)
{
	char value[64];
	int r, err;

	snprintf(value, sizeof(value), "%ju %zu", (uintmax_t)(uintptr_t)buf, len);
	r = fsetxattr(fd, DMOVERFS_XATTR_UNREGISTER, value, strlen(value), 0);
	err = errno;
	/* Requests in flight keep the server's mapping: unmapping here is safe. */
	if (munmap(buf, len) != 0 && r == 0)
		return -1;
	errno = err;
	return r;
}

/*
 * Where open("/dev/dmoverio") goes when /dev/dmoverio does not exist:
 * $DMOVERIO_PATH if set, else "dmoverio" under the default mount point.
 * Returns 0 and the path in buf, or -1 with errno set.  Exported so that
 * the path rule can be checked against the Python one.
 */
SHIM_EXPORT int
dmoverio_shim_device_path(char *buf, size_t size)
{
	const char *env = getenv("DMOVERIO_PATH");
	size_t len;

	if (env != NULL && env[0] != '\0') {
		if (strlen(env) >= size) {
			errno = ENAMETOOLONG;
			return -1;
		}
		memcpy(buf, env, strlen(env) + 1);
		return 0;
	}
	if (default_mountpoint(buf, size) != 0)
		return -1;
	len = strlen(buf);
	if (len + sizeof("/dmoverio") > size) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf + len, "/dmoverio", sizeof("/dmoverio"));
	return 0;
}

/* Which real open variant an interposed open calls. */
struct opener {
	enum real_id id;
	bool at;	/* takes a directory descriptor */
	bool fortify;	/* __open_2 & co: no mode argument */
};

static int
call_open(const struct opener *o, int dirfd, const char *path, int flags, mode_t mode)
{
	any_fn f = real_fn(o->id);

	if (f == NULL)
		return (int)syscall(SYS_openat, o->at ? dirfd : AT_FDCWD, path, flags, mode);
	if (o->fortify)
		return o->at ? ((openat2_fn)f)(dirfd, path, flags) : ((open2_fn)f)(path, flags);
	return o->at ? ((openat_fn)f)(dirfd, path, flags, mode) : ((open_fn)f)(path, flags, mode);
}

/* Does open with these flags take a mode argument? */
static bool
has_mode(int flags)
{
	return (flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE;
}

static int
shim_open(const struct opener *o, int dirfd, const char *path, int flags, mode_t mode)
{
	char alt[PATH_MAX];
	int fd, saved;

	if (path == NULL || strcmp(path, DEVICE) != 0) {
		fd = call_open(o, dirfd, path, flags, mode);
	} else {
		/* The device is opened, never created. */
		flags &= ~(O_CREAT | O_EXCL);
		fd = call_open(o, dirfd, path, flags, 0);
		if (fd < 0 && errno == ENOENT) {
			if (dmoverio_shim_device_path(alt, sizeof(alt)) != 0)
				return -1;
			/* A relative $DMOVERIO_PATH is relative to the cwd. */
			fd = call_open(o, AT_FDCWD, alt, flags, 0);
		}
	}
	saved = errno;
	forget(fd);
	errno = saved;
	return fd;
}

#define MODE_ARG(flags, last, mode) do {				\
	if (has_mode(flags)) {						\
		va_list ap_;						\
		va_start(ap_, last);					\
		(mode) = (mode_t)va_arg(ap_, int);			\
		va_end(ap_);						\
	}								\
} while (0)

SHIM_EXPORT int
open(const char *path, int flags, ...)
{
	static const struct opener o = { R_OPEN, false, false };
	mode_t mode = 0;

	MODE_ARG(flags, flags, mode);
	return shim_open(&o, AT_FDCWD, path, flags, mode);
}

SHIM_EXPORT int
open64(const char *path, int flags, ...)
{
	static const struct opener o = { R_OPEN64, false, false };
	mode_t mode = 0;

	MODE_ARG(flags, flags, mode);
	return shim_open(&o, AT_FDCWD, path, flags, mode);
}

SHIM_EXPORT int
openat(int dirfd, const char *path, int flags, ...)
{
	static const struct opener o = { R_OPENAT, true, false };
	mode_t mode = 0;

	MODE_ARG(flags, flags, mode);
	return shim_open(&o, dirfd, path, flags, mode);
}

SHIM_EXPORT int
openat64(int dirfd, const char *path, int flags, ...)
{
	static const struct opener o = { R_OPENAT64, true, false };
	mode_t mode = 0;

	MODE_ARG(flags, flags, mode);
	return shim_open(&o, dirfd, path, flags, mode);
}

SHIM_EXPORT int
__open_2(const char *path, int flags)
{
	static const struct opener o = { R_OPEN_2, false, true };

	return shim_open(&o, AT_FDCWD, path, flags, 0);
}

SHIM_EXPORT int
__open64_2(const char *path, int flags)
{
	static const struct opener o = { R_OPEN64_2, false, true };

	return shim_open(&o, AT_FDCWD, path, flags, 0);
}

SHIM_EXPORT int
__openat_2(int dirfd, const char *path, int flags)
{
	static const struct opener o = { R_OPENAT_2, true, true };

	return shim_open(&o, dirfd, path, flags, 0);
}

SHIM_EXPORT int
__openat64_2(int dirfd, const char *path, int flags)
{
	static const struct opener o = { R_OPENAT64_2, true, true };

	return shim_open(&o, dirfd, path, flags, 0);
}
