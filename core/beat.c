/*
 * beat.c - the shared heartbeat page (see beat.h).
 */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#include "beat.h"

static const char *const kinds[PH_BEAT_NKINDS] = {
	[PH_BEAT_NONE] = "code",
	[PH_BEAT_HANDLER] = "handler",
	[PH_BEAT_ON_ERROR] = "on_error",
	[PH_BEAT_CAUGHT_UP] = "caught_up",
	[PH_BEAT_INIT] = "init",
	[PH_BEAT_SQL] = "sql",
	[PH_BEAT_LOAD] = "load",
};

const char *ph_beat_kind_name(int kind)
{
	return kind > 0 && kind < PH_BEAT_NKINDS ? kinds[kind] : kinds[PH_BEAT_NONE];
}

int ph_beat_kind_of(const char *name)
{
	for (int i = 1; i < PH_BEAT_NKINDS; i++)
		if (strcmp(kinds[i], name) == 0)
			return i;
	return -1;
}

int64_t ph_beat_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct ph_beat *ph_beat_create(int *fd)
{
	void *p;

	*fd = memfd_create("projhost-beat", 0);
	if (*fd < 0)
		return NULL;
	if (ftruncate(*fd, sizeof(struct ph_beat)) != 0) {
		int e = errno;

		close(*fd);
		errno = e;
		return NULL;
	}
	p = mmap(NULL, sizeof(struct ph_beat), PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
	if (p == MAP_FAILED) {
		int e = errno;

		close(*fd);
		errno = e;
		return NULL;
	}
	return p;
}

struct ph_beat *ph_beat_attach(int fd)
{
	void *p = mmap(NULL, sizeof(struct ph_beat), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	return p == MAP_FAILED ? NULL : p;
}

void ph_beat_release(struct ph_beat *b)
{
	if (b)
		munmap(b, sizeof(*b));
}

void ph_beat_set(struct ph_beat *b, int64_t position, int kind)
{
	__atomic_store_n(&b->position, position, __ATOMIC_RELAXED);
	__atomic_store_n(&b->kind, (int32_t)kind, __ATOMIC_RELAXED);
	__atomic_store_n(&b->started_ms, ph_beat_now_ms(), __ATOMIC_RELEASE);
}

void ph_beat_clear(struct ph_beat *b)
{
	__atomic_store_n(&b->started_ms, 0, __ATOMIC_RELEASE);
}

int64_t ph_beat_read(const struct ph_beat *b, int64_t *position, int *kind)
{
	int64_t t = __atomic_load_n(&b->started_ms, __ATOMIC_ACQUIRE);

	if (!t)
		return -1;
	*position = __atomic_load_n(&b->position, __ATOMIC_RELAXED);
	*kind = __atomic_load_n(&b->kind, __ATOMIC_RELAXED);
	return ph_beat_now_ms() - t;
}

void ph_beat_set_backend(struct ph_beat *b, int32_t pid)
{
	__atomic_store_n(&b->backend_pid, pid, __ATOMIC_RELAXED);
}

int32_t ph_beat_backend(const struct ph_beat *b)
{
	return __atomic_load_n(&b->backend_pid, __ATOMIC_RELAXED);
}
