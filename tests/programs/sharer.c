/*
 * sharer.c - a process that registers shared memory with a session, then
 * changes what its address space holds at the registered range, and
 * reports where a fill8 request over that range landed.
 *
 *   sharer DIR remap LEN   remap the range with private memory, then fill it
 *   sharer DIR fork LEN    a forked child puts its own memory at the range and
 *                          fills it; then the parent fills it
 *   sharer DIR exec LEN    exec this program as "image", which maps its own
 *                          memory at the range and fills it
 *
 * The range is REGION, a memfd of LEN bytes, which starts as OPENER_BYTE;
 * memory put there later starts as OTHER_BYTE.  A second mapping of the
 * memfd (the "file") shows what the registered pages hold.  Lines:
 * "registered ERRNO", then "[who] result ERRNO mapping BYTES file BYTES".
 */
#include "writer.h"

#include <sys/wait.h>

#define PROG "sharer"
#define REGION ((unsigned char *)0x3a5d00000000UL)

/* The memfd mapped at REGION, and a second view of it. */
static unsigned char *
share(int mfd, size_t len)
{
	unsigned char *file;

	if (mmap(REGION, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, mfd, 0) != REGION)
		die(PROG, "mmap REGION");
	if ((file = mmap(NULL, len, PROT_READ, MAP_SHARED, mfd, 0)) == MAP_FAILED)
		die(PROG, "mmap file");
	return file;
}

/* Private memory at REGION instead of whatever is there. */
static void
own_memory(size_t len)
{
	if (mmap(REGION, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != REGION)
		die(PROG, "mmap private");
	memset(REGION, OTHER_BYTE, len);
}

/* Fill REGION with one request and report it and both views. */
static void
fill(const char *who, int session, const unsigned char *file, size_t len)
{
	struct dmio_usrreq req;
	struct iovec iov;
	const char *result;

	zero_request(&req, &iov, REGION, len, 1);
	req.req_immediate[0] = FILL_BYTE;
	result = round_trip(session, &req);
	printf("%s result %s mapping %s", who, result, describe(REGION, len));
	say(" file %s", describe(file, len));
}

int
main(int argc, char **argv)
{
	int session, mfd;
	unsigned char *file;
	char value[128];
	size_t len;

	if (argc == 6 && strcmp(argv[2], "image") == 0) {
		/* The exec'd image: the session and the memfd are inherited. */
		session = atoi(argv[3]);
		mfd = atoi(argv[4]);
		len = strtoul(argv[5], NULL, 0);
		if ((file = mmap(NULL, len, PROT_READ, MAP_SHARED, mfd, 0)) == MAP_FAILED)
			die(PROG, "mmap file");
		own_memory(len);
		fill("image", session, file, len);
		return 0;
	}
	if (argc != 4) {
		fprintf(stderr, "usage: %s DIR remap|fork|exec LEN\n", PROG);
		return 2;
	}
	len = strtoul(argv[3], NULL, 0);
	session = open_function(PROG, argv[1], "fill8", O_CLOEXEC);
	if ((mfd = memfd_create("sharer", MFD_CLOEXEC)) < 0 || ftruncate(mfd, (off_t)len) != 0)
		die(PROG, "memfd");
	file = share(mfd, len);
	memset(REGION, OPENER_BYTE, len);
	snprintf(value, sizeof(value), "%d 0 %lu %zu", mfd, (unsigned long)REGION, len);
	say("registered %s", errno_name(fsetxattr(session, DMOVERFS_XATTR_REGISTER, value, strlen(value), 0) ? errno : 0));

	if (strcmp(argv[2], "remap") == 0) {
		own_memory(len);
		fill("self", session, file, len);
	} else if (strcmp(argv[2], "fork") == 0) {
		pid_t child = fork();
		int status;

		if (child < 0)
			die(PROG, "fork");
		if (child == 0) {
			own_memory(len);
			fill("child", session, file, len);
			_exit(0);
		}
		if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
			die(PROG, "child");
		fill("parent", session, file, len);
	} else if (strcmp(argv[2], "exec") == 0) {
		char sfd[16], mfds[16];

		snprintf(sfd, sizeof(sfd), "%d", session);
		snprintf(mfds, sizeof(mfds), "%d", mfd);
		if (fcntl(session, F_SETFD, 0) != 0 || fcntl(mfd, F_SETFD, 0) != 0)
			die(PROG, "fcntl");
		execl("/proc/self/exe", PROG, argv[1], "image", sfd, mfds, argv[3], (char *)NULL);
		die(PROG, "exec");
	}
	return 0;
}
