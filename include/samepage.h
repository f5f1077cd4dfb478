/*
 * samepage.h - public API of libsamepage, the in-process agent of samepage.
 *
 * A program that links libsamepage (or runs under the preload) asks for
 * merging exactly as it would with kernel KSM; these calls are the same
 * requests without going through madvise(2) or prctl(2).
 * Every function returns 0 on success or a negative errno value.
 */
#ifndef SAMEPAGE_H
#define SAMEPAGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SAMEPAGE_API __attribute__((visibility("default")))

/* Log levels passed to the callback. */
enum samepage_log_level {
	SAMEPAGE_LOG_ERROR = 0,
	SAMEPAGE_LOG_WARN = 1,
	SAMEPAGE_LOG_INFO = 2,
	SAMEPAGE_LOG_DEBUG = 3,
};

typedef void (*samepage_log_fn)(int level, const char *msg, void *arg);

/* What the agent of this process has done so far. */
struct samepage_agent_stats {
	int active;		   /* 1 while connected to a daemon */
	int safety;		   /* 1 = UFFDIO_MOVE (full), 2 = write-
				    * protection without the pinned-page
				    * check (SAMEPAGE_NO_PIN_CHECK), 0 = off */
	uint64_t merged_pages;	   /* pages replaced by a pool page */
	uint64_t zero_pages;	   /* all-zero pages freed */
	uint64_t pinned_skipped;   /* pages refused because pinned or shared */
	uint64_t changed_skipped;  /* pages that changed before the merge */
	uint64_t mappings;	   /* estimated VMAs of this process */
	uint64_t map_budget;	   /* mappings samepage may use up to */
	uint64_t budget_refusals;  /* merges not done: budget reached */
};

/*
 * Route log lines to fn (NULL restores the default: nothing at all for
 * the library, one line on stderr for the preload).
 */
SAMEPAGE_API void samepage_set_log(samepage_log_fn fn, void *arg);

/*
 * Connect this process to the daemon at socket_path (NULL: $SAMEPAGE_SOCKET
 * or the default path) and start the agent thread.  -ECONNREFUSED or
 * -ENOENT: no daemon; -EPERM/-EACCES: /dev/userfaultfd refused;
 * -EOPNOTSUPP: the kernel lacks what merging needs.  The program keeps
 * running unmerged whatever this returns.
 */
SAMEPAGE_API int samepage_init(const char *socket_path);

/* Stop the agent and disconnect.  Merged pages stay valid. */
SAMEPAGE_API void samepage_shutdown(void);

/* madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) semantics. */
SAMEPAGE_API int samepage_merge(void *addr, size_t len);
SAMEPAGE_API int samepage_unmerge(void *addr, size_t len);

/* prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE) semantics. */
SAMEPAGE_API int samepage_set_merge_any(int on);
SAMEPAGE_API int samepage_get_merge_any(void);

SAMEPAGE_API int samepage_agent_stats(struct samepage_agent_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* SAMEPAGE_H */
