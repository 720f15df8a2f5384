/*
 * proc.h - child processes without a shell: posix_spawn with an argument
 * vector, reaping with the child's peak memory, and where this binary is.
 *
 * We are the children's parent, so waiting gives real exit codes and peak
 * RSS, and no child inherits the SIGINT-ignored disposition a shell gives
 * `cmd &`: every signal is set back to its default in the child.
 * Nothing here knows about Lua: the binding is lua_proc.c.
 */
#ifndef PH_PROC_H
#define PH_PROC_H

#include <stddef.h>
#include <sys/types.h>

/* A child's standard files: paths opened in the child (NULL: /dev/null),
 * stdout and stderr truncated or created 0644; stderr_is_stdout shares
 * one file description between them, like 2>&1. cwd: NULL keeps ours. */
struct ph_spawn_files {
	const char *in, *out, *err, *cwd;
	int err_is_out;
};

/**
 * ph_proc_spawn() - start @path with @argv and @envp (NULL-terminated).
 * @pid: receives the child's pid
 *
 * Return: 0, or an errno value (the child was not started).
 */
int ph_proc_spawn(const char *path, char *const argv[], char *const envp[],
		  const struct ph_spawn_files *files, pid_t *pid);

/**
 * ph_proc_wait() - reap @pid, polling for up to @timeout seconds (0: once).
 * @code: its exit code, or 128 + the signal that ended it
 * @maxrss_kb: its peak resident memory
 *
 * Return: 1 when it ended, 0 when it is still running, or -errno.
 */
int ph_proc_wait(pid_t pid, double timeout, int *code, long *maxrss_kb);

/**
 * ph_proc_exepath() - this process's executable, into @buf of @len bytes.
 *
 * Return: 0, or an errno value.
 */
int ph_proc_exepath(char *buf, size_t len);

/**
 * ph_proc_errname() - "ENOENT" for ENOENT: the code of a failure as
 * callers see it (never NULL).
 */
const char *ph_proc_errname(int err);

#endif
