/*
 * session_ioctls.c - ioctl() and fcntl() on dmoverfs sessions through the
 * libdmoverio.so shim: NetBSD's errnos, and descriptors that stop or start
 * being sessions (dup, dup2, close, fclose, F_DUPFD).  Opens
 * "/dev/dmoverio" (the shim redirects it).  Prints one line per check.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/xattr.h>
#include <termios.h>
#include <unistd.h>

#define THREADS	8
#define ROUNDS	25

static const char *
ename(int r)
{
	if (r != -1)
		return "ok";
	switch (errno) {
	case ESRCH: return "ESRCH";
	case EBUSY: return "EBUSY";
	case ENOTTY: return "ENOTTY";
	case EFAULT: return "EFAULT";
	case EBADF: return "EBADF";
	case EINVAL: return "EINVAL";
	case ENOENT: return "ENOENT";
	case EPERM: return "EPERM";
	default: return strerror(errno);
	}
}

static int
setfunc(int fd, const char *name)
{
	struct dmio_setfunc dsf;

	memset(&dsf, 0, sizeof(dsf));
	strncpy(dsf.dsf_name, name, sizeof(dsf.dsf_name) - 1);
	return ioctl(fd, DMIO_SETFUNC, &dsf);
}

static int
open_session(void)
{
	int fd = open("/dev/dmoverio", O_RDWR);

	if (fd == -1) {
		fprintf(stderr, "session_ioctls: open /dev/dmoverio: %s\n", strerror(errno));
		exit(1);
	}
	return fd;
}

/* FIONREAD: the count on a pipe, ENOTTY on a session. */
static const char *
fionread(int fd)
{
	static char buf[32];
	int n = -1;

	if (ioctl(fd, FIONREAD, &n) == -1)
		return ename(-1);
	snprintf(buf, sizeof(buf), "%d bytes", n);
	return buf;
}

static void *
worker(void *arg)
{
	long bad = 0;
	int r;

	(void)arg;
	for (r = 0; r < ROUNDS; r++) {
		int fd = open_session();
		int n = -1;

		if (setfunc(fd, r % 2 ? "zero" : "copy") != 0)
			bad++;
		if (setfunc(fd, "zero") != -1 || errno != EBUSY)
			bad++;
		close(fd);
		/* The number, now free, is soon a pipe in some thread. */
		{
			int p[2];

			if (pipe(p) != 0)
				return (void *)-1L;
			if (write(p[1], "abcd", 4) != 4 || ioctl(p[0], FIONREAD, &n) != 0 || n != 4)
				bad++;
			close(p[0]);
			close(p[1]);
		}
	}
	return (void *)bad;
}

int
main(void)
{
	struct dmio_setfunc dsf;
	struct winsize ws;
	struct termios tio;
	char value[64];
	ssize_t len;
	int fd, d, p[2], r, n, on;
	long pagesize = sysconf(_SC_PAGESIZE), bad = 0;
	char *pages;
	pthread_t tids[THREADS];
	FILE *f;

	fd = open_session();

	/* DMIO_SETFUNC's errors. */
	printf("DMIO_SETFUNC no-such-function: %s\n", ename(setfunc(fd, "no-such-function")));
	memset(&dsf, 'z', sizeof(dsf));	/* no NUL at all: cut at 63 bytes */
	printf("DMIO_SETFUNC 64 bytes without NUL: %s\n", ename(ioctl(fd, DMIO_SETFUNC, &dsf)));
	printf("DMIO_SETFUNC NULL: %s\n", ename(ioctl(fd, DMIO_SETFUNC, NULL)));
	pages = mmap(NULL, (size_t)pagesize * 2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (pages == MAP_FAILED || munmap(pages + pagesize, (size_t)pagesize) != 0)
		return 1;
	strcpy(pages + pagesize - 8, "zero");	/* "zero", NUL, then unmapped */
	printf("DMIO_SETFUNC straddling an unmapped page: %s\n",
	    ename(ioctl(fd, DMIO_SETFUNC, pages + pagesize - 8)));
	munmap(pages, (size_t)pagesize);
	printf("DMIO_SETFUNC zero: %s\n", ename(setfunc(fd, "zero")));
	len = fgetxattr(fd, DMOVERFS_XATTR_FUNCTION, value, sizeof(value) - 1);
	printf("function now: %.*s\n", len > 0 ? (int)len : 0, value);
	printf("DMIO_SETFUNC copy: %s\n", ename(setfunc(fd, "copy")));
	printf("DMIO_SETFUNC zero again: %s\n", ename(setfunc(fd, "zero")));

	/* Other ioctls. */
	on = 1;
	printf("FIOASYNC: %s\n", ename(ioctl(fd, FIOASYNC, &on)));
	printf("FIONBIO NULL: %s\n", ename(ioctl(fd, FIONBIO, NULL)));
	printf("FIONREAD: %s\n", fionread(fd));
	printf("TIOCGWINSZ: %s\n", ename(ioctl(fd, TIOCGWINSZ, &ws)));
	printf("TCGETS: %s\n", ename(ioctl(fd, TCGETS, &tio)));
	printf("_IOW('D', 1, int): %s\n", ename(ioctl(fd, _IOW('D', 1, int), &on)));
	printf("_IOR('D', 0, struct dmio_setfunc): %s\n",
	    ename(ioctl(fd, _IOR('D', 0, struct dmio_setfunc), &dsf)));
	r = ioctl(fd, FIOCLEX);
	printf("FIOCLEX: %s, FD_CLOEXEC %s\n", ename(r), (fcntl(fd, F_GETFD) & FD_CLOEXEC) ? "set" : "clear");
	r = ioctl(fd, FIONCLEX);
	printf("FIONCLEX: %s, FD_CLOEXEC %s\n", ename(r), (fcntl(fd, F_GETFD) & FD_CLOEXEC) ? "set" : "clear");

	/* Descriptors that become sessions, and stop being ones. */
	d = dup(fd);
	printf("dup of the session, DMIO_SETFUNC: %s\n", ename(setfunc(d, "copy")));
	close(d);
	d = fcntl(fd, F_DUPFD, 50);
	printf("F_DUPFD of the session, DMIO_SETFUNC: %s\n", ename(setfunc(d, "copy")));
	close(d);
	if (pipe(p) != 0 || write(p[1], "hello", 5) != 5)
		return 1;
	printf("pipe FIONREAD: %s\n", fionread(p[0]));
	d = dup(p[0]);
	r = dup2(fd, p[0]);
	printf("dup2 the session over the pipe: %s, FIONREAD %s\n", ename(r), fionread(p[0]));
	r = dup3(d, p[0], 0);
	printf("dup3 the pipe back: %s, FIONREAD %s\n", ename(r), fionread(p[0]));
	close(d);
	n = fd;
	close(fd);
	if (dup2(p[0], n) != n)
		return 1;
	printf("the closed session's number as a pipe: FIONREAD %s\n", fionread(n));
	close(n);
	fd = open_session();
	printf("a new session: FIONREAD %s\n", fionread(fd));
	f = fdopen(fd, "r+");
	n = fd;
	fclose(f);
	if (dup2(p[0], n) != n)
		return 1;
	printf("after fclose, its number as a pipe: FIONREAD %s\n", fionread(n));
	close(n);
	close(p[0]);
	close(p[1]);

	/* Many threads opening, configuring and closing sessions. */
	for (r = 0; r < THREADS; r++)
		if (pthread_create(&tids[r], NULL, worker, NULL) != 0)
			return 1;
	for (r = 0; r < THREADS; r++) {
		void *res;

		pthread_join(tids[r], &res);
		bad += (long)res;
	}
	printf("threads: %d x %d sessions, %ld wrong answers\n", THREADS, ROUNDS, bad);
	return 0;
}
