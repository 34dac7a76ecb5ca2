/*
 * remote.c - moving bytes between local buffers and a client's iovec lists
 * with process_vm_readv / process_vm_writev, up to IOV_MAX segments a call.
 *
 * Client addresses are only numbers here: they are never dereferenced, and
 * their arithmetic is done on uintptr_t so that a wrapping base + len (which
 * the kernel will refuse) is not undefined behaviour in the server.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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

#ifndef PIDFD_THREAD
#define PIDFD_THREAD	O_EXCL	/* Linux >= 6.9: a pidfd of one thread */
#endif

struct dm_peer *
dm_peer_new(int pid, int pidfd, bool pinned, atomic_bool *cancel)
{
	struct dm_peer *p = calloc(1, sizeof(*p));

	if (p == NULL)
		return NULL;
	atomic_init(&p->refs, 1);
	p->pid = pid;
	p->pidfd = pidfd;
	p->memfd = -1;
	atomic_init(&p->pinned, pinned);
	atomic_init(&p->gone, false);
	atomic_init(&p->pid_gone, false);
	p->cancel = cancel;
	atomic_init(&p->alive_ns, INT64_MIN / 2);
	return p;
}

void
dm_peer_rights(struct dm_peer *p, uint32_t uid, uint32_t gid)
{
	p->uid = uid;
	p->gid = gid;
	p->as_writer = geteuid() == 0 && (uid != 0 || gid != 0);
}

/*
 * Take the writer's rights in this thread, for one access (raw system calls:
 * glibc's wrappers would change every thread of the server).  The saved uid
 * stays 0, so the thread keeps its permitted capabilities and comes back
 * with become_server(); its effective ones are gone meanwhile, CAP_SYS_PTRACE
 * with them.  0, or EPERM when the switch cannot be made.
 */
static int
become_writer(const struct dm_peer *p)
{
	if (!p->as_writer)
		return 0;
	if (syscall(SYS_setresgid, p->gid, p->gid, 0) != 0)
		return EPERM;
	if (syscall(SYS_setresuid, p->uid, p->uid, 0) != 0) {
		(void)syscall(SYS_setresgid, 0, 0, 0);
		return EPERM;
	}
	return 0;
}

static void
become_server(const struct dm_peer *p)
{
	if (!p->as_writer)
		return;
	/* Both cannot fail: 0 is the saved uid, and the capabilities return with it. */
	(void)syscall(SYS_setresuid, 0, 0, 0);
	(void)syscall(SYS_setresgid, 0, 0, 0);
}

int
dm_peer_become(const struct dm_peer *p)
{
	return become_writer(p);
}

void
dm_peer_unbecome(const struct dm_peer *p)
{
	become_server(p);
}

void
dm_peer_ref(struct dm_peer *p)
{
	atomic_fetch_add(&p->refs, 1);
}

void
dm_peer_unref(struct dm_peer *p)
{
	if (p == NULL || atomic_fetch_sub(&p->refs, 1) != 1)
		return;
	if (p->pidfd >= 0)
		close(p->pidfd);
	if (p->memfd >= 0)
		close(p->memfd);
	free(p);
}

int
dm_peer_hold(struct dm_peer *p)
{
	char path[48];
	int fd, err;

	if (p->memfd >= 0 || !atomic_load(&p->pinned))
		return 0;	/* held already, or an opener's peer (pidfd-checked) */
	/* The writer is inside its write: /proc/TID/mem is its address space,
	 * opened with its rights (the open is where the kernel checks them). */
	snprintf(path, sizeof(path), "/proc/%d/mem", p->pid);
	if (become_writer(p) != 0)
		return EPERM;
	fd = open(path, O_RDWR | O_CLOEXEC);
	err = errno;
	become_server(p);
	if (fd < 0)
		return err == EACCES || err == EPERM ? EPERM : EFAULT;
	/* A thread pidfd says when the tid may name another thread; without
	 * one (Linux < 6.9) the data moves through the held descriptor. */
	if (p->pidfd < 0)
		p->pidfd = (int)syscall(SYS_pidfd_open, p->pid, PIDFD_THREAD);
	p->memfd = fd;
	return 0;
}

void
dm_peer_unpin(struct dm_peer *p)
{
	atomic_store(&p->pinned, false);
}

/* Is the held address space gone (exit, exec)?  A read through it gets
 * nothing once it is; an unmapped address (EIO) still means it is there. */
static bool
space_gone(const struct dm_peer *p, uintptr_t addr)
{
	unsigned char b;

	return pread(p->memfd, &b, 1, (off_t)addr) == 0;
}

bool
dm_mem_gone(int memfd)
{
	unsigned char b;

	return pread(memfd, &b, 1, 0) == 0;	/* address 0: EIO while the space is there */
}

/* Move bytes between x->loc and x->rem through the held descriptor: exact,
 * whichever thread of the space lives, but slower than process_vm_*. */
static ssize_t
xfer_held(struct dm_exec *x, struct dm_peer *p, bool write, size_t nloc, size_t nrem)
{
	size_t li = 0, ri = 0, loff = 0, roff = 0;
	ssize_t total = 0;

	while (li < nloc && ri < nrem) {
		size_t n = x->loc[li].iov_len - loff;
		char *local = (char *)x->loc[li].iov_base + loff;
		uintptr_t remote = (uintptr_t)x->rem[ri].iov_base + roff;
		ssize_t k;

		if (n > x->rem[ri].iov_len - roff)
			n = x->rem[ri].iov_len - roff;
		if (n > 0) {
			k = write ? pwrite(p->memfd, local, n, (off_t)remote) : pread(p->memfd, local, n, (off_t)remote);
			if (k <= 0)
				return total > 0 ? total : -1;
			total += k;
			if ((size_t)k < n)
				return total;
		}
		loff += n;
		roff += n;
		if (loff == x->loc[li].iov_len) {
			li++;
			loff = 0;
		}
		if (roff == x->rem[ri].iov_len) {
			ri++;
			roff = 0;
		}
	}
	return total;
}

/* May the peer's pid name another thread or process by now (it exited)?
 * Its pidfd is polled at most once a millisecond or every DM_RECHECK_BYTES
 * (see DM_RECHECK_NS); once true, true for good. */
static bool
pid_exited(struct dm_exec *x, struct dm_peer *p)
{
	if (atomic_load_explicit(&p->pid_gone, memory_order_relaxed))
		return true;
	if (x->budget == 0) {
		int64_t now = dm_clock_ns(CLOCK_MONOTONIC);

		if (now - atomic_load_explicit(&p->alive_ns, memory_order_relaxed) >= DM_RECHECK_NS) {
			/* Readable means exited: from then on the pid may name another. */
			struct pollfd pfd = { .fd = p->pidfd, .events = POLLIN };
			int n;

			do
				n = poll(&pfd, 1, 0);
			while (n < 0 && errno == EINTR);
			if (n != 0) {
				atomic_store(&p->pid_gone, true);
				return true;
			}
			atomic_store_explicit(&p->alive_ns, now, memory_order_relaxed);
		}
		x->budget = DM_RECHECK_BYTES;
	}
	return false;
}

/* How may we touch the peer for bytes more bytes?  Through process_vm_*
 * (*held false) or through its held descriptor (*held true); else the
 * errno to report. */
static int
peer_ready_at(struct dm_exec *x, struct dm_peer *p, uintptr_t addr, size_t bytes, bool *held)
{
	*held = false;
	if (atomic_load_explicit(p->cancel, memory_order_relaxed) ||
	    atomic_load_explicit(&x->core->stopping, memory_order_relaxed))
		return ECANCELED;
	if (atomic_load_explicit(&p->gone, memory_order_relaxed))
		return EFAULT;
	if (atomic_load_explicit(&p->pinned, memory_order_acquire))
		return 0;	/* the writer is in its write: its tid is exact */
	if (p->memfd < 0) {
		/* An opener's peer: its pidfd tells when its pid may be reused. */
		if (p->pidfd < 0 || pid_exited(x, p)) {
			atomic_store(&p->gone, true);
			return EFAULT;
		}
		x->budget -= bytes < x->budget ? bytes : x->budget;
		return 0;
	}
	if (space_gone(p, addr)) {
		atomic_store(&p->gone, true);	/* exited or exec'd: nothing of it is left */
		return EFAULT;
	}
	/* The space is there; its tid names it while that thread lives. */
	*held = p->pidfd < 0 || pid_exited(x, p);
	x->budget -= bytes < x->budget ? bytes : x->budget;
	return 0;
}

static int
peer_ready(struct dm_exec *x, struct dm_peer *p, size_t bytes, bool *held)
{
	return peer_ready_at(x, p, (uintptr_t)x->rem[0].iov_base, bytes, held);
}

int
dm_peer_live(struct dm_exec *x, struct dm_peer *p)
{
	bool held;

	return peer_ready_at(x, p, 0, 0, &held);
}

/* One syscall between x->loc[0..nloc) and x->rem[0..nrem), bytes long;
 * *got is what moved (the kernel stops at the first bad remote byte). */
static int
xfer(struct dm_exec *x, struct dm_peer *p, bool write, size_t nloc, size_t nrem,
    size_t bytes, size_t *got)
{
	ssize_t n;
	bool held;
	int err;

	*got = 0;
	/* Seen by dm_core_check_stalls: a fault on a slow FUSE file can hold this
	 * call, and peer_ready's look through a held space as well. */
	atomic_store_explicit(&x->in_xfer_ns, dm_clock_ns(CLOCK_MONOTONIC), memory_order_relaxed);
	if ((err = peer_ready(x, p, bytes, &held)) != 0) {
		atomic_store_explicit(&x->in_xfer_ns, 0, memory_order_relaxed);
		return err;
	}
	if (become_writer(p) != 0) {
		atomic_store_explicit(&x->in_xfer_ns, 0, memory_order_relaxed);
		return EPERM;
	}
	if (held)
		n = xfer_held(x, p, write, nloc, nrem);
	else if (write)
		n = process_vm_writev(p->pid, x->loc, nloc, x->rem, nrem, 0);
	else
		n = process_vm_readv(p->pid, x->loc, nloc, x->rem, nrem, 0);
	err = n < 0 ? errno : 0;
	become_server(p);
	atomic_store_explicit(&x->in_xfer_ns, 0, memory_order_relaxed);
	if (n < 0) {
		if (err == EPERM || err == EACCES)
			return EPERM;
		/* ESRCH: the thread is gone; a held space may still be reached. */
		if (err == ESRCH)
			atomic_store(p->memfd < 0 ? &p->gone : &p->pid_gone, true);
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
