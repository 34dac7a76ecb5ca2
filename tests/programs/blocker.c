/*
 * blocker.c - one read() or write() on a session, for the signal tests:
 * the call is expected to block; the program says what it returned.
 *
 * usage: blocker [-f FD | -o PATH] [-p K] [-H restart|norestart] [-I SIG]
 *                read N | write N
 *   -f FD     use the inherited session descriptor FD
 *   -o PATH   open PATH (a func/NAME clone file) and print "fd N"
 *   -p K      first write K zero requests ("prefilled RET ERRNO")
 *   -H MODE   install a SIGUSR1 handler, with SA_RESTART or without
 *   -I SIG    set signal SIG to SIG_IGN
 * Then it prints "ready" and calls read(fd, 16 * N) or write(fd, N zero
 * requests) once, and prints
 *   result RET ERRNO MILLISECONDS caught=C   (C: SIGUSR1 handlers run)
 *   resp ID ERROR                            (each response read)
 * The zero requests point into this process's memory: use -o for writes,
 * so that this process is the session's opener as well as the writer.
 */
#include "common.h"

#include <signal.h>

#define MAXREQ 64
#define BUFLEN 64

static const char *prog = "blocker";
static volatile sig_atomic_t caught;
static unsigned char outputs[MAXREQ][BUFLEN];
static struct iovec iovs[MAXREQ];
static struct dmio_usrreq reqs[MAXREQ];

static void
on_usr1(int sig)
{
	(void)sig;
	caught++;
}

static void
usage(void)
{
	fprintf(stderr, "usage: blocker [-f FD | -o PATH] [-p K] [-H restart|norestart] [-I SIG] read N | write N\n");
	exit(2);
}

static void
make_requests(int n, uint32_t first_id)
{
	int i;

	for (i = 0; i < n; i++)
		zero_request(&reqs[i], &iovs[i], outputs[i], BUFLEN, first_id + (uint32_t)i);
}

int
main(int argc, char **argv)
{
	struct dmio_usrresp resps[MAXREQ];
	const char *path = NULL, *op;
	struct sigaction sa;
	int fd = -1, prefill = 0, opt, n, err, i;
	int64_t start;
	ssize_t ret;

	while ((opt = getopt(argc, argv, "f:o:p:H:I:")) != -1) {
		switch (opt) {
		case 'f':
			fd = atoi(optarg);
			break;
		case 'o':
			path = optarg;
			break;
		case 'p':
			prefill = atoi(optarg);
			break;
		case 'H':
			memset(&sa, 0, sizeof(sa));
			sa.sa_handler = on_usr1;
			sigemptyset(&sa.sa_mask);
			if (strcmp(optarg, "restart") == 0)
				sa.sa_flags = SA_RESTART;
			else if (strcmp(optarg, "norestart") != 0)
				usage();
			if (sigaction(SIGUSR1, &sa, NULL) == -1)
				die(prog, "sigaction");
			break;
		case 'I':
			if (signal(atoi(optarg), SIG_IGN) == SIG_ERR)
				die(prog, "signal");
			break;
		default:
			usage();
		}
	}
	if (argc - optind != 2 || (fd == -1) == (path == NULL))
		usage();
	op = argv[optind];
	n = atoi(argv[optind + 1]);
	if (n < 1 || n > MAXREQ || prefill < 0 || prefill > MAXREQ)
		usage();
	if (path != NULL) {
		fd = session_open(prog, path, O_RDWR, NULL);
		say("fd %d", fd);
	}
	if (prefill > 0) {
		make_requests(prefill, 1);
		ret = write(fd, reqs, sizeof(reqs[0]) * (size_t)prefill);
		say("prefilled %zd %s", ret, errno_name(ret < 0 ? errno : 0));
	}

	if (strcmp(op, "write") == 0)
		make_requests(n, 100);
	else if (strcmp(op, "read") != 0)
		usage();
	say("ready");
	start = now_us();
	if (op[0] == 'w')
		ret = write(fd, reqs, sizeof(reqs[0]) * (size_t)n);
	else
		ret = read(fd, resps, sizeof(resps[0]) * (size_t)n);
	err = ret < 0 ? errno : 0;
	say("result %zd %s %lld caught=%d", ret, errno_name(err), (long long)((now_us() - start) / 1000), (int)caught);
	if (op[0] == 'r')
		for (i = 0; ret > 0 && i < ret / (ssize_t)sizeof(resps[0]); i++)
			say("resp %u %d", resps[i].resp_id, resps[i].resp_error);
	return 0;
}
