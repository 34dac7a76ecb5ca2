/*
 * shared.c - memory a client shares with the server (a dmoverfs extension).
 *
 * A process registers a range of its address space that it maps MAP_SHARED
 * from a memfd, a /dev/shm or a hugetlbfs file.  The server takes the file
 * from the process (pidfd_getfd: the kernel's ptrace check, as for
 * process_vm_*), checks in /proc/TID/maps that exactly that file, at that
 * offset, is mapped shared and writable over the whole range, and maps the
 * same pages itself.  Requests whose operands all lie in registrations of
 * their writer's address space then run with plain memory operations on
 * the server's mapping, split across the workers when large.
 *
 * The contract is io_uring's for registered buffers: the server works on
 * the registered pages of the file until the registration is dropped
 * (unregistered, or the session closed); a client that remaps the range
 * meanwhile does not move the registration.  Requests in flight hold the
 * registrations they use, so dropping one never pulls pages from under them.
 *
 * A registration belongs to one address space: it serves only requests
 * whose writer is a thread of that same address space (kcmp), while the
 * space it was made in lives (its /proc/TID/mem, held, reads nothing once
 * the process exits or execs).  A forked child, another process sharing
 * the session, or an image the registrant exec'd is served through the
 * ordinary path, on its own memory.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "dmint.h"

#define SESS_REGS	64			/* registrations per session */
#define SESS_BYTES	((uint64_t)16 << 30)	/* bytes registered per session */
#define USER_REGS	512			/* registrations per user, all sessions */
#define USER_BYTES	((uint64_t)64 << 30)	/* bytes registered per user */
#define TMPFS_MAGIC	0x01021994
#define HUGETLBFS_MAGIC	0x958458f6
#ifndef KCMP_VM
#define KCMP_VM		1
#endif

_Static_assert(SESS_REGS <= 64, "a request's registrations fit a 64-bit mask");

struct dm_shreg {
	atomic_uint refs;		/* the session's list, and requests using it */
	struct dm_shreg *next;		/* the session's list (set mu) */
	uintptr_t addr;			/* the client's range */
	size_t len;
	uint8_t *map;			/* the server's mapping of the same pages */
	size_t maplen;
	int tgid;			/* the registering process */
	int pidfd;			/* of that process */
	int memfd;			/* its /proc/TID/mem: the address space registered */
	dm_core *core;
	struct dm_user *user;		/* the session's: charged for it */
};

struct dm_shset {
	pthread_mutex_t mu;
	struct dm_shreg *head;
	unsigned count;
	uint64_t bytes;
};

/* What a request holds: the registrations its operands lie in. */
struct dm_shuse {
	unsigned n;
	struct dm_shreg *reg[];
};

/* --- per-user accounting ---------------------------------------------------- */

/* Count a registration of len bytes against user u: 0 or ENOSPC. */
static int
user_charge(dm_core *c, struct dm_user *u, uint64_t len)
{
	int err = 0;

	pthread_mutex_lock(&c->mu);
	if (u->shared_regs >= USER_REGS || len > USER_BYTES - u->shared_bytes)
		err = ENOSPC;
	else {
		u->shared_regs++;
		u->shared_bytes += len;
	}
	pthread_mutex_unlock(&c->mu);
	return err;
}

static void
user_uncharge(dm_core *c, struct dm_user *u, uint64_t len)
{
	pthread_mutex_lock(&c->mu);
	u->shared_regs--;
	u->shared_bytes -= len;
	pthread_mutex_unlock(&c->mu);
}

/* --- registrations ---------------------------------------------------------- */

static void
reg_unref(struct dm_shreg *g)
{
	if (atomic_fetch_sub(&g->refs, 1) != 1)
		return;
	if (g->map != NULL) {
		munmap(g->map, g->maplen);
		user_uncharge(g->core, g->user, g->len);
	}
	if (g->pidfd >= 0)
		close(g->pidfd);
	if (g->memfd >= 0)
		close(g->memfd);
	free(g);
}

/* Has the process behind pidfd exited? */
static bool
exited(int pidfd)
{
	struct pollfd pfd = { .fd = pidfd, .events = POLLIN };
	int n;

	do
		n = poll(&pfd, 1, 0);
	while (n < 0 && errno == EINTR);
	return n != 0;
}

/* Is the address space g was registered in gone (exit, exec)? */
static bool
reg_dead(const struct dm_shreg *g)
{
	return exited(g->pidfd) || dm_mem_gone(g->memfd);
}

/* The thread group of thread tid, from /proc/TID/status; -1 if unknown. */
static int
tgid_of(int tid)
{
	char path[48], line[128];
	int tgid = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	if ((f = fopen(path, "re")) == NULL)
		return -1;
	while (fgets(line, sizeof(line), f) != NULL)
		if (sscanf(line, "Tgid: %d", &tgid) == 1)
			break;
	fclose(f);
	return tgid;
}

/* Hold the registering thread's address space, and its process: 0 or an errno. */
static int
hold_owner(const struct dm_peer *who, struct dm_shreg *g)
{
	char path[48];
	int err;

	if ((g->tgid = tgid_of(who->pid)) <= 0)
		return ESRCH;
	snprintf(path, sizeof(path), "/proc/%d/mem", who->pid);
	if (dm_peer_become(who) != 0)
		return EPERM;
	g->memfd = open(path, O_RDONLY | O_CLOEXEC);
	err = errno;
	dm_peer_unbecome(who);
	if (g->memfd < 0)
		return err == EACCES ? EPERM : err;
	if ((g->pidfd = (int)syscall(SYS_pidfd_open, g->tgid, 0)) < 0)
		return errno;
	return 0;
}

/* The process's descriptor fd, taken with its writer's rights: the file, or -errno. */
static int
fetch_file(const struct dm_peer *who, const struct dm_shreg *g, int fd)
{
	int file, err;

	if (dm_peer_become(who) != 0)
		return -EPERM;
	file = (int)syscall(SYS_pidfd_getfd, g->pidfd, fd, 0);
	err = errno;
	dm_peer_unbecome(who);
	if (file < 0)
		return -(err == EACCES ? EPERM : err);
	return file;
}

/* A shared-memory file holding [off, off + len): 0 or an errno. */
static int
check_file(int file, uint64_t off, uint64_t len, struct stat *st)
{
	struct statfs fs;

	if (fstatfs(file, &fs) != 0 || fstat(file, st) != 0)
		return errno;
	if ((unsigned long)fs.f_type != TMPFS_MAGIC && (unsigned long)fs.f_type != HUGETLBFS_MAGIC)
		return EINVAL;	/* not shared memory: a disk file's pages could go to disk */
	if (!S_ISREG(st->st_mode) || off > (uint64_t)st->st_size || len > (uint64_t)st->st_size - off)
		return EINVAL;
	return 0;
}

/*
 * Does the thread map [addr, addr + len) from the file st, at file offset
 * off, shared and writable, without a hole?  0, or EFAULT (not mapped from
 * that file), EINVAL (mapped from another offset), EACCES (private or
 * read-only), or the errno of reading its maps.
 */
static int
check_maps(const struct dm_peer *who, const struct stat *st, uint64_t off, uintptr_t addr, size_t len)
{
	char path[48], *line = NULL;
	size_t cap = 0;
	uintptr_t at = addr, end = addr + len;
	int err = EFAULT;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/maps", who->pid);
	if (dm_peer_become(who) != 0)
		return EPERM;
	f = fopen(path, "re");
	err = errno;
	dm_peer_unbecome(who);
	if (f == NULL)
		return err == EACCES ? EPERM : err;
	err = EFAULT;
	while (getline(&line, &cap, f) > 0) {
		uintmax_t lo, hi, foff, ino;
		unsigned maj, min;
		char perms[8];

		if (sscanf(line, "%jx-%jx %7s %jx %x:%x %ju", &lo, &hi, perms, &foff, &maj, &min, &ino) != 7)
			continue;
		if (hi <= at)
			continue;
		if (lo > at)
			break;		/* a hole, or something else, at at */
		if (ino != st->st_ino || maj != major(st->st_dev) || min != minor(st->st_dev))
			break;		/* another file */
		if (perms[0] != 'r' || perms[1] != 'w' || perms[3] != 's') {
			err = EACCES;
			break;
		}
		if (foff + (at - lo) != off + (at - addr)) {
			err = EINVAL;
			break;
		}
		at = hi < end ? (uintptr_t)hi : end;
		if (at == end) {
			err = 0;
			break;
		}
	}
	free(line);
	fclose(f);
	return err;
}

/* Forget registrations whose address space is gone (call under set mu). */
static void
prune(struct dm_shset *set)
{
	for (struct dm_shreg **p = &set->head; *p != NULL;) {
		struct dm_shreg *g = *p;

		if (reg_dead(g)) {
			*p = g->next;
			set->count--;
			set->bytes -= g->len;
			reg_unref(g);
		} else
			p = &g->next;
	}
}

/* The session's set, made on first use; NULL when out of memory. */
static struct dm_shset *
session_set(dm_sess *s)
{
	struct dm_shset *set;

	pthread_mutex_lock(&s->mu);
	if ((set = s->shared) == NULL && (set = calloc(1, sizeof(*set))) != NULL) {
		pthread_mutex_init(&set->mu, NULL);
		__atomic_store_n(&s->shared, set, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&s->mu);
	return set;
}

/* Link g into set if the limits allow and it overlaps nothing of its process,
 * then map its pages: 0 or an errno.  file is the registered file. */
static int
link_reg(dm_sess *s, struct dm_shset *set, struct dm_shreg *g, int file, uint64_t off)
{
	int err = 0;

	pthread_mutex_lock(&set->mu);
	prune(set);
	for (struct dm_shreg *h = set->head; h != NULL; h = h->next)
		if (h->tgid == g->tgid && g->addr < h->addr + h->len && h->addr < g->addr + g->len)
			err = EEXIST;
	if (err == 0 && (set->count >= SESS_REGS || g->len > SESS_BYTES - set->bytes))
		err = ENOSPC;
	if (err == 0)
		err = user_charge(g->core, g->user, g->len);
	if (err == 0) {
		void *m = mmap(NULL, g->maplen, PROT_READ | PROT_WRITE, MAP_SHARED, file, (off_t)off);

		if (m == MAP_FAILED) {
			err = errno;
			user_uncharge(g->core, g->user, g->len);
		} else {
			g->map = m;
			g->next = set->head;
			set->head = g;
			set->count++;
			set->bytes += g->len;
		}
	}
	pthread_mutex_unlock(&set->mu);
	return err;
}

int
dm_sess_register(dm_sess *s, int tid, uint32_t uid, uint32_t gid, int fd, uint64_t off,
    uint64_t addr, uint64_t len)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	struct dm_peer *who;
	struct dm_shreg *g;
	struct dm_shset *set;
	struct stat st;
	int file = -1, err;

	if (tid <= 0 || fd < 0 || len == 0 || addr % page != 0 || off % page != 0 ||
	    addr > UINTPTR_MAX - len || len > SIZE_MAX - page || off > (uint64_t)INT64_MAX - len)
		return EINVAL;
	if ((set = session_set(s)) == NULL)
		return ENOMEM;
	/* The setting thread is inside its setxattr: tid names it exactly. */
	if ((who = dm_peer_new(tid, -1, true, &s->cancel)) == NULL)
		return ENOMEM;
	dm_peer_rights(who, uid, gid);
	if ((g = calloc(1, sizeof(*g))) == NULL) {
		dm_peer_unref(who);
		return ENOMEM;
	}
	atomic_init(&g->refs, 1);
	g->pidfd = g->memfd = -1;
	g->addr = (uintptr_t)addr;
	g->len = (size_t)len;
	g->core = s->core;
	g->user = s->user;
	if ((err = hold_owner(who, g)) == 0 && (file = fetch_file(who, g, fd)) < 0)
		err = -file;
	if (err == 0)
		err = check_file(file, off, len, &st);
	if (err == 0) {
		/* Whole pages of the file: hugetlbfs's are its block size. */
		uint64_t unit = (uint64_t)st.st_blksize > page ? (uint64_t)st.st_blksize : page;

		g->maplen = (size_t)((len + unit - 1) / unit * unit);
	}
	if (err == 0)
		err = check_maps(who, &st, off, g->addr, g->len);
	if (err == 0)
		err = link_reg(s, set, g, file, off);
	if (file >= 0)
		close(file);	/* the mapping holds the file */
	dm_peer_unref(who);
	if (err != 0)
		reg_unref(g);
	return err;
}

int
dm_sess_unregister(dm_sess *s, int tid, uint64_t addr, uint64_t len)
{
	struct dm_shset *set = __atomic_load_n(&s->shared, __ATOMIC_ACQUIRE);
	int tgid = tgid_of(tid), err = ENOENT;

	if (set == NULL || tgid <= 0)
		return ENOENT;
	pthread_mutex_lock(&set->mu);
	for (struct dm_shreg **p = &set->head; *p != NULL; p = &(*p)->next) {
		struct dm_shreg *g = *p;

		if (g->tgid == tgid && g->addr == addr && g->len == len && !reg_dead(g)) {
			*p = g->next;
			set->count--;
			set->bytes -= g->len;
			reg_unref(g);	/* requests in flight hold their own references */
			err = 0;
			break;
		}
	}
	pthread_mutex_unlock(&set->mu);
	return err;
}

void
dm_sess_shared(dm_sess *s, uint64_t *out)
{
	struct dm_shset *set = __atomic_load_n(&s->shared, __ATOMIC_ACQUIRE);

	out[0] = out[1] = 0;
	if (set == NULL)
		return;
	pthread_mutex_lock(&set->mu);
	out[0] = set->count;
	out[1] = set->bytes;
	pthread_mutex_unlock(&set->mu);
}

void
dm_shared_close(dm_sess *s)
{
	struct dm_shset *set = __atomic_load_n(&s->shared, __ATOMIC_ACQUIRE);

	if (set == NULL)
		return;
	/* A pump may still be submitting for s: the set stays until s is freed. */
	pthread_mutex_lock(&set->mu);
	while (set->head != NULL) {
		struct dm_shreg *g = set->head;

		set->head = g->next;
		reg_unref(g);
	}
	set->count = 0;
	set->bytes = 0;
	pthread_mutex_unlock(&set->mu);
}

void
dm_shared_free(dm_sess *s)
{
	struct dm_shset *set = s->shared;

	if (set == NULL)
		return;
	dm_shared_close(s);
	s->shared = NULL;
	pthread_mutex_destroy(&set->mu);
	free(set);
}

/* --- matching requests -------------------------------------------------------- */

/*
 * Is writer w a thread of the address space g was registered in?  kcmp
 * compares the spaces of w's thread and of g's process; the checks after it
 * make sure those ids still named them: g's process lives and its space is
 * the one registered (not an exec'd image), and w is inside its write or,
 * for an opener, has not exited.
 */
static bool
writer_owns(struct dm_peer *w, const struct dm_shreg *g)
{
	if (syscall(SYS_kcmp, w->pid, g->tgid, KCMP_VM, 0, 0) != 0)
		return false;
	if (reg_dead(g))
		return false;
	if (atomic_load(&w->pinned))
		return true;
	return w->memfd < 0 && w->pidfd >= 0 && !exited(w->pidfd);
}

/* The registration in mine[0..n) holding [base, base + len), or -1. */
static int
find(struct dm_shreg *const *mine, unsigned n, uintptr_t base, size_t len)
{
	for (unsigned i = 0; i < n; i++) {
		const struct dm_shreg *g = mine[i];

		if (base >= g->addr && base - g->addr <= g->len && len <= g->len - (base - g->addr))
			return (int)i;
	}
	return -1;
}

/* The lists of r: the output, then each input. */
static const struct dm_list *
list_of(const struct dm_req *r, int i)
{
	return i == 0 ? &r->out : &r->in[i - 1];
}

/* Point r at mine[] if every byte of it lies there (call under set mu). */
static void
attach_one(struct dm_req *r, struct dm_shreg *const *mine, unsigned n)
{
	uint64_t used = 0;
	struct dm_shuse *u;
	unsigned k = 0;

	if (r->err != 0 || r->fn->run == NULL || r->total == 0)
		return;		/* fails, an external back-end's, or nothing to do */
	for (int i = 0; i <= r->fn->ninputs; i++) {
		const struct dm_list *l = list_of(r, i);

		for (uint32_t j = 0; j < l->cnt; j++) {
			int at;

			if (l->iov[j].iov_len == 0)
				continue;
			if ((at = find(mine, n, (uintptr_t)l->iov[j].iov_base, l->iov[j].iov_len)) < 0)
				return;
			used |= (uint64_t)1 << at;
		}
	}
	if ((u = malloc(sizeof(*u) + (size_t)__builtin_popcountll(used) * sizeof(u->reg[0]))) == NULL)
		return;		/* the ordinary path does it */
	for (unsigned i = 0; i < n; i++)
		if (used & ((uint64_t)1 << i)) {
			atomic_fetch_add(&mine[i]->refs, 1);
			u->reg[k++] = mine[i];
		}
	u->n = k;
	/* From here on the request's lists name the server's own mapping: they
	 * are r's own copies, made by dm_decode. */
	for (int i = 0; i <= r->fn->ninputs; i++) {
		const struct dm_list *l = list_of(r, i);
		struct iovec *v = (struct iovec *)(uintptr_t)l->iov;

		for (uint32_t j = 0; j < l->cnt; j++) {
			const struct dm_shreg *g;
			uintptr_t base = (uintptr_t)v[j].iov_base;

			if (v[j].iov_len == 0)
				continue;
			g = mine[find(mine, n, base, v[j].iov_len)];
			v[j].iov_base = g->map + (base - g->addr);
		}
	}
	r->shared = u;
}

void
dm_shared_attach(dm_sess *s, struct dm_exec *x, struct dm_req *const *r, size_t n)
{
	struct dm_shset *set = __atomic_load_n(&s->shared, __ATOMIC_ACQUIRE);
	struct dm_shreg *mine[SESS_REGS];
	int judged[SESS_REGS];		/* tgids judged, and whether w is theirs */
	bool theirs[SESS_REGS];
	unsigned nmine = 0, njudged = 0;

	if (set == NULL || x->peer == NULL || n == 0)
		return;
	pthread_mutex_lock(&set->mu);
	for (struct dm_shreg *g = set->head; g != NULL; g = g->next) {
		unsigned i = 0;

		while (i < njudged && judged[i] != g->tgid)
			i++;
		if (i == njudged) {
			judged[njudged] = g->tgid;
			theirs[njudged++] = writer_owns(x->peer, g);
		}
		if (theirs[i])
			mine[nmine++] = g;
	}
	for (size_t i = 0; i < n && nmine > 0; i++)
		attach_one(r[i], mine, nmine);
	pthread_mutex_unlock(&set->mu);
}

void
dm_shared_release(struct dm_req *r)
{
	struct dm_shuse *u = r->shared;

	if (u == NULL)
		return;
	for (unsigned i = 0; i < u->n; i++)
		reg_unref(u->reg[i]);
	free(u);
	r->shared = NULL;
}
