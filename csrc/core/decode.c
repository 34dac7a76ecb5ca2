/*
 * decode.c - turning wire requests into validated struct dm_req, reading
 * their dmio_buffer and iovec arrays from the client.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dmint.h"

/* Byte offsets in struct dmio_usrreq / dmio_buffer; requests arrive as a
 * byte stream, possibly unaligned, so fields are copied out, not cast. */
#define W_OUT_IOV	0
#define W_OUT_CNT	8
#define W_IMM		16
#define W_INBUF		24
#define W_ID		32
#define W_SIZE		40
#define B_IOV		0
#define B_CNT		8
#define B_SIZE		16

_Static_assert(offsetof(struct dmio_usrreq, req_outbuf.dmbuf_iov) == W_OUT_IOV, "wire");
_Static_assert(offsetof(struct dmio_usrreq, req_outbuf.dmbuf_iovcnt) == W_OUT_CNT, "wire");
_Static_assert(offsetof(struct dmio_usrreq, req_immediate) == W_IMM, "wire");
_Static_assert(offsetof(struct dmio_usrreq, req_inbuf) == W_INBUF, "wire");
_Static_assert(offsetof(struct dmio_usrreq, req_id) == W_ID, "wire");
_Static_assert(sizeof(struct dmio_usrreq) == W_SIZE, "wire");
_Static_assert(offsetof(dmio_buffer, dmbuf_iovcnt) == B_CNT, "wire");
_Static_assert(sizeof(dmio_buffer) == B_SIZE, "wire");
_Static_assert(sizeof(struct iovec) == 16, "iovec arrays are copied verbatim");

static uint64_t
get64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static uint32_t
get32(const unsigned char *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

/* Sum of a list's lengths; EINVAL beyond SSIZE_MAX (never overflows). */
static int
list_total(const struct dm_list *l, uint64_t *total)
{
	uint64_t sum = 0;

	for (uint32_t i = 0; i < l->cnt; i++) {
		uint64_t len = l->iov[i].iov_len;

		if (len > (uint64_t)SSIZE_MAX - sum)
			return EINVAL;
		sum += len;
	}
	*total = sum;
	return 0;
}

static int
ival_cmp(const void *a, const void *b)
{
	const struct dm_ival *x = a, *y = b;

	return (x->lo > y->lo) - (x->lo < y->lo);
}

/* [lo, hi] of a non-empty segment, hi saturated: a wrapping segment reaches
 * the top (inclusive, so that the last byte of the address space counts). */
static struct dm_ival
seg_ival(const struct iovec *v)
{
	uint64_t lo = (uintptr_t)v->iov_base;
	uint64_t hi = v->iov_len - 1 > UINT64_MAX - lo ? UINT64_MAX : lo + (v->iov_len - 1);

	return (struct dm_ival){ lo, hi };
}

/*
 * Does any input byte lie in the output?  The output's segments are
 * sorted and merged into disjoint intervals, then each input segment is
 * looked up by binary search: O((n + m) log n) for n output and m input
 * segments (up to 1024 x 16 of them).
 */
static bool
overlaps(struct dm_exec *x, const struct dm_req *r, int nin)
{
	struct dm_ival *iv = x->ival;
	size_t n = 0, m = 0;

	for (uint32_t i = 0; i < r->out.cnt; i++)
		if (r->out.iov[i].iov_len > 0)
			iv[n++] = seg_ival(&r->out.iov[i]);
	if (n == 0)
		return false;
	qsort(iv, n, sizeof(iv[0]), ival_cmp);
	for (size_t i = 1; i < n; i++) {
		if (iv[i].lo <= iv[m].hi) {
			if (iv[i].hi > iv[m].hi)
				iv[m].hi = iv[i].hi;
		} else
			iv[++m] = iv[i];
	}
	m++;
	/* Disjoint and sorted by lo, so sorted by hi as well. */
	for (int i = 0; i < nin; i++)
		for (uint32_t j = 0; j < r->in[i].cnt; j++) {
			const struct iovec *v = &r->in[i].iov[j];
			struct dm_ival s;
			size_t a = 0, b = m;

			if (v->iov_len == 0)
				continue;
			s = seg_ival(v);
			while (a < b) {	/* first interval ending at or after s.lo */
				size_t mid = a + (b - a) / 2;

				if (iv[mid].hi < s.lo)
					a = mid + 1;
				else
					b = mid;
			}
			if (a < m && iv[a].lo <= s.hi)
				return true;
		}
	return false;
}

/* Lengths, equal totals, no overlap: the rules every request obeys. */
static int
validate(struct dm_exec *x, struct dm_req *r, int nin)
{
	uint64_t out_total = 0, in_total = 0;

	if (list_total(&r->out, &out_total) != 0)
		return EINVAL;
	for (int i = 0; i < nin; i++) {
		if (list_total(&r->in[i], &in_total) != 0)
			return EINVAL;
		/* Without an output, input 0 sets the size the others must have. */
		if (i == 0 && r->out.cnt == 0)
			out_total = in_total;
		else if (in_total != out_total)
			return EINVAL;
	}
	r->total = out_total;
	if (r->out.cnt > 0 && nin > 0 && overlaps(x, r, nin))
		return EINVAL;
	return 0;
}

size_t
dm_decode_max(const struct dm_func *fn)
{
	return IOV_MAX / (1 + (size_t)fn->ninputs);
}

/* Bytes of iovec arrays copied into r. */
static size_t
array_bytes(const struct dm_req *r)
{
	size_t n = r->out.cnt;

	for (int i = 0; i < r->fn->ninputs; i++)
		n += r->in[i].cnt;
	return n * sizeof(struct iovec);
}

/* The same for a request still in wire form (w) with its dmio_buffers (inb);
 * counts are not yet validated, so the sum is saturated. */
static size_t
wire_array_bytes(const struct dm_func *fn, const unsigned char *w, const unsigned char *inb)
{
	uint64_t n = get32(w + W_OUT_CNT);

	for (int i = 0; i < fn->ninputs; i++)
		n += get32(inb + i * B_SIZE + B_CNT);
	return n > SIZE_MAX / sizeof(struct iovec) ? SIZE_MAX : (size_t)n * sizeof(struct iovec);
}

static void
free_from(dm_core *c, struct dm_req **reqs, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		dm_req_free(c, reqs[i]);
}

/*
 * Allocate request i of the window from its wire form and the counts of
 * its dmio_buffers (in x->inbufs), and queue the reading of its iovec
 * arrays: remote x->rem[*nrem..], local x->loc[*nloc].  0 or an errno.
 */
static int
prepare(struct dm_exec *x, dm_sess *s, const struct dm_func *fn, int func, const unsigned char *w,
    const unsigned char *inb, struct dm_req **out, size_t *nloc, size_t *nrem)
{
	dm_core *c = s->core;
	int nin = fn->ninputs;
	uint32_t cnt[1 + DM_MAX_INPUTS];
	uint64_t where[1 + DM_MAX_INPUTS];
	size_t ncopy, head, size;
	struct dm_req *r;
	struct iovec *iov;

	cnt[0] = get32(w + W_OUT_CNT);
	where[0] = get64(w + W_OUT_IOV);
	ncopy = cnt[0];
	for (int i = 0; i < nin; i++) {
		cnt[1 + i] = get32(inb + i * B_SIZE + B_CNT);
		where[1 + i] = get64(inb + i * B_SIZE + B_IOV);
		if (cnt[1 + i] == 0 || cnt[1 + i] > IOV_MAX)
			return EINVAL;
		ncopy += cnt[1 + i];
	}

	head = offsetof(struct dm_req, in) + (size_t)nin * sizeof(struct dm_list);
	size = head + ncopy * sizeof(struct iovec);
	if (dm_core_meta_reserve(c, s->user, size) != 0)
		return EAGAIN;
	if ((r = malloc(size)) == NULL) {
		dm_core_meta_release(c, s->user, size);
		return ENOMEM;
	}

	r->next = r->xprev = r->xnext = NULL;
	r->shared = NULL;
	r->sess = s;
	r->peer = x->peer;
	dm_peer_ref(r->peer);
	r->fn = fn;
	r->func = func;
	r->id = get32(w + W_ID);
	memcpy(r->imm, w + W_IMM, DM_IMM);
	r->size = size;
	r->done = 0;
	/* head is a multiple of 8 (struct dm_list is 16 bytes): iovecs align. */
	iov = (struct iovec *)((char *)r + head);
	if (ncopy > 0) {
		x->loc[*nloc].iov_base = iov;
		x->loc[*nloc].iov_len = ncopy * sizeof(*iov);
		(*nloc)++;
	}
	for (int i = 0; i <= nin; i++) {
		struct dm_list *l = i == 0 ? &r->out : &r->in[i - 1];

		l->iov = iov;
		l->cnt = cnt[i];
		iov += cnt[i];
		if (cnt[i] > 0) {
			x->rem[*nrem].iov_base = (void *)(uintptr_t)where[i];
			x->rem[*nrem].iov_len = cnt[i] * sizeof(struct iovec);
			(*nrem)++;
		}
	}
	*out = r;
	return 0;
}

/*
 * The requests of a window are decoded together, each step for all of
 * them, so that the client is read with two syscalls for the lot: one for
 * the dmio_buffer arrays, one for every iovec array.  A step that fails
 * for request i truncates the window at i; i's error is the one reported
 * (requests are judged in order, each by the first rule it breaks).
 */
size_t
dm_decode(struct dm_exec *x, dm_sess *s, const struct dm_func *fn, int func,
    const unsigned char *wire, size_t n, struct dm_req **out, int *err)
{
	dm_core *c = s->core;
	size_t each = (size_t)fn->ninputs * B_SIZE;
	size_t lim = n, nloc = 0, nrem = 0, bytes = 0, got;
	int e = 0;

	for (size_t i = 0; i < lim; i++)
		if (get32(wire + i * W_SIZE + W_OUT_CNT) > IOV_MAX) {
			lim = i;
			e = EINVAL;
		}

	if (each > 0 && lim > 0) {
		int re;

		for (size_t i = 0; i < lim; i++) {
			x->rem[i].iov_base = (void *)(uintptr_t)get64(wire + i * W_SIZE + W_INBUF);
			x->rem[i].iov_len = each;
		}
		x->loc[0].iov_base = x->inbufs;
		x->loc[0].iov_len = lim * each;
		if ((re = dm_readv(x, x->peer, 1, lim, lim * each, &got)) != 0) {
			lim = got / each;
			e = re;
		}
	}

	for (size_t i = 0; i < lim; i++) {
		int pe;

		/* The step's budget: the first request always, others while they fit. */
		if (i > 0 && wire_array_bytes(fn, wire + i * W_SIZE, x->inbufs + i * each) >
		    x->decode_left - (bytes < x->decode_left ? bytes : x->decode_left)) {
			lim = i;
			break;
		}
		pe = prepare(x, s, fn, func, wire + i * W_SIZE, x->inbufs + i * each, &out[i], &nloc, &nrem);
		if (pe != 0) {
			lim = i;
			e = pe;
		} else
			bytes += array_bytes(out[i]);
	}
	x->decode_left -= bytes < x->decode_left ? bytes : x->decode_left;

	if (bytes > 0) {
		int re = dm_readv(x, x->peer, nloc, nrem, bytes, &got);

		if (re != 0) {
			/* The first request not read whole holds the bad address. */
			size_t i = 0, end = array_bytes(out[0]);

			while (end <= got)
				end += array_bytes(out[++i]);
			free_from(c, out, i, lim);
			lim = i;
			e = re;
		}
	}

	for (size_t i = 0; i < lim; i++) {
		struct dm_req *r = out[i];
		int nops = fn->ninputs + (r->out.cnt > 0);

		if (validate(x, r, fn->ninputs) != 0) {
			free_from(c, out, i, lim);
			lim = i;
			e = EINVAL;
			break;
		}
		/* Function constraints are not validation errors: the request
		 * is accepted and fails on its own, as dmover(9) back-ends
		 * fail it. */
		r->err = fn->has_output != (r->out.cnt > 0) ? EINVAL : 0;
		if (r->err != 0)
			r->moved = 0;
		else if (__builtin_mul_overflow(r->total, (uint64_t)nops, &r->moved))
			r->moved = UINT64_MAX;
	}
	*err = lim < n ? e : 0;
	return lim;
}

void
dm_req_free(dm_core *c, struct dm_req *r)
{
	dm_shared_release(r);
	dm_peer_unref(r->peer);
	dm_core_meta_release(c, r->sess->user, r->size);
	free(r);
}
