/*
 * preload.c - what LD_PRELOAD=libsamepage_preload.so adds to the library:
 * a constructor that starts the agent from the environment `samepage run`
 * sets, and a log callback that prints one line per event on stderr.
 *
 *   SAMEPAGE_SOCKET   daemon socket (set by samepage run)
 *   SAMEPAGE_ALL      merge every private anonymous mapping of at least
 *                     this many bytes (samepage run --all)
 *   SAMEPAGE_LOG      "debug" for more lines, "quiet" for none
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "samepage.h"
#include "sp.h"

static int verbosity = SAMEPAGE_LOG_WARN;

static void stderr_log(int level, const char *msg, void *arg SP_UNUSED)
{
	char line[600];
	int n;

	if (level > verbosity)
		return;
	n = snprintf(line, sizeof(line), "samepage[%d]: %s\n", (int)getpid(),
		     msg);
	if (n > 0 && write(STDERR_FILENO, line,
			   (size_t)n < sizeof(line) ? (size_t)n
						    : sizeof(line) - 1) < 0)
		return;
}

__attribute__((constructor)) static void samepage_preload(void)
{
	const char *sock = getenv("SAMEPAGE_SOCKET");
	const char *all = getenv("SAMEPAGE_ALL");
	const char *lv = getenv("SAMEPAGE_LOG");

	if (!sock || !*sock)
		return;
	if (lv && !strcmp(lv, "debug"))
		verbosity = SAMEPAGE_LOG_DEBUG;
	else if (lv && !strcmp(lv, "quiet"))
		verbosity = -1;
	log_init(LOG_TO_FN, verbosity >= SAMEPAGE_LOG_DEBUG, "samepage");
	samepage_set_log(stderr_log, NULL);
	if (all && *all) {
		sp_agent.merge_any = 1;
		sp_agent.any_min = (size_t)strtoull(all, NULL, 0);
	}
	samepage_init(sock);
}
