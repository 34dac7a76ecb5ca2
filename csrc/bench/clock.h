/*
 * clock.h - the one clock of the benchmark's C programs.
 */
#ifndef DMOVERFS_BENCH_CLOCK_H
#define DMOVERFS_BENCH_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Nanoseconds of CLOCK_MONOTONIC: what every timed part is measured with. */
static inline uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#endif
