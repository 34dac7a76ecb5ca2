/*
 * execer.c - queue large requests, then exec another program at once.
 *
 * usage: execer DIR IMAGE SIZE COUNT BUSY
 * Opens DIR/func/fill8 without O_CLOEXEC, maps SIZE bytes at EXEC_REGION
 * (writer.h) and forks a holder, which keeps the session open and fills
 * its copy of the region with 0x33.  If BUSY is not 0, the holder first
 * writes one fill8 request of BUSY bytes over memory of its own on a
 * session of its own, to keep a worker busy (with --workers 1, the
 * requests below then wait in the queue until the new image is there).
 * The holder prints "holder PID".  Then this process writes COUNT fill8
 * requests, each over the whole region ("queued RET ERRNO"), and at once
 * execs
 *     IMAGE SESSION_FD COUNT SIZE PIPE_FD
 * (image.c) in the same process, which maps its own region at the same
 * addresses.  No request may touch the new image: those still queued or
 * running when it replaced this one fail with EFAULT or are discarded.
 * The holder waits until the image has reported (EOF on the pipe), then
 * prints
 *     busy ERROR MEMORY       (its own request, when BUSY is not 0)
 *     holder-memory MEMORY    (its copy of the region: no request may touch it)
 * It dies with its parent (PR_SET_PDEATHSIG).
 */
#include "writer.h"

#include <signal.h>
#include <sys/prctl.h>

#define MAXCOUNT 64

static const char *prog = "execer";

/* The holder: keeps the session open, keeps a worker busy, reports once the image has. */
static void
hold(const char *dir, unsigned char *region, size_t size, size_t busy, int image_done, int busy_written)
{
	static struct job job;
	struct dmio_usrresp resp;
	ssize_t ret;
	int fd = -1;
	char byte = 'b';

	if (busy > 0) {
		fd = open_function(prog, dir, "fill8", O_CLOEXEC);
		job_init(prog, &job, busy, "fill8", 1, OTHER_BYTE);
		if (write(fd, &job.req, sizeof(job.req)) != (ssize_t)sizeof(job.req))
			die(prog, "write the busy request");
	}
	if (write(busy_written, &byte, 1) != 1)
		die(prog, "write to the parent");
	memset(region, HOLDER_BYTE, size);
	say("holder %d", (int)getpid());
	while (read(image_done, &byte, 1) != 0)
		if (errno != EINTR)
			break;
	if (busy > 0) {
		ret = read(fd, &resp, sizeof(resp));
		if (ret != (ssize_t)sizeof(resp))
			say("busy read:%s %s", ret < 0 ? errno_name(errno) : "short", describe(job.buf, busy));
		else
			say("busy %s %s", errno_name(resp.resp_error), describe(job.buf, busy));
	}
	say("holder-memory %s", describe(region, size));
}

int
main(int argc, char **argv)
{
	static struct dmio_usrreq reqs[MAXCOUNT];
	static struct iovec iov;
	char fdarg[16], pipearg[16], countarg[16], sizearg[32], byte;
	unsigned char *region;
	pid_t parent = getpid(), holder;
	size_t size, busy;
	int fd, count, image_done[2], busy_written[2], i;
	ssize_t ret;

	if (argc != 6) {
		fprintf(stderr, "usage: execer DIR IMAGE SIZE COUNT BUSY\n");
		return 2;
	}
	size = (size_t)strtoull(argv[3], NULL, 0);
	count = atoi(argv[4]);
	busy = (size_t)strtoull(argv[5], NULL, 0);
	if (size == 0 || count < 1 || count > MAXCOUNT) {
		fprintf(stderr, "%s: SIZE must be positive, COUNT 1..%d\n", prog, MAXCOUNT);
		return 2;
	}
	fd = open_function(prog, argv[1], "fill8", 0); /* no O_CLOEXEC: the session outlives the exec */
	region = mmap(EXEC_REGION, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (region != EXEC_REGION)
		die(prog, "mmap at EXEC_REGION");
	/* The image inherits image_done[1]; everything else is closed by the exec. */
	if (pipe2(image_done, 0) == -1 || fcntl(image_done[0], F_SETFD, FD_CLOEXEC) == -1 || pipe2(busy_written, O_CLOEXEC) == -1)
		die(prog, "pipe");

	holder = fork();
	if (holder == -1)
		die(prog, "fork");
	if (holder == 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) == -1)
			die(prog, "prctl PR_SET_PDEATHSIG");
		if (getppid() != parent)
			_exit(2);
		close(image_done[1]);
		close(busy_written[0]);
		hold(argv[1], region, size, busy, image_done[0], busy_written[1]);
		_exit(0);
	}
	close(image_done[0]);
	close(busy_written[1]);
	if (read(busy_written[0], &byte, 1) != 1)
		die(prog, "read from the holder");

	for (i = 0; i < count; i++) {
		zero_request(&reqs[i], &iov, region, size, (uint32_t)i + 1);
		reqs[i].req_immediate[0] = FILL_BYTE;
	}
	snprintf(fdarg, sizeof(fdarg), "%d", fd);
	snprintf(pipearg, sizeof(pipearg), "%d", image_done[1]);
	snprintf(countarg, sizeof(countarg), "%d", count);
	snprintf(sizearg, sizeof(sizearg), "%zu", size);
	ret = write(fd, reqs, sizeof(reqs[0]) * (size_t)count);
	say("queued %zd %s", ret, errno_name(ret < 0 ? errno : 0));
	execl(argv[2], argv[2], fdarg, countarg, sizearg, pipearg, (char *)NULL);
	die(prog, "execl");
}
