/*
 * check.h - the one assertion of the C checks in spec/core/: print where
 * and what failed, exit non-zero (the spec that runs the program fails).
 * Each program prints "ok <name>" per group of checks it passed.
 */
#ifndef PH_CHECK_H
#define PH_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
		exit(1); \
	} \
} while (0)

#endif
