/*
 * shrun.c - running a request whose operands all lie in shared memory
 * (shared.c pointed its lists at the server's own mapping): plain memory
 * operations span by span, with no system call per transfer.  Requests of
 * PART_MIN bytes and more are cut into parts, on page boundaries, that idle
 * workers help with (parts.c); a part's CRC is joined to the ones before it
 * by the CRC's linearity, and compare keeps the first difference any part
 * found.  Each part runs under dm_fault_guard: a file truncated under it
 * fails the request with EFAULT.
 */
#include <errno.h>
#include <string.h>

#include "dmint.h"

#define PART_MIN	((uint64_t)4 << 20)	/* smaller requests run whole */
#define PART_BYTES	((uint64_t)4 << 20)	/* bytes per part of a split request */
#define MAX_PARTS	64
#define FILL_BLOCK	((size_t)64 << 10)	/* fill64: a multiple of 8 */
#define COPYCRC_BLOCK	((size_t)64 << 10)	/* copy, then CRC while in cache */
#define CRC32C_POLY	0x82F63B78u

enum op { OP_ZERO, OP_FILL, OP_FILL64, OP_COPY, OP_XOR, OP_CRC, OP_COMPARE, OP_COPY_CRC };

/* A request in parts: what each part needs and what it found. */
struct job {
	const struct dm_req *r;
	enum op op;
	uint8_t imm[DM_IMM];
	uint64_t from, to;		/* the slice of the request run: [from, to) */
	uint64_t part;			/* bytes per part (the last may be shorter) */
	size_t nparts;
	uint32_t raw[MAX_PARTS];	/* CRC register over each part (part 0 seeded) */
	uint64_t diff[MAX_PARTS];	/* compare: first difference, UINT64_MAX if none */
	int err[MAX_PARTS];
};

/* The operands of a request from one offset on, span by span. */
struct walk {
	struct dm_rcur out, in[DM_MAX_INPUTS];
	int nin;
	bool has_out;
};

static void
walk_init(struct walk *w, const struct dm_req *r, uint64_t from)
{
	w->nin = r->fn->ninputs;
	w->has_out = r->out.cnt > 0;
	dm_rcur_init(&w->out, r->out.iov, r->out.cnt);
	dm_rcur_skip(&w->out, from);
	for (int i = 0; i < w->nin; i++) {
		dm_rcur_init(&w->in[i], r->in[i].iov, r->in[i].cnt);
		dm_rcur_skip(&w->in[i], from);
	}
}

/* Room left in c's current segment, past empty ones; 0 at the end. */
static size_t
room(struct dm_rcur *c)
{
	while (c->idx < c->cnt && c->off == c->iov[c->idx].iov_len) {
		c->idx++;
		c->off = 0;
	}
	return c->idx < c->cnt ? c->iov[c->idx].iov_len - c->off : 0;
}

static uint8_t *
take_span(struct dm_rcur *c, size_t k)
{
	uint8_t *p = (uint8_t *)c->iov[c->idx].iov_base + c->off;

	c->off += k;
	return p;
}

/* The next span, at most max bytes, in every operand: its length (0 at the end). */
static size_t
walk_next(struct walk *w, size_t max, uint8_t **out, uint8_t **in)
{
	size_t k = max;

	if (w->has_out) {
		size_t m = room(&w->out);

		k = m < k ? m : k;
	}
	for (int i = 0; i < w->nin; i++) {
		size_t m = room(&w->in[i]);

		k = m < k ? m : k;
	}
	if (k == 0)
		return 0;
	if (w->has_out)
		*out = take_span(&w->out, k);
	for (int i = 0; i < w->nin; i++)
		in[i] = take_span(&w->in[i], k);
	return k;
}

/* dst[0..n) of the 8-byte pattern, dst standing at offset pos of the output. */
static void
fill_pattern(uint8_t *dst, const uint8_t imm[DM_IMM], uint64_t pos, size_t n)
{
	size_t have = n < DM_IMM ? n : DM_IMM;

	for (size_t i = 0; i < have; i++)
		dst[i] = imm[(pos + i) % DM_IMM];
	/* Repeat what is there: a whole number of periods keeps the phase, and
	 * blocks of at most FILL_BLOCK are read back from the cache. */
	while (have < n) {
		size_t k = have < n - have ? have : n - have;

		if (k > FILL_BLOCK)
			k = FILL_BLOCK;
		memcpy(dst + have, dst, k);
		have += k;
	}
}

/* dst = xor of src[0..nin), n bytes: in place when the kernel's alignment
 * holds, else through the context's buffers (memcpy, no syscall). */
static void
xor_span(struct dm_exec *x, uint8_t *dst, uint8_t **src, int nin, size_t n)
{
	const struct dm_kernels *k = &x->core->kern;
	uintptr_t bits = (uintptr_t)dst;

	for (int i = 0; i < nin; i++)
		bits |= (uintptr_t)src[i];
	if (bits % DM_ALIGN == 0) {
		k->xor(k, dst, src, nin, n);
		return;
	}
	for (size_t o = 0; o < n;) {
		size_t c = n - o < x->chunk ? n - o : x->chunk;

		for (int i = 0; i < nin; i++)
			memcpy(x->buf[i], src[i] + o, c);
		k->xor(k, x->buf[DM_MAX_INPUTS], x->buf, nin, c);
		memcpy(dst + o, x->buf[DM_MAX_INPUTS], c);
		o += c;
	}
}

/* Part p of job j, guarded; what it finds goes to j's slots for p. */
struct part_run {
	struct job *j;
	size_t p;
	struct dm_exec *x;
};

static int
run_range(void *arg)
{
	struct part_run *pr = arg;
	struct job *j = pr->j;
	struct dm_exec *x = pr->x;
	const struct dm_kernels *k = &x->core->kern;
	uint64_t from = j->from + (uint64_t)pr->p * j->part, to = from + j->part, pos = from;
	uint8_t *out = NULL, *in[DM_MAX_INPUTS];
	uint32_t raw = j->raw[pr->p];
	struct walk w;
	size_t n;

	if (to > j->to)
		to = j->to;
	walk_init(&w, j->r, from);
	while (pos < to && (n = walk_next(&w, (size_t)(to - pos), &out, in)) > 0) {
		switch (j->op) {
		case OP_ZERO:
			memset(out, 0, n);
			break;
		case OP_FILL:
			memset(out, j->imm[0], n);
			break;
		case OP_FILL64:
			fill_pattern(out, j->imm, pos, n);
			break;
		case OP_COPY:
			memmove(out, in[0], n);
			break;
		case OP_XOR:
			xor_span(x, out, in, w.nin, n);
			break;
		case OP_CRC:
			raw = k->crc(k, raw, in[0], n);
			break;
		case OP_COPY_CRC:
			for (size_t o = 0; o < n; o += COPYCRC_BLOCK) {
				size_t b = n - o < COPYCRC_BLOCK ? n - o : COPYCRC_BLOCK;

				memmove(out + o, in[0] + o, b);
				raw = k->crc(k, raw, out + o, b);
			}
			break;
		case OP_COMPARE:
			if (memcmp(in[0], in[1], n) != 0) {
				size_t i = 0;

				while (in[0][i] == in[1][i])
					i++;
				j->diff[pr->p] = pos + i;
				return 0;
			}
			break;
		}
		pos += n;
	}
	j->raw[pr->p] = raw;
	return pos == to ? 0 : EFAULT;	/* lists shorter than validated: never */
}

static void
run_part(void *arg, size_t p, struct dm_exec *x)
{
	struct job *j = arg;
	struct part_run pr = { j, p, x };

	j->err[p] = dm_fault_guard(run_range, &pr);
}

/* The operation of each built-in function's runner. */
static const struct {
	dm_run_fn *run;
	enum op op;
} ops[] = {
	{ dm_run_zero, OP_ZERO }, { dm_run_fill8, OP_FILL }, { dm_run_fill64, OP_FILL64 },
	{ dm_run_copy, OP_COPY }, { dm_run_xor, OP_XOR }, { dm_run_crc32c, OP_CRC },
	{ dm_run_compare, OP_COMPARE }, { dm_run_copy_crc32c, OP_COPY_CRC },
};

static enum op
op_of(const struct dm_func *fn)
{
	size_t i = 0;

	while (i + 1 < sizeof(ops) / sizeof(ops[0]) && ops[i].run != fn->run)
		i++;
	return ops[i].op;	/* every runner is listed: copy-crc32c is the last */
}

/* a * b in GF(2)[x] mod the CRC polynomial, bit-reflected (bit 31 is x^0). */
static uint32_t
gf_mul(uint32_t a, uint32_t b)
{
	uint32_t p = 0;

	for (int i = 0; i < 32; i++) {
		if (a & ((uint32_t)1 << (31 - i)))
			p ^= b;
		b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
	}
	return p;
}

/*
 * The raw register over A|B from the register over A and the one over B
 * (started at 0): CRCs are linear, so the first is advanced over |B| zero
 * bytes - multiplied by x^(8|B|) - and the second added.
 */
static uint32_t
crc_join(uint32_t a, uint32_t b, uint64_t blen)
{
	uint32_t power = (uint32_t)1 << 31, sq = (uint32_t)1 << 23;	/* 1, and x^8 */

	for (; blen > 0; blen >>= 1) {
		if (blen & 1)
			power = gf_mul(power, sq);
		sq = gf_mul(sq, sq);
	}
	return gf_mul(power, a) ^ b;
}

int
dm_shared_run(struct dm_exec *x, const struct dm_req *r, uint64_t from, uint64_t total, uint8_t imm[DM_IMM])
{
	dm_core *c = x->core;
	struct job j = { .r = r, .op = op_of(r->fn), .from = from, .to = from + total };
	int err;

	/* Only while the writer's address space is: an exited or exec'd writer
	 * has nothing registered any more. */
	if ((err = dm_peer_live(x, r->peer)) != 0)
		return err;
	memcpy(j.imm, imm, DM_IMM);
	j.nparts = 1;
	j.part = total;
	if (total >= PART_MIN && c->cfg.workers > 1 && c->parts != NULL) {
		j.nparts = (size_t)((total + PART_BYTES - 1) / PART_BYTES);
		if (j.nparts > MAX_PARTS)
			j.nparts = MAX_PARTS;
		/* Parts start on page boundaries, keeping the operands' alignment. */
		j.part = (total + j.nparts - 1) / j.nparts;
		j.part = (j.part + 4095) & ~(uint64_t)4095;
		j.nparts = (size_t)((total + j.part - 1) / j.part);
	}
	for (size_t p = 0; p < j.nparts; p++) {
		j.raw[p] = 0;
		j.diff[p] = UINT64_MAX;
	}
	j.raw[0] = dm_crc_seed(imm);
	if (j.nparts == 1)
		run_part(&j, 0, x);
	else
		dm_parts_run(c->parts, run_part, &j, j.nparts, x);
	if (from == 0)
		atomic_fetch_add(&c->shared_runs, 1);	/* requests, not slices */
	for (size_t p = 0; p < j.nparts; p++)
		if (j.err[p] != 0)
			return j.err[p];
	if (j.op == OP_CRC || j.op == OP_COPY_CRC) {
		uint32_t raw = j.raw[0];

		for (size_t p = 1; p < j.nparts; p++) {
			uint64_t len = p + 1 < j.nparts ? j.part : total - p * j.part;

			raw = crc_join(raw, j.raw[p], len);
		}
		dm_put_le(imm, (uint32_t)~raw);
	} else if (j.op == OP_COMPARE) {
		uint64_t first = UINT64_MAX;

		for (size_t p = 0; p < j.nparts; p++)
			first = j.diff[p] < first ? j.diff[p] : first;
		if (first != UINT64_MAX) {
			dm_put_le(imm, first);
			return DM_DONE;
		}
		if (j.to == r->total)
			memset(imm, 0xff, DM_IMM);	/* equal */
	}
	return 0;
}
