/*
 * funcs.c - the function table.  Indices are part of the API: append new
 * functions at the end, never reorder.
 */
#include <string.h>

#include "dmint.h"

#define XOR(n) { "xor" #n, n, true, dm_run_xor }

static const struct dm_func funcs[] = {
	{ "zero", 0, true, dm_run_zero },
	{ "fill8", 0, true, dm_run_fill8 },
	{ "copy", 1, true, dm_run_copy },
	XOR(2), XOR(3), XOR(4), XOR(5), XOR(6), XOR(7), XOR(8), XOR(9),
	XOR(10), XOR(11), XOR(12), XOR(13), XOR(14), XOR(15), XOR(16),
	{ "iscsi-crc32c", 1, false, dm_run_crc32c },
	/* Extensions: the same one-output / N-inputs / immediate model. */
	{ "fill64", 0, true, dm_run_fill64 },
	{ "compare", 2, false, dm_run_compare },
	{ "copy-crc32c", 1, true, dm_run_copy_crc32c },
};

_Static_assert(sizeof(funcs) / sizeof(funcs[0]) == DM_NFUNCS, "DM_NFUNCS is the table size");

const struct dm_func *
dm_func_get(int func)
{
	if (func < 0 || func >= DM_NFUNCS)
		return NULL;
	return &funcs[func];
}

int
dm_func_count(void)
{
	return DM_NFUNCS;
}

const char *
dm_func_name(int func)
{
	const struct dm_func *f = dm_func_get(func);

	return f != NULL ? f->name : NULL;
}

int
dm_func_ninputs(int func)
{
	const struct dm_func *f = dm_func_get(func);

	return f != NULL ? f->ninputs : -1;
}

int
dm_func_has_output(int func)
{
	const struct dm_func *f = dm_func_get(func);

	return f != NULL ? f->has_output : -1;
}

int
dm_func_lookup(const char *name)
{
	if (name == NULL)
		return -1;
	for (int i = 0; i < DM_NFUNCS; i++)
		if (strcmp(funcs[i].name, name) == 0)
			return i;
	return -1;
}
