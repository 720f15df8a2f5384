/*
 * queue.c - work queue: hash table for merging + min-heap for valid_after.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fnv.h"
#include "queue.h"

static uint64_t hash_key(const char *k, size_t n)
{
	return ph_fnv1a(PH_FNV_OFFSET, k, n);
}

int ph_queue_init(struct ph_queue *q)
{
	memset(q, 0, sizeof(*q));
	q->nbuckets = 1024;
	q->buckets = calloc(q->nbuckets, sizeof(*q->buckets));
	return q->buckets ? 0 : -1;
}

void ph_queue_free(struct ph_queue *q)
{
	for (size_t i = 0; i < q->nbuckets; i++) {
		struct ph_qentry *e = q->buckets[i], *n;

		for (; e; e = n) {
			n = e->next;
			free(e->key);
			free(e);
		}
	}
	free(q->buckets);
	free(q->heap);
	memset(q, 0, sizeof(*q));
}

static int grow_buckets(struct ph_queue *q)
{
	size_t nb = q->nbuckets * 2;
	struct ph_qentry **b = calloc(nb, sizeof(*b));

	if (!b)
		return -1;
	for (size_t i = 0; i < q->nbuckets; i++) {
		struct ph_qentry *e = q->buckets[i], *n;

		for (; e; e = n) {
			size_t j = hash_key(e->key, e->keylen) & (nb - 1);

			n = e->next;
			e->next = b[j];
			b[j] = e;
		}
	}
	free(q->buckets);
	q->buckets = b;
	q->nbuckets = nb;
	return 0;
}

/* --- heap ordered by (valid_after, seq) --- */

static int before(const struct ph_qentry *a, const struct ph_qentry *b)
{
	return a->valid_after < b->valid_after ||
	       (a->valid_after == b->valid_after && a->seq < b->seq);
}

static void heap_set(struct ph_queue *q, size_t i, struct ph_qentry *e)
{
	q->heap[i] = e;
	e->heap_idx = i;
}

static void sift_up(struct ph_queue *q, size_t i)
{
	struct ph_qentry *e = q->heap[i];

	while (i > 0) {
		size_t p = (i - 1) / 2;

		if (!before(e, q->heap[p]))
			break;
		heap_set(q, i, q->heap[p]);
		i = p;
	}
	heap_set(q, i, e);
}

static void sift_down(struct ph_queue *q, size_t i)
{
	struct ph_qentry *e = q->heap[i];

	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		struct ph_qentry *best = e;

		if (l < q->heap_len && before(q->heap[l], best)) {
			m = l;
			best = q->heap[l];
		}
		if (r < q->heap_len && before(q->heap[r], best))
			m = r;
		if (m == i)
			break;
		heap_set(q, i, q->heap[m]);
		i = m;
	}
	heap_set(q, i, e);
}

static int heap_push(struct ph_queue *q, struct ph_qentry *e)
{
	if (q->heap_len == q->heap_cap) {
		size_t cap = q->heap_cap ? q->heap_cap * 2 : 256;
		struct ph_qentry **h = realloc(q->heap, cap * sizeof(*h));

		if (!h)
			return -1;
		q->heap = h;
		q->heap_cap = cap;
	}
	e->seq = q->seq++;
	heap_set(q, q->heap_len++, e);
	sift_up(q, e->heap_idx);
	return 0;
}

static void heap_remove(struct ph_queue *q, struct ph_qentry *e)
{
	size_t i = e->heap_idx;
	struct ph_qentry *last = q->heap[--q->heap_len];

	if (i == q->heap_len)
		return;
	heap_set(q, i, last);
	sift_up(q, i);
	sift_down(q, last->heap_idx);
}

/* A changed valid_after moves the entry within the heap. */
static void heap_update(struct ph_queue *q, struct ph_qentry *e)
{
	sift_up(q, e->heap_idx);
	sift_down(q, e->heap_idx);
}

/* --- public --- */

static struct ph_qentry *lookup(struct ph_queue *q, const char *key, size_t n, size_t *bucket)
{
	size_t b = hash_key(key, n) & (q->nbuckets - 1);

	*bucket = b;
	for (struct ph_qentry *e = q->buckets[b]; e; e = e->next)
		if (e->keylen == n && memcmp(e->key, key, n) == 0)
			return e;
	return NULL;
}

/* The key of (proj, part) in @buf, or in a malloc'd buffer when it does
 * not fit (stream names may be long); NULL when out of memory. */
static char *key_of(char *buf, size_t cap, const char *proj, const char *part, size_t *n)
{
	size_t a = strlen(proj), b = strlen(part);
	char *k = a + b + 2 <= cap ? buf : malloc(a + b + 2);

	if (k) {
		memcpy(k, proj, a + 1);
		memcpy(k + a + 1, part, b + 1);
	}
	*n = a + b + 2;
	return k;
}

static int wake_key(struct ph_queue *q, const char *key, size_t n, uint64_t valid_after, int hard);

int ph_queue_wake(struct ph_queue *q, const char *proj, const char *part,
		  uint64_t valid_after, int hard)
{
	char buf[1024], *key;
	size_t n;
	int r;

	key = key_of(buf, sizeof(buf), proj, part, &n);
	if (!key) {
		errno = ENOMEM;
		return -1;
	}
	r = wake_key(q, key, n, valid_after, hard);
	if (key != buf)
		free(key);
	return r;
}

static int wake_key(struct ph_queue *q, const char *key, size_t n, uint64_t valid_after, int hard)
{
	size_t b;
	struct ph_qentry *e;

	e = lookup(q, key, n, &b);
	if (e) {
		if (e->state == PH_Q_RUNNING) {
			e->dirty = 1;
			return 0;
		}
		/* Merge: the earlier time wins unless a retry delay is pending. */
		if (hard && (!e->hard || valid_after > e->valid_after)) {
			e->valid_after = valid_after;
			e->hard = 1;
			heap_update(q, e);
		} else if (!e->hard && valid_after < e->valid_after) {
			e->valid_after = valid_after;
			heap_update(q, e);
		}
		return 0;
	}
	if (q->count >= q->nbuckets && grow_buckets(q) == 0)
		b = hash_key(key, n) & (q->nbuckets - 1);
	e = calloc(1, sizeof(*e));
	if (!e)
		return -1;
	e->key = malloc(n);
	if (!e->key) {
		free(e);
		return -1;
	}
	memcpy(e->key, key, n);
	e->keylen = n;
	e->valid_after = valid_after;
	e->hard = hard;
	e->state = PH_Q_WAITING;
	if (heap_push(q, e) != 0) {
		free(e->key);
		free(e);
		return -1;
	}
	e->next = q->buckets[b];
	q->buckets[b] = e;
	q->count++;
	return 0;
}

struct ph_qentry *ph_queue_peek(struct ph_queue *q, uint64_t now)
{
	return q->heap_len && q->heap[0]->valid_after <= now ? q->heap[0] : NULL;
}

struct ph_qentry *ph_queue_pop(struct ph_queue *q, uint64_t now)
{
	struct ph_qentry *e;

	if (!q->heap_len || q->heap[0]->valid_after > now)
		return NULL;
	e = q->heap[0];
	heap_remove(q, e);
	e->state = PH_Q_RUNNING;
	e->dirty = 0;
	e->hard = 0;
	q->running++;
	return e;
}

static void unlink_entry(struct ph_queue *q, struct ph_qentry *e)
{
	size_t b;
	struct ph_qentry **pp;

	lookup(q, e->key, e->keylen, &b);
	for (pp = &q->buckets[b]; *pp; pp = &(*pp)->next) {
		if (*pp == e) {
			*pp = e->next;
			break;
		}
	}
	q->count--;
	free(e->key);
	free(e);
}

void ph_queue_done(struct ph_queue *q, struct ph_qentry *e, uint64_t requeue_at, int hard)
{
	q->running--;
	if (e->dirty && !hard)
		requeue_at = 0;
	if (requeue_at == UINT64_MAX) {
		unlink_entry(q, e);
		return;
	}
	e->state = PH_Q_WAITING;
	e->valid_after = requeue_at;
	e->hard = hard;
	e->dirty = 0;
	if (heap_push(q, e) != 0)
		unlink_entry(q, e);	/* out of memory: the fallback poll finds it again */
}

uint64_t ph_queue_next_due(const struct ph_queue *q)
{
	return q->heap_len ? q->heap[0]->valid_after : UINT64_MAX;
}
