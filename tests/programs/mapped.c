/*
 * mapped.c - a copy request whose input is a private, read-only mapping of
 * a file (on a FUSE mount: the data mover's own `stats`, or a slow one).
 *
 * usage: mapped SESSION FILE SIZE PIECE
 *   SESSION  a func/copy clone file
 *   FILE     mapped with mmap(PIECE bytes, PROT_READ, MAP_PRIVATE); this
 *            program never touches the mapping before the request ran, so
 *            the server is the first to fault its pages in
 *   SIZE     bytes copied: the input is SIZE / PIECE iovecs, each the whole
 *            mapping; the output is ordinary memory
 * Prints "ready" before the write, then
 *   write RET ERRNO MILLISECONDS
 *   resp ID ERROR MILLISECONDS
 *   equal | differ OFFSET     (the output against the mapping, read now)
 *   head HEX                  (the mapping's first 8 bytes)
 */
#include "common.h"

#include <sys/mman.h>

static const char *prog = "mapped";

int
main(int argc, char **argv)
{
	struct dmio_usrreq req;
	struct dmio_usrresp resp;
	struct iovec out_iov, *in_iov;
	dmio_buffer inbuf;
	size_t size, piece, pieces, i, j;
	unsigned char *map, *out;
	int fd, file;
	int64_t start;
	ssize_t ret;

	if (argc != 5) {
		fprintf(stderr, "usage: mapped SESSION FILE SIZE PIECE\n");
		return 2;
	}
	size = strtoul(argv[3], NULL, 0);
	piece = strtoul(argv[4], NULL, 0);
	if (piece == 0 || size == 0 || size % piece != 0 || size / piece > 1024) {
		fprintf(stderr, "%s: SIZE must be a multiple of PIECE, at most 1024 pieces\n", prog);
		return 2;
	}
	pieces = size / piece;
	fd = session_open(prog, argv[1], O_RDWR, NULL);
	file = open(argv[2], O_RDONLY | O_CLOEXEC);
	if (file == -1)
		die(prog, argv[2]);
	map = mmap(NULL, piece, PROT_READ, MAP_PRIVATE, file, 0);
	if (map == MAP_FAILED)
		die(prog, "mmap");
	out = malloc(size);
	in_iov = calloc(pieces, sizeof(*in_iov));
	if (out == NULL || in_iov == NULL)
		die(prog, "malloc");
	memset(out, 0xee, size);
	for (i = 0; i < pieces; i++) {
		in_iov[i].iov_base = map;
		in_iov[i].iov_len = piece;
	}
	out_iov.iov_base = out;
	out_iov.iov_len = size;
	inbuf.dmbuf_iov = in_iov;
	inbuf.dmbuf_iovcnt = (unsigned)pieces;
	memset(&req, 0, sizeof(req));
	req.req_outbuf.dmbuf_iov = &out_iov;
	req.req_outbuf.dmbuf_iovcnt = 1;
	req.req_inbuf = &inbuf;
	req.req_id = 7;

	say("ready");
	start = now_us();
	ret = write(fd, &req, sizeof(req));
	say("write %zd %s %lld", ret, errno_name(ret < 0 ? errno : 0), (long long)((now_us() - start) / 1000));
	if (ret != (ssize_t)sizeof(req))
		return 1;
	ret = read(fd, &resp, sizeof(resp));
	if (ret != (ssize_t)sizeof(resp)) {
		say("read %zd %s", ret, errno_name(ret < 0 ? errno : 0));
		return 1;
	}
	say("resp %u %d %lld", resp.resp_id, resp.resp_error, (long long)((now_us() - start) / 1000));
	for (i = 0; i < pieces; i++)
		for (j = 0; j < piece; j++)
			if (out[i * piece + j] != map[j]) {
				say("differ %zu", i * piece + j);
				return 0;
			}
	say("equal");
	say("head %02x%02x%02x%02x%02x%02x%02x%02x", map[0], map[1], map[2], map[3], map[4], map[5], map[6], map[7]);
	return 0;
}
