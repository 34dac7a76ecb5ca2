/*
 * early_lib.c - a shared library whose constructor calls ioctl() and
 * fcntl(), preloaded next to libdmoverio.so.  Depending on the order of
 * LD_PRELOAD its constructor runs before or after the shim's, so the shim
 * must work before its own constructor has run.  Writes what it saw to
 * stderr, the same with and without the shim.  With EARLY_LIB_SESSION=1
 * in the environment it also opens /dev/dmoverio and selects "zero" with
 * DMIO_SETFUNC, which needs the shim.
 */
#define _GNU_SOURCE

#include <dev/dmover/dmover_io.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

__attribute__((constructor))
static void
early_lib_init(void)
{
	struct winsize ws;
	int p[2], n = -1, r, winsz, flags;

	if (pipe(p) != 0)
		return;
	if (write(p[1], "early", 5) != 5)
		return;
	r = ioctl(p[0], FIONREAD, &n);
	winsz = ioctl(p[0], TIOCGWINSZ, &ws) == -1 ? errno : 0;
	flags = fcntl(p[0], F_SETFL, O_NONBLOCK) == 0 ? fcntl(p[0], F_GETFL) & O_NONBLOCK : -1;
	fprintf(stderr, "early_lib: FIONREAD %d -> %d, TIOCGWINSZ on a pipe %s, O_NONBLOCK %s\n",
	    r, n, winsz == ENOTTY ? "ENOTTY" : strerror(winsz), flags > 0 ? "set" : "not set");
	close(p[0]);
	close(p[1]);

	if (getenv("EARLY_LIB_SESSION") != NULL) {
		struct dmio_setfunc dsf;
		int fd = open("/dev/dmoverio", O_RDWR);

		memset(&dsf, 0, sizeof(dsf));
		strcpy(dsf.dsf_name, "zero");
		r = fd == -1 ? -1 : ioctl(fd, DMIO_SETFUNC, &dsf);
		fprintf(stderr, "early_lib: session DMIO_SETFUNC: %s\n", r == 0 ? "ok" : strerror(errno));
		if (fd != -1)
			close(fd);
	}
}
