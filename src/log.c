/*
 * log.c - OpenBSD-style logging for samepaged, the CLI and the agent.
 *
 * The daemon logs to stderr in the foreground and to syslog otherwise.
 * The library never prints by itself: it logs only through a callback
 * (the preload installs one that writes a single line to stderr).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "sp.h"

#ifdef SP_LIBRARY
static int log_where = LOG_TO_FN;	/* the library never prints */
#else
static int log_where = LOG_TO_STDERR;
#endif
static int log_verbose;
static const char *log_ident = "samepage";
static void (*log_fn)(int, const char *, void *);
static void *log_fn_arg;

void log_init(int where, int verbose, const char *ident)
{
	log_where = where;
	log_verbose = verbose;
	log_ident = ident;
	if (where == LOG_TO_SYSLOG)
		openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

void log_set_fn(void (*fn)(int, const char *, void *), void *arg)
{
	log_fn = fn;
	log_fn_arg = arg;
	log_where = LOG_TO_FN;
}

static void vlog(int level, const char *fmt, va_list ap, int err)
{
	char msg[512];
	int n;

	if (level > LOG_INFO && !log_verbose)
		return;
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	if (err && n >= 0 && (size_t)n < sizeof(msg))
		snprintf(msg + n, sizeof(msg) - (size_t)n, ": %s",
			 strerror(err));
	switch (log_where) {
	case LOG_TO_SYSLOG:
		syslog(level, "%s", msg);
		break;
	case LOG_TO_FN:
		if (log_fn)
			log_fn(level == LOG_ERR	      ? 0
			       : level == LOG_WARNING ? 1
			       : level == LOG_INFO    ? 2
						      : 3,
			       msg, log_fn_arg);
		break;
	default:
		fprintf(stderr, "%s: %s\n", log_ident, msg);
	}
}

void log_warn(const char *fmt, ...)
{
	int err = errno;
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_WARNING, fmt, ap, err);
	va_end(ap);
}

void log_warnx(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_WARNING, fmt, ap, 0);
	va_end(ap);
}

void log_info(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_INFO, fmt, ap, 0);
	va_end(ap);
}

void log_debug(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(LOG_DEBUG, fmt, ap, 0);
	va_end(ap);
}

void sp_fatal(const char *file, int line, const char *what)
{
	fprintf(stderr, "samepage: internal state corrupt at %s:%d: %s\n",
		file, line, what);
	abort();
}
