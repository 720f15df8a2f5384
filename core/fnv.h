/*
 * fnv.h - FNV-1a (64 bit), the one hash of projhost's C: script versions
 * (core.hash, stored in checkpoints), the work queue's buckets, the
 * prepared-statement cache and the master's projection signature. Fast
 * and spread well over short keys; not a security boundary.
 */
#ifndef PH_FNV_H
#define PH_FNV_H

#include <stddef.h>
#include <stdint.h>

#define PH_FNV_OFFSET 14695981039346656037ULL
#define PH_FNV_PRIME 1099511628211ULL

/**
 * ph_fnv1a() - hash @n bytes at @p, continuing from @h (PH_FNV_OFFSET to start).
 */
static inline uint64_t ph_fnv1a(uint64_t h, const void *p, size_t n)
{
	const unsigned char *s = p;

	for (size_t i = 0; i < n; i++) {
		h ^= s[i];
		h *= PH_FNV_PRIME;
	}
	return h;
}

/**
 * ph_fnv1a_str() - ph_fnv1a() of the NUL-terminated @s.
 */
static inline uint64_t ph_fnv1a_str(uint64_t h, const char *s)
{
	for (; *s; s++) {
		h ^= (unsigned char)*s;
		h *= PH_FNV_PRIME;
	}
	return h;
}

#endif
