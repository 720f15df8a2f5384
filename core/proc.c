/*
 * proc.c - see proc.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "proc.h"

int ph_proc_spawn(const char *path, char *const argv[], char *const envp[],
		  const struct ph_spawn_files *f, pid_t *pid)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	sigset_t all, none;
	int rc;

	if ((rc = posix_spawn_file_actions_init(&fa)) != 0)
		return rc;
	if ((rc = posix_spawnattr_init(&attr)) != 0) {
		posix_spawn_file_actions_destroy(&fa);
		return rc;
	}
	rc = posix_spawn_file_actions_addopen(&fa, 0, f->in ? f->in : "/dev/null", O_RDONLY, 0);
	if (!rc)
		rc = posix_spawn_file_actions_addopen(&fa, 1, f->out ? f->out : "/dev/null",
						      O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (!rc && f->err_is_out)
		rc = posix_spawn_file_actions_adddup2(&fa, 1, 2);
	else if (!rc)
		rc = posix_spawn_file_actions_addopen(&fa, 2, f->err ? f->err : "/dev/null",
						      O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (!rc && f->cwd)
		rc = posix_spawn_file_actions_addchdir_np(&fa, f->cwd);
	sigfillset(&all);
	sigemptyset(&none);
	if (!rc)
		rc = posix_spawnattr_setsigdefault(&attr, &all);
	if (!rc)
		rc = posix_spawnattr_setsigmask(&attr, &none);
	if (!rc)
		rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
	if (!rc)
		rc = posix_spawn(pid, path, &fa, &attr, argv, envp);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
	return rc;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int ph_proc_wait(pid_t pid, double timeout, int *code, long *maxrss_kb)
{
	double deadline = now() + (timeout > 0 ? timeout : 0);
	long nap_us = 500;

	for (;;) {
		struct rusage ru;
		int st;
		pid_t r = wait4(pid, &st, WNOHANG, &ru);

		if (r == pid) {
			*code = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 255;
			*maxrss_kb = ru.ru_maxrss;
			return 1;
		}
		if (r < 0 && errno != EINTR)
			return -errno;
		if (now() >= deadline)
			return 0;
		/* a child that exits at once is seen within half a millisecond;
		 * a long one costs at most a hundred wake-ups a second */
		struct timespec ts = { 0, nap_us * 1000 };

		nanosleep(&ts, NULL);
		if (nap_us < 10000)
			nap_us *= 2;
	}
}

int ph_proc_exepath(char *buf, size_t len)
{
	ssize_t n = readlink("/proc/self/exe", buf, len - 1);

	if (n < 0)
		return errno;
	if ((size_t)n >= len - 1)
		return ENAMETOOLONG;
	buf[n] = '\0';
	return 0;
}

const char *ph_proc_errname(int err)
{
	const char *name = strerrorname_np(err);

	return name ? name : "EIO";
}
