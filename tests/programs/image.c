/*
 * image.c - the program execer.c execs: is its memory left alone by the
 * requests the previous image of this process queued?
 *
 * usage: image SESSION_FD COUNT SIZE PIPE_FD
 * Maps SIZE bytes at EXEC_REGION (writer.h), where the previous image's
 * requests put their output, and prints "mapped PID EUID" at once (EUID:
 * this image may be setuid).  The pages are left untouched, so they read
 * as zeros and the region is there from the first instant (filling it
 * with a pattern would take long enough for the server's writes to be
 * overwritten unseen).  Then reads responses from the inherited session
 * until COUNT have come or SIGUSR1 arrives (the test sends it once the
 * server has nothing left in flight), and prints
 *     responses GOT ok OK efault EFAULT other OTHER [FIRST-OTHER-ERROR]
 *     memory MEMORY       (the region, which must still be all 00)
 * Then closes PIPE_FD, the holder's cue to report, and waits for the
 * holder (its child, forked by the previous image) to exit.
 */
#include "writer.h"

#include <signal.h>
#include <sys/wait.h>

static const char *prog = "image";
static volatile sig_atomic_t told;

static void
on_usr1(int sig)
{
	(void)sig;
	told = 1;
}

int
main(int argc, char **argv)
{
	struct sigaction sa;
	struct dmio_usrresp resp;
	struct pollfd pfd;
	unsigned char *region;
	size_t size;
	int fd, count, got = 0, ok = 0, efault = 0, other = 0, first_other = 0;
	ssize_t ret;

	if (argc != 5) {
		fprintf(stderr, "usage: image SESSION_FD COUNT SIZE PIPE_FD\n");
		return 2;
	}
	fd = atoi(argv[1]);
	count = atoi(argv[2]);
	size = (size_t)strtoull(argv[3], NULL, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) == -1)
		die(prog, "sigaction");
	region = mmap(EXEC_REGION, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (region != EXEC_REGION)
		die(prog, "mmap at EXEC_REGION");
	say("mapped %d %d", (int)getpid(), (int)geteuid());

	pfd.fd = fd;
	pfd.events = POLLIN;
	while (got < count && !told) {
		if (poll(&pfd, 1, 100) != 1)
			continue;
		ret = read(fd, &resp, sizeof(resp));
		if (ret != (ssize_t)sizeof(resp)) {
			if (ret < 0 && errno == EINTR)
				continue;
			say("read %zd %s", ret, errno_name(ret < 0 ? errno : 0));
			break;
		}
		got++;
		if (resp.resp_error == 0)
			ok++;
		else if (resp.resp_error == EFAULT)
			efault++;
		else if (other++ == 0)
			first_other = resp.resp_error;
	}
	say("responses %d ok %d efault %d other %d %s", got, ok, efault, other, other ? errno_name(first_other) : "");
	say("memory %s", describe(region, size));
	close(atoi(argv[4]));
	alarm(30); /* the holder reports at once; never outlive the test */
	while (wait(NULL) != -1 || errno == EINTR)
		;
	return 0;
}
