/*
 * remote.c - moving bytes between local buffers and a client's iovec lists
 * with process_vm_readv / process_vm_writev, up to IOV_MAX segments a call.
 *
 * Client addresses are only numbers here: they are never dereferenced, and
 * their arithmetic is done on uintptr_t so that a wrapping base + len (which
 * the kernel will refuse) is not undefined behaviour in the server.
 */
#include <errno.h>
#include <poll.h>
#include <time.h>

#include "dmint.h"

/* Poll the pidfd again after this many bytes: a long request must notice
 * that its client exited, but a poll costs as much as a small transfer. */
#define DM_RECHECK_BYTES	((uint64_t)64 << 20)
/*
 * A client found alive this recently is not polled again before a new
 * transfer (small requests would pay a syscall each): its pid cannot name
 * another process yet.  The kernel hands pids out in a cycle, so reusing an
 * exited client's pid takes a round of the whole pid space - far more forks
 * than fit in a millisecond.  A gone client fails with ESRCH meanwhile.
 */
#define DM_RECHECK_NS		1000000

void
dm_rcur_init(struct dm_rcur *c, const struct iovec *iov, size_t cnt)
{
	c->iov = iov;
	c->cnt = cnt;
	c->idx = 0;
	c->off = 0;
}

void
dm_rcur_skip(struct dm_rcur *c, uint64_t n)
{
	while (n > 0 && c->idx < c->cnt) {
		size_t left = c->iov[c->idx].iov_len - c->off;

		if (n < left) {
			c->off += (size_t)n;
			return;
		}
		n -= left;
		c->idx++;
		c->off = 0;
	}
}

/*
 * Describe the next (at most) want bytes of the list with at most room
 * iovecs in out, skipping empty segments, and advance.  Returns the bytes
 * described; *nout the iovecs used.
 */
static size_t
rcur_slice(struct dm_rcur *c, size_t want, struct iovec *out, size_t room, size_t *nout)
{
	size_t got = 0, n = 0;

	while (got < want && n < room && c->idx < c->cnt) {
		const struct iovec *v = &c->iov[c->idx];
		size_t take = v->iov_len - c->off;

		if (take > want - got)
			take = want - got;
		if (take > 0) {
			out[n].iov_base = (void *)((uintptr_t)v->iov_base + c->off);
			out[n].iov_len = take;
			n++;
			got += take;
			c->off += take;
		}
		if (c->off == v->iov_len) {
			c->idx++;
			c->off = 0;
		}
	}
	*nout = n;
	return got;
}

/* May we touch the client for bytes more bytes?  0 or the errno to report. */
static int
peer_ready(struct dm_exec *x, struct dm_peer *p, size_t bytes)
{
	if (atomic_load_explicit(&p->cancel, memory_order_relaxed) ||
	    atomic_load_explicit(&x->core->stopping, memory_order_relaxed))
		return ECANCELED;
	if (atomic_load_explicit(&p->gone, memory_order_relaxed))
		return EFAULT;
	if (x->budget == 0) {
		int64_t now = dm_clock_ns(CLOCK_MONOTONIC);

		if (now - atomic_load_explicit(&p->alive_ns, memory_order_relaxed) >= DM_RECHECK_NS) {
			/* Readable means exited: from then on the pid may name another process. */
			struct pollfd pfd = { .fd = p->pidfd, .events = POLLIN };
			int n;

			do
				n = poll(&pfd, 1, 0);
			while (n < 0 && errno == EINTR);
			if (n != 0) {
				if (n > 0)
					atomic_store(&p->gone, true);
				return EFAULT;
			}
			atomic_store_explicit(&p->alive_ns, now, memory_order_relaxed);
		}
		x->budget = DM_RECHECK_BYTES;
	}
	x->budget -= bytes < x->budget ? bytes : x->budget;
	return 0;
}

/* One syscall between x->loc[0..nloc) and x->rem[0..nrem), bytes long;
 * *got is what moved (the kernel stops at the first bad remote byte). */
static int
xfer(struct dm_exec *x, struct dm_peer *p, bool write, size_t nloc, size_t nrem,
    size_t bytes, size_t *got)
{
	ssize_t n;
	int err = peer_ready(x, p, bytes);

	*got = 0;
	if (err != 0)
		return err;
	/* Seen by dm_core_check_stalls: a fault on a slow FUSE file can hold this call. */
	atomic_store_explicit(&x->in_xfer_ns, dm_clock_ns(CLOCK_MONOTONIC), memory_order_relaxed);
	if (write)
		n = process_vm_writev(p->pid, x->loc, nloc, x->rem, nrem, 0);
	else
		n = process_vm_readv(p->pid, x->loc, nloc, x->rem, nrem, 0);
	atomic_store_explicit(&x->in_xfer_ns, 0, memory_order_relaxed);
	if (n < 0) {
		if (errno == EPERM)
			return EPERM;
		if (errno == ESRCH)
			atomic_store(&p->gone, true);
		return EFAULT;
	}
	*got = (size_t)n;
	return *got == bytes ? 0 : EFAULT;
}

int
dm_readv(struct dm_exec *x, struct dm_peer *p, size_t nloc, size_t nrem, size_t bytes, size_t *got)
{
	return xfer(x, p, false, nloc, nrem, bytes, got);
}

int
dm_writev(struct dm_exec *x, struct dm_peer *p, size_t nloc, size_t nrem, size_t bytes, size_t *got)
{
	return xfer(x, p, true, nloc, nrem, bytes, got);
}

int
dm_gather(struct dm_exec *x, struct dm_peer *p, struct dm_rcur *cur,
    uint8_t *const *dst, int n, size_t len)
{
	size_t nloc = 0, nrem = 0, bytes = 0, moved;

	/* All the operands in as few syscalls as the iovec limits allow. */
	for (int i = 0; i < n; i++) {
		for (size_t done = 0; done < len;) {
			size_t k, got;

			if (nloc == IOV_MAX || nrem == IOV_MAX) {
				int err = xfer(x, p, false, nloc, nrem, bytes, &moved);

				if (err != 0)
					return err;
				nloc = nrem = bytes = 0;
			}
			got = rcur_slice(&cur[i], len - done, x->rem + nrem, IOV_MAX - nrem, &k);
			if (got == 0)	/* list shorter than validated: never loop forever */
				return EFAULT;
			x->loc[nloc].iov_base = dst[i] + done;
			x->loc[nloc].iov_len = got;
			nloc++;
			nrem += k;
			bytes += got;
			done += got;
		}
	}
	return bytes > 0 ? xfer(x, p, false, nloc, nrem, bytes, &moved) : 0;
}

int
dm_put(struct dm_exec *x, struct dm_peer *p, struct dm_rcur *cur,
    const uint8_t *src, size_t unit, size_t len)
{
	/* Bytes per syscall: whatever the phase, a span needs at most IOV_MAX
	 * local pieces (a plain copy is one piece of at most a chunk). */
	size_t span = len;

	if (unit < len)
		span = unit <= DM_XFER_MAX / (IOV_MAX - 1) ? unit * (IOV_MAX - 1) : DM_XFER_MAX;
	for (size_t done = 0; done < len;) {
		size_t nloc = 0, nrem, moved, phase = done % unit;
		size_t got = rcur_slice(cur, len - done < span ? len - done : span,
		    x->rem, IOV_MAX, &nrem);
		int err;

		if (got == 0)
			return EFAULT;
		for (size_t left = got; left > 0; phase = 0) {
			size_t take = unit - phase < left ? unit - phase : left;

			x->loc[nloc].iov_base = (void *)(src + phase);
			x->loc[nloc].iov_len = take;
			nloc++;
			left -= take;
		}
		if ((err = xfer(x, p, true, nloc, nrem, got, &moved)) != 0)
			return err;
		done += got;
	}
	return 0;
}
