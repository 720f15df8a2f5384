/*
 * log.h - one line per event-worthy thing, on stderr:
 *   2026-11-22T22:40:01.123Z INFO  balances pos=120 caught up
 * The Lua side (lua/projhost/log.lua) writes the same format.
 */
#ifndef PH_LOG_H
#define PH_LOG_H

enum ph_level { PH_DEBUG, PH_INFO, PH_WARN, PH_ERROR };

/**
 * ph_log() - write one log line.
 * @level: severity
 * @who: projection name, or "host" for the process itself
 * @fmt: printf format of the message (no trailing newline)
 */
void ph_log(enum ph_level level, const char *who, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
