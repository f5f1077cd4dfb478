/*
 * sp.h - samepage internals shared by the library, the daemon and the CLI.
 *
 * Not installed.  The public contract is include/samepage.h; the wire
 * contract is sp_proto.h.
 */
#ifndef SP_H
#define SP_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>

#include "sp_proto.h"

#define SP_PAGE 4096UL
#define SP_PAGE_SHIFT 12
#define SP_POOL_NAME "samepage-pool"

#define SP_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define SP_UNUSED __attribute__((unused))
#define SP_PRINTF(a, b) __attribute__((format(printf, a, b)))

/* Abort on corrupt internal state: merging on a corrupt index can corrupt
 * user memory (musl mallocng habit). */
#define SP_ASSERT(c)                                                      \
	do {                                                              \
		if (!(c))                                                 \
			sp_fatal(__FILE__, __LINE__, #c);                 \
	} while (0)
void sp_fatal(const char *file, int line, const char *what)
	__attribute__((noreturn));

/* ---- estimate.c (the command) ------------------------------------- */
int cmd_estimate(int argc, char **argv);

/* ---- log.c: OpenBSD-style logging ---------------------------------- */
enum { LOG_TO_STDERR = 1, LOG_TO_SYSLOG = 2, LOG_TO_FN = 3 };
void log_init(int where, int verbose, const char *ident);
void log_set_fn(void (*fn)(int level, const char *msg, void *arg),
		void *arg);
void log_warn(const char *fmt, ...) SP_PRINTF(1, 2);  /* adds strerror */
void log_warnx(const char *fmt, ...) SP_PRINTF(1, 2);
void log_info(const char *fmt, ...) SP_PRINTF(1, 2);
void log_debug(const char *fmt, ...) SP_PRINTF(1, 2);

/* ---- util.c --------------------------------------------------------- */
#define PM_PRESENT (1ULL << 63)
#define PM_FILE (1ULL << 61)	/* file page or shared anon */
#define PM_UFFD_WP (1ULL << 57)	/* write-protected by userfaultfd */
#define PM_EXCL (1ULL << 56)	/* mapped exactly once */
#define PM_PFN(v) ((v) & ((1ULL << 55) - 1))

int sp_pagemap_read(int fd, uintptr_t addr, size_t npages, uint64_t *out);
size_t sp_read_pages(pid_t pid, int mem, const uintptr_t *addr,
		     const uint64_t *pm, size_t n, uint8_t *buf, uint8_t *ok);
/* One mapping, as /proc/PID/maps tells it. */
struct sp_vma {
	uintptr_t start, end;
	int prot;		/* PROT_READ | PROT_WRITE | PROT_EXEC */
	bool shared, file;
	uint64_t inode;		/* of the file mapped, if file */
};
int sp_vma_query(int mapsfd, uintptr_t addr, struct sp_vma *v);
long sp_count_maps(pid_t pid);
int sp_default_socket(char *buf, size_t len);
int sp_mkdir_parent(const char *path);
int sp_send(int fd, int type, const void *payload, size_t plen);
int sp_send_fd(int fd, int type, const void *payload, size_t plen,
	       int passfd);
/* Receive one packet into buf (SP_MSG_MAX, 8-byte aligned); *fdp gets a
 * passed descriptor or -1.  Returns length, 0 on EOF, or -errno. */
ssize_t sp_recv(int fd, void *buf, size_t cap, int *fdp);
ssize_t sp_recv_flags(int fd, void *buf, size_t cap, int *fdp, int flags);
int sp_connect(const char *path);
bool sp_page_is_zero(const void *p);
uint64_t sp_now_ms(void);
int sp_max_map_count(void);

/* ---- region.c: the agent's view of its own mappings ----------------- */
enum {
	RG_MERGEABLE = 1 << 0,	/* asked for merging */
	RG_MERGED = 1 << 1,	/* pool pages may be mapped here */
	RG_DONTFORK = 1 << 2,
	RG_DONTDUMP = 1 << 3,
	RG_WIPEONFORK = 1 << 4,
};

struct sp_region {
	uintptr_t start, end;
	int prot;
	unsigned flags;
};

struct sp_regions {
	struct sp_region *v;
	size_t n, cap;
};

int rg_add(struct sp_regions *rs, uintptr_t s, uintptr_t e, int prot,
	   unsigned flags);
void rg_remove(struct sp_regions *rs, uintptr_t s, uintptr_t e);
int rg_update(struct sp_regions *rs, uintptr_t s, uintptr_t e,
	      unsigned set, unsigned clear, int prot);
/* Does any region overlapping [s, e) have all of flags? */
bool rg_any(const struct sp_regions *rs, uintptr_t s, uintptr_t e,
	    unsigned flags);
bool rg_covered(const struct sp_regions *rs, uintptr_t s, uintptr_t e,
		unsigned flags);
size_t rg_first(const struct sp_regions *rs, uintptr_t addr);
void rg_free(struct sp_regions *rs);
void rg_storage(const struct sp_regions *rs, uintptr_t *s, size_t *len);

/* ---- uffd.c: userfaultfd ABI and thin wrappers ---------------------- */
struct uffd_caps {
	bool move;		/* UFFDIO_MOVE, Linux 6.8 */
	bool shmem_wp;		/* write-protection of shmem, Linux 5.19 */
	bool anon_wp;		/* of anonymous memory, Linux 5.7 */
};
int uffd_open(struct uffd_caps *caps, bool no_move);
int uffd_register(int uffd, uintptr_t s, size_t len, unsigned mode);
int uffd_writeprotect(int uffd, uintptr_t s, size_t len);
int uffd_unregister(int uffd, uintptr_t s, size_t len);
int uffd_wake(int uffd, uintptr_t s, size_t len);
/* Returns bytes moved (>= 0) or -errno with *moved set. */
int uffd_move(int uffd, uintptr_t dst, uintptr_t src, size_t len,
	      size_t *moved);
int uffd_zeropage(int uffd, uintptr_t s, size_t len);
int uffd_copy(int uffd, uintptr_t dst, uintptr_t src, size_t len);
int uffd_is_hole(int uffd, uintptr_t dst, uintptr_t hole, size_t len);

/* ---- agent.c / merge.c / interpose.c -------------------------------- */
/* Scratch pages: pages moved out of merged items stay here until the
 * batch ends or the area is full, then go in one MADV_DONTNEED (one TLB
 * flush, not one per item). */
#define SP_SCRATCH_PAGES (4 * SP_ITEM_PAGES)
/* After them, SP_ITEM_PAGES pages that stay empty: the source of the
 * moves of nothing that tell whether a range is still ours (merge.c). */
#define SP_SCRATCH_MAP ((SP_SCRATCH_PAGES + SP_ITEM_PAGES) * SP_PAGE)
/* Pages compared at a time, through copies made by the kernel. */
#define SP_CMP_PAGES 64
/* The stage: a window the agent keeps reserved for its short-lived
 * mappings (merge.c, stage_map), as big as the most it holds at once:
 * the copies of one reclaim (AGAIN_PAGES). */
#define SP_STAGE_PAGES 1024
#define SP_STAGE_MAP (SP_STAGE_PAGES * SP_PAGE)

/* (older headers) */
#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

struct sp_agent {
	atomic_uint waiters;	/* program threads waiting for the lock
				 * (agent_lock), let in between items */
	pthread_mutex_t lock;	/* serialises merges with the program's
				 * mapping changes */
	int tracking;		/* interposers keep regions up to date */
	int active;		/* connected and merging */
	int sock, uffd, poolfd, pagemap, mapsfd, wakefd[2];
	int memfd;		/* /proc/self/mem, to break CoW by writing */
	uint64_t pool_ino;	/* the pool file's inode (0: unknown) */
	uint64_t twin_after_ms;	/* no twin before (merge.c) */
	int safety;		/* SP_SAFETY_MOVE or SP_SAFETY_WP */
	int shmem_wp;		/* pool mappings can be write-protected */
	int merge_any;		/* prctl(PR_SET_MEMORY_MERGE) or --all */
	/* mlockall(2) state, as far as it went through the interposers */
	int locked_all;		/* every mapping is locked (MCL_CURRENT |
				 * MCL_FUTURE, and no munlock since) */
	int def_locked;		/* MCL_FUTURE: new mappings are locked */
	int scratch_locked;	/* scratch is locked (on fault), for MOVE
				 * out of locked memory */
	size_t any_min;		/* smallest mapping merge_any takes */
	pid_t daemon_pid, pid;
	char sockpath[108];
	uint8_t *pool;		/* read-only view of the pool */
	uint64_t pool_bytes;
	uint64_t view_lo, view_hi;	/* slots the view may hold since
					 * agent_drop_view (merge.c) */
	uint64_t view_since_ms;		/* the first of them touched */
	unsigned warned_pool;	/* "outside the pool" said once */
	uint8_t *scratch;	/* SP_SCRATCH_MAP bytes, registered */
	uint8_t *slot;		/* the current item's part of scratch */
	size_t scratch_used;	/* pages of scratch holding old pages */
	uint8_t *cmpbuf;	/* 2 * SP_CMP_PAGES pages: moved, pool */
	uint8_t *stage;		/* SP_STAGE_MAP bytes, reserved (merge.c) */
	int stage_lost;		/* part of it could not be kept: unused */
	int no_vm_read;		/* process_vm_readv refused: compare in place */
	/* Memory the agent touches while it merges, besides scratch, cmpbuf
	 * and the region table: its thread's stack and this library's
	 * segments.  Never merged: the agent would wait on itself. */
	uintptr_t own[8][2];
	size_t nown;
	uint64_t sweep_at_ms, sweep_every_ms;	/* merge_any sweeps */
	pthread_t thread;
	pid_t tid;		/* the thread's, for agent_pause */
	int thread_started;
	struct sp_regions regions;
	struct sp_figs figs;
	uint64_t merged_pages, zero_pages, map_limit, recount_at;
	uint64_t counted_ms;	/* the last read of the map count */
	uint64_t refused_since_count;	/* budget refusals since a recount */
	int budget_logged;
};

extern struct sp_agent sp_agent;

void agent_release_scratch(struct sp_agent *a);
void agent_drop_view(struct sp_agent *a, bool now);
uint64_t agent_view_due_ms(const struct sp_agent *a);
void agent_let_in(struct sp_agent *a);
void agent_merge_again(struct sp_agent *a, const struct sp_item *items,
		       struct sp_item_result *res, size_t nitems);
int agent_merge_item(struct sp_agent *a, const struct sp_item *it,
		     struct sp_item_result *res);
size_t agent_merge_items(struct sp_agent *a, const struct sp_item *its,
			 struct sp_item_result *res, size_t n,
			 const struct sp_item **outside);
int agent_unmerge_range(struct sp_agent *a, uintptr_t s, uintptr_t e);
int agent_unmerge_all(struct sp_agent *a);
void agent_recount_maps(struct sp_agent *a);
void agent_notify(struct sp_agent *a, int type, uintptr_t s, uintptr_t e);
int agent_mark_mergeable(struct sp_agent *a, uintptr_t s, uintptr_t e);
bool agent_owns(const struct sp_agent *a, uintptr_t s, uintptr_t e);
void agent_merge_init(void);
bool agent_fault(const char *what);
bool agent_pause(struct sp_agent *a);
void agent_lock(struct sp_agent *a);
void agent_resume(struct sp_agent *a);
void agent_sweep_any(struct sp_agent *a);
void agent_hide_own(struct sp_agent *a, bool hide);
int agent_settle(void *p, size_t len, int prot, bool lock);

void agent_fd_moved(struct sp_agent *a, int from, int to);

/* fds.c: the agent's descriptors, out of the program's close and dup2 */
int sp_fd_keep(int fd);
void sp_fd_close(int *fd);

/* The next definition of a symbol after ours (libc's, or a sanitizer's
 * interceptor); slot caches it. */
void *sp_next_sym(void *_Atomic *slot, const char *name);

/* raw system calls, never interposed */
void *sys_mmap(void *addr, size_t len, int prot, int flags, int fd,
	       off_t off);
int sys_munmap(void *addr, size_t len);
int sys_madvise(void *addr, size_t len, int advice);
int sys_mlockall(int flags);


/* ---- the daemon: pool.c, index.c, scan.c, samepaged.c --------------- */
/* pstate.slot: 0 = not merged, 1 = zero page, n >= 2: pool slot n - 2 */
#define ST_NONE 0u
#define ST_ZERO 1u
#define ST_SLOT(n) ((uint32_t)(n) + 2u)
#define ST_IS_POOL(v) ((v) >= 2u)
#define ST_POOL(v) ((v) - 2u)
#define NO_SLOT 0xffffffffu

enum { PS_SEEN = 1, PS_INFLIGHT = 2, PS_IMMOVABLE = 4,
       PS_WRITTEN = 8 };	/* written after a merge (scan.c) */
/* flags >> PS_WAIT_SHIFT: passes a pinned page is passed over */
#define PS_WAIT_SHIFT 8
#define PS_WAIT_PASSES 8u

struct pstate {		/* one per registered page: 16 bytes */
	uint64_t hash;
	uint32_t slot;
	uint32_t flags;
};

struct drange {
	uint64_t start, npages;
	struct pstate *st;
};

struct batch {
	uint32_t id, nitems;
	struct sp_item items[SP_BATCH_ITEMS];
	struct batch *next;
};

/* Batches a client may leave unanswered before planning for it pauses
 * (scan.c); and how long it may stay so before a pass leaves it out. */
#define SP_MAX_INFLIGHT 16
extern const uint64_t sp_busy_skip_ms;

struct client {
	int fd, id, pagemap, mem;	/* mem: /proc/PID/mem, or -1 */
	pid_t pid;
	uid_t uid;
	bool agent;
	uint32_t safety;
	char comm[16];
	struct drange *r;
	size_t nr;
	uint64_t merging, zero, registered;
	/* copy-on-write breaks seen by the scanner: in the second since
	 * cow_win_ms; while cow_busy_until_ms, pages written after a merge
	 * are not merged again (scan.c, classify) */
	uint64_t cow_win_ms, cow_busy_until_ms;
	uint32_t cow_in_win;
	struct sp_figs figs;
	/* status: the kernel's count of its mappings (maps_counted, when the
	 * agent's own figure was maps_est, at maps_at_ms) and what status
	 * shows (samepaged.c, count_mappings); done_ms: its last MERGE_DONE */
	uint64_t maps_counted, maps_est, maps_at_ms, maps_shown, done_ms;
	struct sp_item pend[SP_BATCH_ITEMS];
	uint32_t npend, next_batch, ninflight;
	/* the scan of this pass: where it has got to in this client, and
	 * whether it is done with it (or passed it over, busy: then the next
	 * pass starts at scan_at) */
	uint64_t scan_at;
	bool scan_done, passed_over;
	/* the last page planned onto the pool: its address, the slot of
	 * its content in the index, and the block and offset it went to
	 * (scan.c, target_slot) */
	uint64_t run_addr;
	uint32_t run_slot, run_blk, run_off;
	uint64_t busy_since;	/* ms: first found with no batch free */
	struct batch *inflight;
	bool unmerge_pending;
	struct client *next;
};

struct slot {			/* 24 bytes */
	uint64_t hash;
	uint32_t refs, lease;
	/* On a slot in the content index: its block of copies, blen slots
	 * from blk (blen 0: none; pool.c, pool_block). */
	uint32_t blk;
	uint8_t blen;
	uint8_t used;
	uint8_t copy;	/* a copy in a block: not in the content index */
};

struct ixent {
	uint32_t slot1;		/* slot + 1; 0: empty */
	uint32_t tag;		/* the slot's hash, low 32 bits */
};

struct pool {
	int fd, pagemap;
	uint8_t *base;
	uint64_t bytes;
	uint32_t nslots, cap, bump, hint;
	uint32_t populated;	/* slots below this were allocated ahead */
	struct slot *s;
	uint32_t *freelist, fhead, nfree; /* free slots: [fhead, nfree) */
	struct ixent *ix;	/* the content index (pool.c) */
	uint64_t ixcap, nindexed;
	uint64_t used, shared, total_refs, leased;
	dev_t dev;
	ino_t ino;
};

struct ut_entry {
	uint64_t hash, addr;
	int client;	/* 0: empty */
};

struct unstable {
	struct ut_entry *v;
	uint64_t cap, n, tombs;
};

struct daemon {
	/* knobs: the kernel's names and meanings */
	uint64_t pages_to_scan;	  /* pages per wake-up */
	uint64_t sleep_millisecs; /* sleep between wake-ups */
	uint64_t run;		  /* 0 stop, 1 run, 2 unmerge all */
	uint64_t use_zero_pages;  /* free zero pages, no pool copy */
	/* counters */
	uint64_t pages_scanned, full_scans, pages_volatile, volatile_cur;
	struct client *clients;
	int next_id, cur_client;	/* scan.c: the client to scan next */
	struct pool pool;
	struct unstable ut;
	uint64_t zero_hash;
	uint64_t zero_pfn;	/* the kernel's zero page; 0: unknown */
	int kpageflags;		/* /proc/kpageflags, or -1 */
	uint8_t *buf, *cmp;
	int unmerge_waiter;	/* CLI fd waiting for run=2, or -1 */
	uint64_t unmerge_deadline;
	uint64_t last_gc;
	uint64_t gc_cost_ms;	/* the last GC's (scan.c, end_pass) */
};

int pool_init(struct pool *p, uint64_t bytes);
uint32_t pool_lookup(struct pool *p, uint64_t hash, const void *page);
void pool_prefetch(const struct pool *p, uint64_t hash);
uint32_t pool_alloc(struct pool *p, uint64_t hash, const void *page);
uint32_t pool_block(const struct pool *p, uint32_t slot, uint32_t *first);
uint32_t pool_grow_block(struct pool *p, uint32_t slot, uint32_t *first);
void pool_ref(struct pool *p, uint32_t slot);
void pool_unref(struct pool *p, uint32_t slot);
uint64_t pool_gc(struct pool *p);
uint64_t pool_meta_bytes(const struct pool *p);

int ut_init(struct unstable *u, uint64_t cap);
struct ut_entry *ut_find(struct unstable *u, uint64_t hash);
void ut_prefetch(const struct unstable *u, uint64_t hash);
void ut_put(struct unstable *u, uint64_t hash, int client, uint64_t addr);
void ut_del(struct unstable *u, struct ut_entry *e);
void ut_clear(struct unstable *u);

int scan_init(struct daemon *d, uint64_t pool_bytes);
bool scan_tick(struct daemon *d);
void scan_flush(struct daemon *d, struct client *c);
struct client *client_by_id(struct daemon *d, int id);
struct pstate *client_page(struct client *c, uint64_t addr);
void client_release(struct client *c, struct pool *p, struct pstate *st);
void client_done(struct daemon *d, struct client *c, const struct sp_msg *m);
int client_reg(struct daemon *d, struct client *c, uint64_t s, uint64_t len);
void client_unreg(struct daemon *d, struct client *c, uint64_t s, uint64_t e);
void client_drop_batches(struct daemon *d, struct client *c);
void client_apply(struct daemon *d, struct client *c, const struct sp_item *it,
		  const struct sp_item_result *res);
size_t client_range_first(const struct client *c, uint64_t addr);

#endif /* SP_H */
