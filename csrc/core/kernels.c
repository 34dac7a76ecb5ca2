/*
 * kernels.c - CRC32C and XOR kernels, chosen when the core is created:
 * ISA-L when libisal.so.2 can be loaded (no link-time dependency), else
 * SSE4.2 for the CRC, else portable C.
 *
 * Every CRC kernel advances the raw register (no pre- or post-inversion);
 * exec.c inverts once per request, which is what makes chaining work.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "dmint.h"

#define CRC32C_POLY	0x82F63B78u	/* Castagnoli, reflected */
#define CRC32C_CHECK	0xE3069283u	/* CRC32C("123456789") */
#define DM_CRC_LANE	2048		/* bytes per lane of the 3-lane SSE4.2 loop */
#define ISAL_PIECE	((size_t)1 << 30)	/* crc32_iscsi takes an int length */
#define XOR_BLOCK	256		/* words per block of the portable XOR (2 KiB) */

static uint32_t
crc_portable(const struct dm_kernels *k, uint32_t crc, const uint8_t *p, size_t n)
{
	const uint32_t (*t)[256] = k->slice;

	for (; n >= 8; n -= 8, p += 8) {
		uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
		    (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
		uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 |
		    (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;

		crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^
		    t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
		    t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^
		    t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
	}
	for (; n > 0; n--)
		crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

/* The raw register advanced over DM_CRC_LANE zero bytes (a linear map). */
static inline uint32_t
crc_shift(const struct dm_kernels *k, uint32_t s)
{
	return k->shift[0][s & 0xff] ^ k->shift[1][(s >> 8) & 0xff] ^
	    k->shift[2][(s >> 16) & 0xff] ^ k->shift[3][s >> 24];
}

static void
crc_tables(struct dm_kernels *k)
{
	uint32_t basis[32];

	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;

		for (int b = 0; b < 8; b++)
			c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
		k->slice[0][n] = c;
	}
	for (int t = 1; t < 8; t++)
		for (int n = 0; n < 256; n++) {
			uint32_t c = k->slice[t - 1][n];

			k->slice[t][n] = (c >> 8) ^ k->slice[0][c & 0xff];
		}

	/* Image of each register bit after DM_CRC_LANE zero bytes, then byte tables. */
	for (int b = 0; b < 32; b++) {
		uint32_t c = (uint32_t)1 << b;

		for (int i = 0; i < DM_CRC_LANE; i++)
			c = k->slice[0][c & 0xff] ^ (c >> 8);
		basis[b] = c;
	}
	for (int t = 0; t < 4; t++)
		for (int n = 0; n < 256; n++) {
			uint32_t c = 0;

			for (int b = 0; b < 8; b++)
				if (n & (1 << b))
					c ^= basis[8 * t + b];
			k->shift[t][n] = c;
		}
}

#if defined(__x86_64__)
#include <nmmintrin.h>

static inline uint64_t
load64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

__attribute__((target("sse4.2"))) static uint32_t
crc_sse42(const struct dm_kernels *k, uint32_t crc, const uint8_t *p, size_t n)
{
	uint64_t a;

	/*
	 * crc32 has a latency of 3 cycles and a throughput of 1: three
	 * independent lanes keep it busy.  The lanes are joined by linearity:
	 * crc(s, A|B) = shift_|B|(crc(s, A)) ^ crc(0, B).
	 */
	for (; n >= 3 * DM_CRC_LANE; n -= 3 * DM_CRC_LANE, p += 3 * DM_CRC_LANE) {
		uint64_t b = 0, c = 0;

		a = crc;
		for (size_t i = 0; i < DM_CRC_LANE; i += 8) {
			a = _mm_crc32_u64(a, load64(p + i));
			b = _mm_crc32_u64(b, load64(p + DM_CRC_LANE + i));
			c = _mm_crc32_u64(c, load64(p + 2 * DM_CRC_LANE + i));
		}
		crc = crc_shift(k, crc_shift(k, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
	}
	a = crc;
	for (; n >= 8; n -= 8, p += 8)
		a = _mm_crc32_u64(a, load64(p));
	crc = (uint32_t)a;
	for (; n > 0; n--)
		crc = _mm_crc32_u8(crc, *p++);
	return crc;
}
#endif

/* ISA-L's crc32_iscsi(buf, len, init) advances the raw register too: the
 * standard CRC32C of buf with seed s is ~crc32_iscsi(buf, len, ~s). */
static uint32_t
crc_isal(const struct dm_kernels *k, uint32_t crc, const uint8_t *p, size_t n)
{
	while (n > 0) {
		size_t m = n < ISAL_PIECE ? n : ISAL_PIECE;

		crc = k->isal_crc((unsigned char *)p, (int)m, crc);
		p += m;
		n -= m;
	}
	return crc;
}

/*
 * Word loops over the bounce buffers (allocated storage only ever accessed
 * here as words or as bytes).  restrict on the parameters spares run-time
 * alias checks, and -O2 only vectorises loops whose trip count is a known
 * multiple of the vector length, hence the constant XOR_BLOCK below.
 */
static inline void
xor_words(uint64_t *restrict d, const uint64_t *restrict a, const uint64_t *restrict b, size_t cnt)
{
	for (size_t i = 0; i < cnt; i++)
		d[i] = a[i] ^ b[i];
}

static inline void
xor_into(uint64_t *restrict d, const uint64_t *restrict s, size_t cnt)
{
	for (size_t i = 0; i < cnt; i++)
		d[i] ^= s[i];
}

static inline const uint64_t *
words_at(const uint8_t *p, size_t w)
{
	return (const uint64_t *)(const void *)p + w;
}

/* dst = xor of the nsrc sources over cnt words from word w. */
static inline __attribute__((always_inline)) void
xor_block(uint8_t *dst, uint8_t *const *src, int nsrc, size_t w, size_t cnt)
{
	uint64_t *d = (uint64_t *)(void *)dst + w;

	xor_words(d, words_at(src[0], w), words_at(src[1], w), cnt);
	for (int j = 2; j < nsrc; j++)
		xor_into(d, words_at(src[j], w), cnt);
}

static void
xor_portable(const struct dm_kernels *k, uint8_t *dst, uint8_t *const *src, int nsrc, size_t n)
{
	size_t words = n / 8, w = 0;

	/* Block by block, so that the block of dst stays in L1 while every
	 * source is folded into it. */
	for (; words - w >= XOR_BLOCK; w += XOR_BLOCK)
		xor_block(dst, src, nsrc, w, XOR_BLOCK);
	if (w < words)
		xor_block(dst, src, nsrc, w, words - w);
	for (size_t i = words * 8; i < n; i++) {
		uint8_t v = src[0][i];

		for (int j = 1; j < nsrc; j++)
			v ^= src[j][i];
		dst[i] = v;
	}
}

static void
xor_isal(const struct dm_kernels *k, uint8_t *dst, uint8_t *const *src, int nsrc, size_t n)
{
	/* ISA-L's vector loops want 32-byte aligned pointers and lengths. */
	size_t body = n & ~(size_t)31;
	uint8_t *tail[DM_MAX_INPUTS];

	if (body > 0) {
		void *v[DM_MAX_INPUTS + 1];

		memcpy(v, src, (size_t)nsrc * sizeof(v[0]));
		v[nsrc] = dst;
		if (k->isal_xor(nsrc + 1, (int)body, v) != 0)
			body = 0;
	}
	if (body == n)
		return;
	for (int j = 0; j < nsrc; j++)
		tail[j] = src[j] + body;
	xor_portable(k, dst + body, tail, nsrc, n - body);
}

static void
load_isal(struct dm_kernels *k, const char **crc, const char **xor)
{
	static const uint8_t check[] = "123456789";
	void *c, *x;

	k->isal = dlopen("libisal.so.2", RTLD_NOW | RTLD_LOCAL);
	if (k->isal == NULL)
		return;
	c = dlsym(k->isal, "crc32_iscsi");
	x = dlsym(k->isal, "xor_gen");
	if (c != NULL) {
		k->isal_crc = (unsigned (*)(unsigned char *, int, unsigned))c;
		/* Trust the convention above only if this build agrees with it. */
		if (~crc_isal(k, ~0u, check, 9) == CRC32C_CHECK) {
			k->crc = crc_isal;
			*crc = "isa-l";
		}
	}
	if (x != NULL) {
		k->isal_xor = (int (*)(int, int, void **))x;
		k->xor = xor_isal;
		*xor = "isa-l";
	}
	if (k->crc != crc_isal && k->xor != xor_isal) {
		dlclose(k->isal);
		k->isal = NULL;
	}
}

int
dm_kernels_init(struct dm_kernels *k, const char *mode)
{
	const char *crc = "portable", *xor = "portable";
	bool isal, sse;

	if (mode == NULL || *mode == '\0' || strcmp(mode, "auto") == 0)
		isal = sse = true;
	else if (strcmp(mode, "sse4.2") == 0) {
		isal = false;
		sse = true;
	} else if (strcmp(mode, "portable") == 0)
		isal = sse = false;
	else
		return EINVAL;

	memset(k, 0, sizeof(*k));
	crc_tables(k);
	k->crc = crc_portable;
	k->xor = xor_portable;
#if defined(__x86_64__)
	__builtin_cpu_init();
	if (sse && __builtin_cpu_supports("sse4.2")) {
		k->crc = crc_sse42;
		crc = "sse4.2";
	}
#else
	(void)sse;
#endif
	if (isal)
		load_isal(k, &crc, &xor);
	snprintf(k->name, sizeof(k->name), "crc32c=%s xor=%s", crc, xor);
	return 0;
}

void
dm_kernels_fini(struct dm_kernels *k)
{
	if (k->isal != NULL)
		dlclose(k->isal);
	k->isal = NULL;
}
