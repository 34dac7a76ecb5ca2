/*
 * writer.c - a session used by a process other than its opener, or by a
 * thread other than the opener's: every request must act on the memory of
 * the process whose thread wrote it.
 *
 * usage: writer fork    DIR FUNCTION SIZE
 *        writer daemon  DIR FUNCTION SIZE
 *        writer scm     DIR FUNCTION SIZE
 *        writer leader  DIR FUNCTION SIZE...
 *        writer threads DIR THREADS ROUNDS
 * DIR is a mount point; FUNCTION is zero or fill8 (byte 0x5a); SIZE is the
 * request's length in bytes.  Results are "ERROR MEMORY" pairs: the
 * response's error (see round_trip in writer.h) and what the buffer holds
 * afterwards (see describe).
 *
 * fork: the opener fills a buffer with 0x50 and builds the request, then
 *   forks; the child fills its copy with 0xc3 and writes the request:
 *     child ERROR MEMORY        (the child's buffer)
 *     parent MEMORY             (the parent's buffer, once the child is gone)
 *     parent-own ERROR MEMORY   (the same request, written by the parent)
 * daemon: the opener builds the request over 0xc3, then calls daemon(3);
 *     opener PID
 *     daemon PID
 *     opener-exited 1|0         (the opener had exited within 10 s)
 *     result ERROR MEMORY       (written by the daemon once the opener is gone)
 * scm: forks a receiver first, then opens the session and passes it over
 *   SCM_RIGHTS; the receiver (0xc3 in its buffer) writes the request:
 *     receiver PID ERROR MEMORY
 *     sender MEMORY             (the opener's buffer, 0x50, after that)
 *     sender-own ERROR MEMORY
 * leader: the main thread opens the session and calls pthread_exit(); a
 *   second thread waits until it is gone, then writes one request per SIZE
 *   (each over a buffer of its own, 0xc3) and reads its response:
 *     leader-exited 1|0
 *     result SIZE ERROR MEMORY
 * threads: THREADS threads write fill8 requests concurrently on one
 *   session, ROUNDS each, alternately of 4 KiB and 256 KiB, each with a
 *   byte of its own; each thread reads one response (anyone's) per request
 *   it wrote, then waits for its own and checks its buffer:
 *     thread T ok N bad M [FIRST-FAILURE]
 *     done OK BAD
 * Forked children die with their parent (PR_SET_PDEATHSIG); a daemon's pid
 * is printed so that the test can kill it.
 */
#include "writer.h"

#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static const char *prog = "writer";

/* In a forked child: die with the parent, and make sure it is still there. */
static void
follow_parent(pid_t parent)
{
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) == -1)
		die(prog, "prctl PR_SET_PDEATHSIG");
	if (getppid() != parent)
		_exit(2);
}

static void
reap(pid_t child)
{
	int status;

	if (waitpid(child, &status, 0) == -1)
		die(prog, "waitpid");
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		say("child-status %d", status);
}

static size_t
parse_size(const char *arg)
{
	char *end;
	unsigned long long n = strtoull(arg, &end, 0);

	if (*end != '\0' || n == 0 || n > (1ULL << 34)) {
		fprintf(stderr, "%s: bad size %s\n", prog, arg);
		exit(2);
	}
	return (size_t)n;
}

/* -- fork --------------------------------------------------------------------------------- */

static int
do_fork(const char *dir, const char *function, size_t size)
{
	static struct job job;
	pid_t parent = getpid(), child;
	int fd;

	fd = open_function(prog, dir, function, O_CLOEXEC);
	job_init(prog, &job, size, function, 1, OPENER_BYTE);
	child = fork();
	if (child == -1)
		die(prog, "fork");
	if (child == 0) {
		follow_parent(parent);
		memset(job.buf, OTHER_BYTE, size);
		const char *error = round_trip(fd, &job.req);
		say("child %s %s", error, describe(job.buf, size));
		_exit(0);
	}
	reap(child);
	say("parent %s", describe(job.buf, size));
	job.req.req_id = 2;
	const char *error = round_trip(fd, &job.req);
	say("parent-own %s %s", error, describe(job.buf, size));
	return 0;
}

/* -- daemon ------------------------------------------------------------------------------- */

static int
do_daemon(const char *dir, const char *function, size_t size)
{
	static struct job job;
	struct pollfd pfd;
	int fd, pidfd;

	fd = open_function(prog, dir, function, O_CLOEXEC);
	job_init(prog, &job, size, function, 1, OTHER_BYTE);
	pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (pidfd == -1)
		die(prog, "pidfd_open");
	say("opener %d", (int)getpid());
	if (daemon(1, 1) == -1) /* keep the directory and stdout: the test reads this program's lines */
		die(prog, "daemon");
	say("daemon %d", (int)getpid());
	pfd.fd = pidfd;
	pfd.events = POLLIN;
	say("opener-exited %d", poll(&pfd, 1, 10000) == 1);
	const char *error = round_trip(fd, &job.req);
	say("result %s %s", error, describe(job.buf, size));
	return 0;
}

/* -- SCM_RIGHTS --------------------------------------------------------------------------- */

static void
send_fd(int sock, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	char byte = 's';
	struct iovec iov = { &byte, 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);

	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
	if (sendmsg(sock, &msg, 0) != 1)
		die(prog, "sendmsg");
}

static int
receive_fd(int sock)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	char byte;
	struct iovec iov = { &byte, 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cmsg;
	int fd;

	if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1)
		die(prog, "recvmsg");
	cmsg = CMSG_FIRSTHDR(&msg);
	if (cmsg == NULL || cmsg->cmsg_type != SCM_RIGHTS) {
		fprintf(stderr, "%s: no descriptor received\n", prog);
		_exit(2);
	}
	memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
	return fd;
}

static int
do_scm(const char *dir, const char *function, size_t size)
{
	static struct job job;
	pid_t parent = getpid(), child;
	int sv[2], fd;

	job_init(prog, &job, size, function, 1, OPENER_BYTE);
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == -1)
		die(prog, "socketpair");
	child = fork(); /* before the session exists: the receiver gets it only over the socket */
	if (child == -1)
		die(prog, "fork");
	if (child == 0) {
		follow_parent(parent);
		close(sv[0]);
		memset(job.buf, OTHER_BYTE, size);
		fd = receive_fd(sv[1]);
		const char *error = round_trip(fd, &job.req);
		say("receiver %d %s %s", (int)getpid(), error, describe(job.buf, size));
		_exit(0);
	}
	close(sv[1]);
	fd = open_function(prog, dir, function, O_CLOEXEC);
	send_fd(sv[0], fd);
	reap(child);
	say("sender %s", describe(job.buf, size));
	job.req.req_id = 2;
	const char *error = round_trip(fd, &job.req);
	say("sender-own %s %s", error, describe(job.buf, size));
	return 0;
}

/* -- the main thread exits ---------------------------------------------------------------- */

static struct {
	int fd;
	pid_t leader;
	const char *function;
	char **sizes;
	int nsizes;
} leader_args;

/* The state letter of thread *tid* of this process ('Z' once it has exited), or 0. */
static char
thread_state(pid_t tid)
{
	char path[64], buf[512], *close_paren;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", (int)leader_args.leader, (int)tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd == -1)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	close_paren = strrchr(buf, ')');
	return close_paren != NULL && close_paren[1] == ' ' ? close_paren[2] : 0;
}

static void *
survivor(void *arg)
{
	int64_t deadline = now_us() + 10 * 1000000;
	char state;
	int i;

	(void)arg;
	while ((state = thread_state(leader_args.leader)) != 'Z' && state != 0 && now_us() < deadline)
		usleep(10000);
	say("leader-exited %d", state == 'Z' || state == 0);
	for (i = 0; i < leader_args.nsizes; i++) {
		struct job job;
		size_t size = parse_size(leader_args.sizes[i]);

		job_init(prog, &job, size, leader_args.function, (uint32_t)i + 1, OTHER_BYTE);
		const char *error = round_trip(leader_args.fd, &job.req);
		say("result %zu %s %s", size, error, describe(job.buf, size));
		munmap(job.buf, size);
	}
	exit(0);
}

static int
do_leader(const char *dir, const char *function, char **sizes, int nsizes)
{
	pthread_t thread;
	int err;

	leader_args.fd = open_function(prog, dir, function, O_CLOEXEC);
	leader_args.leader = getpid();
	leader_args.function = function;
	leader_args.sizes = sizes;
	leader_args.nsizes = nsizes;
	err = pthread_create(&thread, NULL, survivor, NULL);
	if (err != 0) {
		errno = err;
		die(prog, "pthread_create");
	}
	pthread_exit(NULL);
}

/* -- many threads ------------------------------------------------------------------------- */

#define SMALL (4 << 10)
#define LARGE (256 << 10)
#define MAXTHREADS 64

static struct {
	int fd, threads, rounds;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	unsigned char *got;	/* per request id: a response was read */
	int *error;		/* per request id: its resp_error */
} pool = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static int totals[2];

static void *
pool_thread(void *arg)
{
	int t = (int)(intptr_t)arg, r, ok = 0, bad = 0;
	char first[256] = "";
	struct job small, large;

	job_init(prog, &small, SMALL, "fill8", 0, 0);
	job_init(prog, &large, LARGE, "fill8", 0, 0);
	for (r = 0; r < pool.rounds; r++) {
		struct job *job = (t + r) % 2 ? &large : &small;
		uint32_t id = (uint32_t)(t * pool.rounds + r);
		int byte = (int)(id % 254) + 1; /* never 0, never the byte it replaces */
		struct dmio_usrresp resp;
		struct timespec until;
		const char *memory;
		char want[8];
		ssize_t ret;
		int timed_out = 0, error;

		memset(job->buf, byte ^ 0xff, job->len);
		job->req.req_id = id;
		job->req.req_immediate[0] = (uint8_t)byte;
		ret = write(pool.fd, &job->req, sizeof(job->req));
		if (ret != (ssize_t)sizeof(job->req)) {
			if (bad++ == 0)
				snprintf(first, sizeof(first), "round=%d:write=%zd:%s", r, ret, errno_name(ret < 0 ? errno : 0));
			continue;
		}
		ret = read(pool.fd, &resp, sizeof(resp));
		pthread_mutex_lock(&pool.mu);
		if (ret == (ssize_t)sizeof(resp) && resp.resp_id < (uint32_t)(pool.threads * pool.rounds)) {
			pool.got[resp.resp_id] = 1;
			pool.error[resp.resp_id] = resp.resp_error;
			pthread_cond_broadcast(&pool.cv);
		}
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += 30;
		while (!pool.got[id] && !timed_out)
			timed_out = pthread_cond_timedwait(&pool.cv, &pool.mu, &until) != 0;
		error = pool.error[id];
		pthread_mutex_unlock(&pool.mu);
		memory = describe(job->buf, job->len);
		snprintf(want, sizeof(want), "%02x", byte);
		if (ret != (ssize_t)sizeof(resp) || timed_out || error != 0 || strcmp(memory, want) != 0) {
			if (bad++ == 0)
				snprintf(first, sizeof(first), "round=%d:read=%zd:%s:error=%s:memory=%s:want=%s", r, ret,
				    timed_out ? "unanswered" : "answered", errno_name(error), memory, want);
		} else {
			ok++;
		}
	}
	pthread_mutex_lock(&pool.mu);
	totals[0] += ok;
	totals[1] += bad;
	pthread_mutex_unlock(&pool.mu);
	say("thread %d ok %d bad %d %s", t, ok, bad, first);
	return NULL;
}

static int
do_threads(const char *dir, int threads, int rounds)
{
	pthread_t tids[MAXTHREADS];
	int t, err;

	if (threads < 1 || threads > MAXTHREADS || rounds < 1 || rounds > 100000) {
		fprintf(stderr, "%s: THREADS must be 1..%d, ROUNDS 1..100000\n", prog, MAXTHREADS);
		return 2;
	}
	pool.fd = open_function(prog, dir, "fill8", O_CLOEXEC);
	pool.threads = threads;
	pool.rounds = rounds;
	pool.got = calloc((size_t)threads * (size_t)rounds, 1);
	pool.error = calloc((size_t)threads * (size_t)rounds, sizeof(int));
	if (pool.got == NULL || pool.error == NULL)
		die(prog, "calloc");
	for (t = 0; t < threads; t++) {
		err = pthread_create(&tids[t], NULL, pool_thread, (void *)(intptr_t)t);
		if (err != 0) {
			errno = err;
			die(prog, "pthread_create");
		}
	}
	for (t = 0; t < threads; t++)
		pthread_join(tids[t], NULL);
	say("done %d %d", totals[0], totals[1]);
	return 0;
}

int
main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	if (argc == 5 && strcmp(mode, "fork") == 0)
		return do_fork(argv[2], argv[3], parse_size(argv[4]));
	if (argc == 5 && strcmp(mode, "daemon") == 0)
		return do_daemon(argv[2], argv[3], parse_size(argv[4]));
	if (argc == 5 && strcmp(mode, "scm") == 0)
		return do_scm(argv[2], argv[3], parse_size(argv[4]));
	if (argc >= 5 && strcmp(mode, "leader") == 0)
		return do_leader(argv[2], argv[3], argv + 4, argc - 4);
	if (argc == 5 && strcmp(mode, "threads") == 0)
		return do_threads(argv[2], atoi(argv[3]), atoi(argv[4]));
	fprintf(stderr, "usage: writer fork|daemon|scm DIR FUNCTION SIZE | leader DIR FUNCTION SIZE... | threads DIR THREADS ROUNDS\n");
	return 2;
}
