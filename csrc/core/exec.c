/*
 * exec.c - running one request through a context's bounce buffers.  Memory
 * use is fixed per context whatever the request size: data moves chunk by
 * chunk, each operand's scatter/gather list walked by its own cursor.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dmint.h"

struct dm_exec *
dm_exec_new(dm_core *core, size_t chunk)
{
	struct dm_exec *x = calloc(1, sizeof(*x));

	if (x == NULL)
		return NULL;
	x->core = core;
	x->chunk = chunk;
	if (chunk == 0)		/* transfers only (dm_req_read/write): no bounce buffers */
		return x;
	/* chunk is a multiple of DM_ALIGN, at most DM_CHUNK_MAX: no overflow. */
	x->mem = aligned_alloc(DM_ALIGN, DM_NBUF * chunk);
	if (x->mem == NULL) {
		free(x);
		return NULL;
	}
	for (int i = 0; i < DM_NBUF; i++)
		x->buf[i] = (uint8_t *)x->mem + (size_t)i * chunk;
	return x;
}

void
dm_exec_free(struct dm_exec *x)
{
	if (x == NULL)
		return;
	free(x->mem);
	free(x);
}

/* A response: the immediate echoed (or as run left it) on success, zeros on error. */
static void
set_resp(struct dmio_usrresp *resp, uint32_t id, int err, const uint8_t imm[DM_IMM])
{
	resp->resp_id = id;
	resp->resp_error = err;
	if (err == 0)
		memcpy(resp->resp_immediate, imm, DM_IMM);
	else
		memset(resp->resp_immediate, 0, DM_IMM);
}

/* Count time since t0 and bytes run into the built-in back-end's load. */
static void
add_busy(struct dm_exec *x, const struct timespec *t0, uint64_t bytes)
{
	struct timespec t1;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	atomic_fetch_add(&x->core->busy_ns, (uint64_t)((t1.tv_sec - t0->tv_sec) * 1000000000LL +
	    (t1.tv_nsec - t0->tv_nsec)));
	atomic_fetch_add(&x->core->run_bytes, bytes);
}

/* Run bytes [from, from + len) of r with imm; 0, an errno or DM_DONE. */
static int
run_range(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	struct timespec t0;
	int err;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	err = r->shared != NULL ? dm_shared_run(x, r, from, len, imm) : r->fn->run(x, r, from, len, imm);
	add_busy(x, &t0, len);
	return err;
}

void
dm_exec_run(struct dm_exec *x, const struct dm_req *r, struct dmio_usrresp *resp)
{
	uint8_t imm[DM_IMM];
	int err = r->err;

	/* By default the immediate is echoed, as NetBSD hands back dreq_immediate. */
	memcpy(imm, r->imm, DM_IMM);
	if (err == 0)
		err = run_range(x, r, 0, r->total, imm);
	set_resp(resp, r->id, err == DM_DONE ? 0 : err, imm);
}

bool
dm_exec_slice(struct dm_exec *x, struct dm_req *r, uint64_t max, struct dmio_usrresp *resp)
{
	uint64_t left = r->total - r->done;
	uint64_t len;
	int err = r->err;

	/* Shared memory moves several times faster than through the bounce
	 * buffers: its slices are longer for about the same time on a worker. */
	if (r->shared != NULL && max <= UINT64_MAX / DM_SHARED_SLICES)
		max *= DM_SHARED_SLICES;
	len = max != 0 && left > max ? max : left;

	if (err == 0) {
		err = run_range(x, r, r->done, len, r->imm);
		r->done += len;
		if (err == 0 && r->done < r->total)
			return false;
	}
	set_resp(resp, r->id, err == DM_DONE ? 0 : err, r->imm);
	return true;
}

/* A cursor on list l, from bytes on. */
static void
cursor_at(struct dm_rcur *c, const struct dm_list *l, uint64_t from)
{
	dm_rcur_init(c, l->iov, l->cnt);
	if (from > 0)
		dm_rcur_skip(c, from);
}

int
dm_run_zero(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	struct dm_rcur out;

	cursor_at(&out, &r->out, from);
	return dm_put(x, r->peer, &out, x->core->zeros, x->chunk, len);
}

/* Zero requests (without a constraint error) share process_vm_writev calls. */
static bool
batchable(const struct dm_req *r)
{
	return r->fn->run == dm_run_zero && r->err == 0 && r->shared == NULL;
}

/*
 * Pack the leading batchable requests of r[0..n) into one process_vm_writev
 * from the zero page while the iovec and size limits allow; returns how
 * many went in (0 when r[0] cannot share a call: it then runs on its own).
 */
static size_t
pack_zeros(struct dm_exec *x, struct dm_req *const *r, size_t n, size_t *nloc, size_t *nrem,
    size_t *bytes)
{
	size_t k;

	*nloc = *nrem = *bytes = 0;
	for (k = 0; k < n; k++) {
		const struct dm_req *q = r[k];
		size_t pieces = (size_t)((q->total + x->chunk - 1) / x->chunk);

		if (!batchable(q) || *nrem + q->out.cnt > IOV_MAX || *nloc + pieces > IOV_MAX ||
		    q->total > DM_RW_MAX - *bytes)
			break;
		memcpy(&x->rem[*nrem], q->out.iov, q->out.cnt * sizeof(struct iovec));
		*nrem += q->out.cnt;
		for (uint64_t left = q->total; left > 0;) {
			size_t take = left < x->chunk ? (size_t)left : x->chunk;

			x->loc[*nloc].iov_base = (void *)x->core->zeros;
			x->loc[*nloc].iov_len = take;
			(*nloc)++;
			left -= take;
		}
		*bytes += (size_t)q->total;
	}
	return k;
}

void
dm_exec_run_batch(struct dm_exec *x, struct dm_req *const *r, size_t n, struct dmio_usrresp *resp)
{
	size_t i = 0;

	while (i < n) {
		size_t k, nloc, nrem, bytes, got, done = 0;
		uint64_t run = 0;	/* bytes of the requests tried, as dm_exec_run counts */
		struct timespec t0;
		int err;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		k = pack_zeros(x, r + i, n - i, &nloc, &nrem, &bytes);
		if (k == 0) {
			dm_exec_run(x, r[i], &resp[i]);
			i++;
			continue;
		}
		err = bytes > 0 ? dm_writev(x, r[i]->peer, nloc, nrem, bytes, &got) : 0;
		/* The kernel stops at the first byte it cannot write: the
		 * requests before that byte are done, the one holding it failed,
		 * the ones after it go in the next call. */
		for (size_t j = i; j < i + k; j++) {
			run += r[j]->total;
			if (err != 0 && done + r[j]->total > got) {
				set_resp(&resp[j], r[j]->id, err, r[j]->imm);
				k = j + 1 - i;
				break;
			}
			done += (size_t)r[j]->total;
			set_resp(&resp[j], r[j]->id, 0, r[j]->imm);
		}
		add_busy(x, &t0, run);
		i += k;
	}
}

int
dm_run_fill8(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	struct dm_rcur out;
	size_t unit = len < x->chunk ? (size_t)len : x->chunk;

	memset(x->buf[0], imm[0], unit);
	cursor_at(&out, &r->out, from);
	return dm_put(x, r->peer, &out, x->buf[0], unit, len);
}

/* Work on one chunk of k bytes gathered into x->buf[0..nin); returns the
 * bytes to write to the output, or NULL when the function has none. */
typedef const uint8_t *dm_chunk_fn(struct dm_exec *x, int nin, size_t k, void *state);

static int
stream(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, dm_chunk_fn *fn,
    void *state)
{
	struct dm_peer *p = r->peer;
	struct dm_rcur in[DM_MAX_INPUTS], out;
	int nin = r->fn->ninputs;

	for (int i = 0; i < nin; i++)
		cursor_at(&in[i], &r->in[i], from);
	cursor_at(&out, &r->out, from);
	for (uint64_t done = 0; done < len;) {
		size_t k = len - done < x->chunk ? (size_t)(len - done) : x->chunk;
		const uint8_t *res;
		int err = dm_gather(x, p, in, x->buf, nin, k);

		if (err != 0)
			return err;
		res = fn(x, nin, k, state);
		if (res != NULL && (err = dm_put(x, p, &out, res, k, k)) != 0)
			return err;
		done += k;
	}
	return 0;
}

static const uint8_t *
copy_chunk(struct dm_exec *x, int nin, size_t k, void *state)
{
	return x->buf[0];
}

int
dm_run_copy(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	return stream(x, r, from, len, copy_chunk, NULL);
}

static const uint8_t *
xor_chunk(struct dm_exec *x, int nin, size_t k, void *state)
{
	const struct dm_kernels *kern = &x->core->kern;
	uint8_t *dst = x->buf[DM_MAX_INPUTS];

	kern->xor(kern, dst, x->buf, nin, k);
	return dst;
}

int
dm_run_xor(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	return stream(x, r, from, len, xor_chunk, NULL);
}

static const uint8_t *
crc_chunk(struct dm_exec *x, int nin, size_t k, void *state)
{
	const struct dm_kernels *kern = &x->core->kern;
	uint32_t *raw = state;

	*raw = kern->crc(kern, *raw, x->buf[0], k);
	return NULL;
}

int
dm_run_crc32c(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	uint32_t raw = dm_crc_seed(imm);
	int err = stream(x, r, from, len, crc_chunk, &raw);

	if (err == 0)
		dm_put_le(imm, (uint32_t)~raw);
	return err;
}

int
dm_run_fill64(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	struct dm_rcur out;
	size_t unit = len < x->chunk ? (size_t)len : x->chunk;

	/* chunk, and so from, is a multiple of DM_ALIGN (64): repeating unit
	 * bytes from the pattern's start keeps the 8-byte phase. */
	for (size_t i = 0; i < unit; i += DM_IMM)
		memcpy(x->buf[0] + i, imm, unit - i < DM_IMM ? unit - i : DM_IMM);
	cursor_at(&out, &r->out, from);
	return dm_put(x, r->peer, &out, x->buf[0], unit, len);
}

int
dm_run_compare(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len, uint8_t imm[DM_IMM])
{
	struct dm_rcur in[2];

	cursor_at(&in[0], &r->in[0], from);
	cursor_at(&in[1], &r->in[1], from);
	for (uint64_t done = 0; done < len;) {
		size_t k = len - done < x->chunk ? (size_t)(len - done) : x->chunk;
		int err = dm_gather(x, r->peer, in, x->buf, 2, k);

		if (err != 0)
			return err;
		if (memcmp(x->buf[0], x->buf[1], k) != 0) {
			size_t i = 0;

			while (x->buf[0][i] == x->buf[1][i])
				i++;
			dm_put_le(imm, from + done + i);	/* offset of the first difference */
			return DM_DONE;
		}
		done += k;
	}
	if (from + len == r->total)
		memset(imm, 0xff, DM_IMM);	/* equal */
	return 0;
}

static const uint8_t *
copy_crc_chunk(struct dm_exec *x, int nin, size_t k, void *state)
{
	crc_chunk(x, nin, k, state);
	return x->buf[0];
}

int
dm_run_copy_crc32c(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t len,
    uint8_t imm[DM_IMM])
{
	uint32_t raw = dm_crc_seed(imm);
	int err = stream(x, r, from, len, copy_crc_chunk, &raw);

	if (err == 0)
		dm_put_le(imm, (uint32_t)~raw);
	return err;
}
