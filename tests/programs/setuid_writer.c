/*
 * setuid_writer.c - a root process opens a session, then takes another
 * user's ids (setuid after open), and writes a fill8 request over its own
 * buffer: the request acts on its memory with its new rights.
 *
 * usage: setuid_writer SESSION UID DUMPABLE
 *   SESSION   a func/fill8 clone file
 *   UID       the uid (and gid) to take after the open
 *   DUMPABLE  1: prctl(PR_SET_DUMPABLE, 1) afterwards (changing ids makes a
 *             process non-dumpable, which its own user may then not ptrace)
 * Prints "result WRITE ERRNO RESP_ERROR BYTE": what write() returned, its
 * errno name, the response's error (or -1 without one), and the buffer's
 * first byte in hex (0x5a filled, 0x50 untouched).
 */
#include "common.h"

#include <sys/prctl.h>

static const char *prog = "setuid_writer";

int
main(int argc, char **argv)
{
	static unsigned char buf[4096];
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct iovec iov;
	uid_t uid;
	ssize_t n;
	int fd, err, resp_error = -1;

	if (argc != 4) {
		fprintf(stderr, "usage: setuid_writer SESSION UID DUMPABLE\n");
		return 2;
	}
	uid = (uid_t)strtoul(argv[2], NULL, 10);
	fd = session_open(prog, argv[1], O_RDWR, NULL);
	if (setresgid(uid, uid, uid) != 0 || setresuid(uid, uid, uid) != 0)
		die(prog, "setresuid");
	if (strcmp(argv[3], "1") == 0 && prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0)
		die(prog, "prctl");
	memset(buf, 0x50, sizeof(buf));
	zero_request(&req, &iov, buf, sizeof(buf), 1);
	req.req_immediate[0] = 0x5a;
	n = write(fd, &req, sizeof(req));
	err = n < 0 ? errno : 0;
	if (n == (ssize_t)sizeof(req)) {
		if (read(fd, &resp, sizeof(resp)) != (ssize_t)sizeof(resp))
			die(prog, "read");
		resp_error = resp.resp_error;
	}
	say("result %zd %s %d %02x", n, errno_name(err), resp_error, buf[0]);
	return 0;
}
