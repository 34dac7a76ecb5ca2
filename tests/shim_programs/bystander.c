/*
 * bystander.c - a program that never touches the data mover, but uses
 * every call the libdmoverio.so shim interposes.  Its output must be the
 * same with and without the shim preloaded (test_shim.py compares them).
 *
 * Usage: bystander DIR [FILE]
 *   DIR   an empty scratch directory
 *   FILE  optional: a file to try ioctls on (e.g. a dmoverfs "stats" file,
 *         on FUSE but not a session)
 *   bystander --exec-child PIPEFD   (used by itself across exec)
 *
 * stderr says whether libdmoverio.so is mapped, so the test knows the
 * preload took; stdout is only what the program observed.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define THREADS		8
#define ROUNDS		300
#define SENTINEL	4242

static const char *
ename(int e)
{
	switch (e) {
	case 0: return "ok";
	case EBADF: return "EBADF";
	case ENOTTY: return "ENOTTY";
	case EINVAL: return "EINVAL";
	case ENOENT: return "ENOENT";
	case EEXIST: return "EEXIST";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EISDIR: return "EISDIR";
	case EFAULT: return "EFAULT";
	case EACCES: return "EACCES";
	default: return "another errno";
	}
}

/* -- before main ------------------------------------------------------------------------ */

static int early_fionread = -1, early_errno = -1, early_winsz_errno = -1;

__attribute__((constructor))
static void
early(void)
{
	int p[2];
	struct winsize ws;

	if (pipe(p) != 0)
		return;
	if (write(p[1], "abc", 3) == 3 && ioctl(p[0], FIONREAD, &early_fionread) == 0)
		early_errno = 0;
	/* A pipe is no terminal. */
	early_winsz_errno = ioctl(p[0], TIOCGWINSZ, &ws) == -1 ? errno : 0;
	close(p[0]);
	close(p[1]);
}

/* -- threads ---------------------------------------------------------------------------- */

static void *
churn(void *arg)
{
	long id = (long)arg, bad = 0;
	int r;

	for (r = 0; r < ROUNDS; r++) {
		int p[2], q[2], n = -1, d;
		int want = 1 + (int)((id * 7 + r) % 50), want2 = 51 + (int)((id + r) % 13);
		char buf[64];

		memset(buf, 'x', sizeof(buf));
		if (pipe(p) != 0 || pipe(q) != 0)
			return (void *)-1L;
		if (write(p[1], buf, (size_t)want) != want || write(q[1], buf, (size_t)want2) != want2)
			bad++;
		/* Through a dup, then dup2 over it: numbers get reused all the time. */
		d = dup(p[0]);
		if (ioctl(d, FIONREAD, &n) != 0 || n != want)
			bad++;
		if (dup2(q[0], d) != d || ioctl(d, FIONREAD, &n) != 0 || n != want2)
			bad++;
		if (fcntl(p[0], F_SETFL, O_NONBLOCK) != 0 || !(fcntl(p[0], F_GETFL) & O_NONBLOCK))
			bad++;
		close(d);
		close(p[0]);
		close(p[1]);
		close(q[0]);
		close(q[1]);
	}
	return (void *)bad;
}

/* -- the program ------------------------------------------------------------------------ */

static int
exec_child(int fd)
{
	int n = -1;

	if (ioctl(fd, FIONREAD, &n) != 0)
		return 1;
	printf("exec child: FIONREAD on the inherited pipe: %d\n", n);
	return 0;
}

int
main(int argc, char **argv)
{
	char path[4096];
	int p[2], fd, n, i, r, status, master, slave;
	struct winsize ws;
	struct termios tio;
	struct stat st;
	struct flock lk;
	pthread_t tids[THREADS];
	long bad = 0;
	pid_t pid;
	volatile int vflags;

	if (argc == 3 && strcmp(argv[1], "--exec-child") == 0)
		return exec_child(atoi(argv[2]));
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: bystander DIR [FILE]\n");
		return 2;
	}

	/* Is the shim there?  (stderr: the only line that may differ.) */
	{
		FILE *maps = fopen("/proc/self/maps", "r");
		char line[4096];
		int mapped = 0;

		while (maps != NULL && fgets(line, sizeof(line), maps) != NULL)
			if (strstr(line, "libdmoverio.so") != NULL)
				mapped = 1;
		if (maps != NULL)
			fclose(maps);
		fprintf(stderr, "libdmoverio.so mapped: %s\n", mapped ? "yes" : "no");
	}

	printf("before main: FIONREAD %d (%s), TIOCGWINSZ on a pipe: %s\n",
	    early_fionread, ename(early_errno), ename(early_winsz_errno));

	/* A pipe. */
	if (pipe(p) != 0)
		return 1;
	if (write(p[1], "hello", 5) != 5)
		return 1;
	n = -1;
	errno = SENTINEL;
	r = ioctl(p[0], FIONREAD, &n);
	printf("pipe FIONREAD: %d -> %d, errno %s\n", r, n, errno == SENTINEL ? "kept" : "changed");
	printf("pipe TCGETS: %s\n", ename(tcgetattr(p[0], &tio) == -1 ? errno : 0));
	errno = SENTINEL;
	r = fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
	printf("pipe F_SETFL O_NONBLOCK: %d, now %s, errno %s\n", r,
	    (fcntl(p[0], F_GETFL) & O_NONBLOCK) ? "non-blocking" : "blocking",
	    errno == SENTINEL ? "kept" : "changed");
	fd = fcntl(p[0], F_DUPFD, 100);
	printf("F_DUPFD 100: %s, FIONREAD through it: %d\n", fd >= 100 ? ">= 100" : "< 100",
	    ioctl(fd, FIONREAD, &n) == 0 ? n : -1);
	close(fd);
	fd = fcntl(p[0], F_DUPFD_CLOEXEC, 0);
	printf("F_DUPFD_CLOEXEC: FD_CLOEXEC %s\n", (fcntl(fd, F_GETFD) & FD_CLOEXEC) ? "set" : "clear");
	r = ioctl(fd, FIONCLEX);
	printf("FIONCLEX: %d, FD_CLOEXEC %s\n", r, (fcntl(fd, F_GETFD) & FD_CLOEXEC) ? "set" : "clear");
	r = ioctl(fd, FIOCLEX);
	printf("FIOCLEX: %d, FD_CLOEXEC %s\n", r, (fcntl(fd, F_GETFD) & FD_CLOEXEC) ? "set" : "clear");
	close(fd);

	/* A terminal. */
	master = posix_openpt(O_RDWR | O_NOCTTY);
	if (master == -1 || grantpt(master) != 0 || unlockpt(master) != 0)
		return 1;
	slave = open(ptsname(master), O_RDWR | O_NOCTTY);
	if (slave == -1)
		return 1;
	memset(&ws, 0, sizeof(ws));
	ws.ws_row = 33;
	ws.ws_col = 101;
	r = ioctl(master, TIOCSWINSZ, &ws);
	memset(&ws, 0, sizeof(ws));
	errno = SENTINEL;
	i = ioctl(slave, TIOCGWINSZ, &ws);
	printf("pty TIOCSWINSZ %d, TIOCGWINSZ %d: %ux%u, errno %s\n", r, i, ws.ws_row, ws.ws_col,
	    errno == SENTINEL ? "kept" : "changed");
	printf("pty isatty %d, tcgetattr %s\n", isatty(slave), ename(tcgetattr(slave, &tio) == -1 ? errno : 0));
	if (write(master, "typed\n", 6) != 6)
		return 1;
	{
		/* The line reaches the slave side asynchronously. */
		struct pollfd pfd = { .fd = slave, .events = POLLIN };

		if (poll(&pfd, 1, 10000) != 1)
			return 1;
	}
	n = -1;
	r = ioctl(slave, FIONREAD, &n);
	printf("pty FIONREAD: %d -> %d\n", r, n);
	close(slave);
	close(master);

	/* Bad descriptors and bad requests. */
	errno = 0;
	r = ioctl(-1, FIONREAD, &n);
	printf("ioctl on -1: %d %s\n", r, ename(errno));
	errno = 0;
	r = ioctl(9999, FIONREAD, &n);
	printf("ioctl on 9999: %d %s\n", r, ename(errno));
	errno = 0;
	r = fcntl(9999, F_GETFL);
	printf("fcntl on 9999: %d %s\n", r, ename(errno));
	errno = 0;
	r = close(9999);
	printf("close 9999: %d %s\n", r, ename(errno));

	/* Files: open's mode argument, with and without O_CREAT. */
	umask(0);
	snprintf(path, sizeof(path), "%s/created", argv[1]);
	fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0640);
	printf("open O_CREAT 0640: %s, mode %o\n", fd >= 0 ? "ok" : ename(errno),
	    fstat(fd, &st) == 0 ? (unsigned)(st.st_mode & 07777) : 0u);
	printf("regular file TIOCGWINSZ: %s\n", ename(ioctl(fd, TIOCGWINSZ, &ws) == -1 ? errno : 0));
	r = ioctl(fd, FIONREAD, &n);
	printf("regular file FIONREAD: %d -> %d\n", r, n);
	memset(&lk, 0, sizeof(lk));
	lk.l_type = F_WRLCK;
	lk.l_whence = SEEK_SET;
	printf("F_SETLK: %d\n", fcntl(fd, F_SETLK, &lk));
	lk.l_type = F_RDLCK;
	r = fcntl(fd, F_GETLK, &lk);
	printf("F_GETLK: %d, own lock reported as %s\n", r, lk.l_type == F_UNLCK ? "F_UNLCK" : "locked");
	close(fd);
	fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0640);
	printf("open O_CREAT|O_EXCL again: %s\n", fd >= 0 ? "ok" : ename(errno));
	fd = open(path, O_RDONLY);
	printf("open without O_CREAT: %s\n", fd >= 0 ? "ok" : ename(errno));
	close(fd);
	vflags = O_RDONLY;	/* not a constant: fortify calls __open_2 */
	fd = open(path, vflags);
	printf("open with variable flags: %s\n", fd >= 0 ? "ok" : ename(errno));
	close(fd);
	fd = open(argv[1], O_RDONLY | O_DIRECTORY);
	r = openat(fd, "at-created", O_WRONLY | O_CREAT, 0604);
	printf("openat O_CREAT 0604: %s, mode %o\n", r >= 0 ? "ok" : ename(errno),
	    fstatat(fd, "at-created", &st, 0) == 0 ? (unsigned)(st.st_mode & 07777) : 0u);
	close(r);
	r = openat(fd, ".", O_RDWR | O_TMPFILE, 0600);
	printf("openat O_TMPFILE 0600: %s", r >= 0 ? "ok" : ename(errno));
	if (r >= 0 && fstat(r, &st) == 0)
		printf(", mode %o", (unsigned)(st.st_mode & 07777));
	printf("\n");
	if (r >= 0)
		close(r);
	close(fd);
	errno = 0;
	fd = open("/dev/dmoverio-not-this", O_RDONLY);
	printf("open a missing file: %s\n", ename(fd >= 0 ? 0 : errno));

	/* An optional file (the mount's stats: FUSE, but no session). */
	if (argc == 3) {
		fd = open(argv[2], O_RDONLY);
		n = -1;
		r = ioctl(fd, FIONREAD, &n);
		printf("FILE FIONREAD: %d (%s)\n", r, ename(r == -1 ? errno : 0));
		printf("FILE TIOCGWINSZ: %s\n", ename(ioctl(fd, TIOCGWINSZ, &ws) == -1 ? errno : 0));
		r = fcntl(fd, F_SETFL, O_NONBLOCK);
		printf("FILE F_SETFL O_NONBLOCK: %d, now %s\n", r,
		    (fcntl(fd, F_GETFL) & O_NONBLOCK) ? "non-blocking" : "blocking");
		close(fd);
	}

	/* stdio and close_range. */
	{
		FILE *f = fopen(path, "r");
		int pp[2];

		fd = fileno(f);
		fclose(f);
		if (pipe(pp) != 0)
			return 1;
		if (write(pp[1], "xy", 2) != 2)
			return 1;
		r = ioctl(pp[0], FIONREAD, &n);
		printf("pipe after fclose: %d -> %d\n", r, n);
		r = close_range((unsigned)pp[0], (unsigned)pp[0], 0);
		printf("close_range: %d, then FIONREAD: %s\n", r,
		    ename(ioctl(pp[0], FIONREAD, &n) == -1 ? errno : 0));
		close(pp[1]);
	}

	/* Threads. */
	for (i = 0; i < THREADS; i++)
		if (pthread_create(&tids[i], NULL, churn, (void *)(long)i) != 0)
			return 1;
	for (i = 0; i < THREADS; i++) {
		void *res;

		pthread_join(tids[i], &res);
		bad += (long)res;
	}
	printf("threads: %d x %d rounds, %ld wrong answers\n", THREADS, ROUNDS, bad);

	/* fork, and exec. */
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		n = -1;
		_exit(ioctl(p[0], FIONREAD, &n) == 0 ? n : 99);
	}
	waitpid(pid, &status, 0);
	printf("fork: the child saw FIONREAD %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		char fdarg[16];

		snprintf(fdarg, sizeof(fdarg), "%d", p[0]);
		execl("/proc/self/exe", argv[0], "--exec-child", fdarg, (char *)NULL);
		_exit(127);
	}
	waitpid(pid, &status, 0);
	printf("exec: the child exited %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	close(p[0]);
	close(p[1]);
	printf("bystander: done\n");
	return 0;
}
