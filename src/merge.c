/*
 * merge.c - carry out one merge item inside the program.
 *
 * DESIGN
 * An item is a run of consecutive pages [addr, addr + n pages) that the
 * daemon believes equal to n consecutive pool pages (or to zero).  The
 * agent never trusts that belief.  With the agent lock held (so the
 * program's own mmap/munmap/mremap/madvise/mprotect and fork wait):
 *
 *   1. register the run with userfaultfd in MISSING mode;
 *   2. UFFDIO_MOVE the pages into the scratch area.  Any access to the
 *      now-empty addresses, by a thread or by the kernel (read(2),
 *      O_DIRECT), blocks until step 6.  MOVE refuses pinned pages
 *      (EBUSY): those are never merged;
 *   3. compare each moved page, byte for byte, with its pool page (the
 *      pool is written only by the daemon and never while leased);
 *   4. for each equal sub-run, map the pool pages MAP_PRIVATE|MAP_FIXED
 *      over the hole (the same file pages step 3 compared, so the program
 *      can only read the saved bytes), populate them, and check the new
 *      mapping: pool frames in pagemap (bytes, where PFNs are hidden);
 *      a short run is read back and compared with its saved pages.
 *      A run that fails the check is made private again (CoW broken in
 *      place, keeping any write the program made meanwhile).  All-zero
 *      pages get UFFDIO_ZEROPAGE instead (no pool, no VMA);
 *   5. move every other page back where it was;
 *   6. wake the blocked accesses and unregister (what is still registered).
 * The program's old pages of merged runs stay in scratch (reachable by
 * nobody but the agent) until the batch ends or scratch is full, and are
 * then freed by one MADV_DONTNEED: one TLB flush for many items.
 * A page that cannot be put back by MOVE is put back by UFFDIO_COPY; if
 * even that fails the process aborts rather than run on with a hole.
 * (An earlier version mapped at a temporary address and mremap'ed it
 * over the hole; mremap's TLB flush made it the costliest step.)
 * Single pages go through these steps a group at a time (merge_group),
 * each step for every page of the group before the next.
 * After the batch, pages MOVE refused because the program wrote them
 * after an earlier merge (private copies in pool mappings) are merged
 * where they are if they equal their pool pages, else made anonymous
 * again and merged (agent_merge_again, below).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sp.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif

/* Recount the real VMA total once the count by arithmetic reaches the
 * budget, and never sooner than this many mappings after the last; and
 * while the agent maps, at least this often. */
static const uint64_t recount_every = 512;
static const uint64_t recount_ms = 5000;
/* Over the budget, asked again after recount_every refusals, and no
 * sooner than this after the last count: a read of 57,000 lines costs
 * some 20 ms, and refusals came by the thousand a second. */
static const uint64_t recount_refused_ms = 1000;

/* Fault injection for tests: SAMEPAGE_FAULT is a comma-separated list
 * of verify, map, mapgap, moveback, delay, latedelay, differ, inplace,
 * slowunmerge, breakcow, nopfn, nomove (agent.c), slowagain, pretwin,
 * slowtwin, latepin, nopincheck, notwin, noreclaim, nodirect, nocopy, regrun,
 * nostage, releasegap and checkgap.  Read
 * once; merges run one at a time under the agent lock. */
bool agent_fault(const char *what)
{
	static const char *f;
	static bool read;
	size_t n;

	if (!read) {
		f = getenv("SAMEPAGE_FAULT");
		read = true;
	}
	if (!f)
		return false;	/* the usual case, on the hot path */
	n = strlen(what);
	for (const char *p = f; n && (p = strstr(p, what)); p += n)
		if ((p == f || p[-1] == ',') && (p[n] == ',' || !p[n]))
			return true;
	return false;
}

/*
 * Let go of [s, s + len), registered with the userfaultfd: unregister it
 * (unless nothing of it is registered any more: unreg false), then wake
 * whoever waits on it.  In that order.  Unregister wakes the threads that
 * wait in MISSING mode, but not those that wait on write-protection, and
 * it lifts the protection: a writer woken first that faults again on a
 * page still protected waits again, and after the unregister for ever
 * (test_writes_never_left_waiting: a writer of the program hung for
 * good in a clean-clone .ci/run, its fault pending on a range no longer
 * registered).  Woken last, a waiter finds the range as it now is.
 */
static bool let_go(struct sp_agent *a, uintptr_t s, size_t len, bool unreg)
{
	bool ok = !unreg || uffd_unregister(a->uffd, s, len) == 0;

	if (!ok)
		log_warn("unregister %#lx", (unsigned long)s);
	if (agent_fault("releasegap"))
		usleep(50000);	/* widen the window for tests */
	uffd_wake(a->uffd, s, len);
	return ok;
}

/* Read the environment now: during a merge the agent must touch no
 * memory it may be merging, and a program's setenv puts environ in the
 * heap. */
void agent_merge_init(void)
{
	(void)agent_fault("");
}

/* Is all of [addr, addr + len) still mapped?  (msync: ENOMEM if not.)
 * The program's libc calls cannot unmap a range under merge (they take
 * the agent lock); a raw munmap(2) can. */
static bool mapped(uintptr_t addr, size_t len)
{
	return msync((void *)addr, len, MS_ASYNC) == 0 || errno != ENOMEM;
}

/* The kernel's own map count.  Called under the agent lock, also on a
 * program's thread (fork), whose stack may be small (sp_count_maps). */
void agent_recount_maps(struct sp_agent *a)
{
	long got = sp_count_maps(0);
	uint64_t n;

	a->counted_ms = sp_now_ms();	/* a failed read: not at once again */
	if (got < 0)
		return;
	n = (uint64_t)got;
	a->figs.mappings = n;
	a->recount_at = n + recount_every;
	if (a->figs.map_budget > a->recount_at)
		a->recount_at = a->figs.map_budget;
	a->refused_since_count = 0;
}

/*
 * May `more` mappings be added?  The count is kept by arithmetic: two
 * for each mapping made, the most one can add (it splits one VMA in
 * three), so it overcounts where neighbouring mappings merge, and the
 * kernel is asked once it reaches the budget (recount_at).  A read of
 * 48,000 lines took 22 ms of CPU; reading at half the distance to the
 * budget made 4 to 5 reads a program in scattered (bench), 8% of
 * samepage's CPU there, against 1 to 2 then.  The program's own new
 * mappings are not in the arithmetic, nor the agent's short-lived
 * copies (stage_map): they come out of the reserve left below
 * vm.max_map_count.  So the kernel is also asked when the last read is
 * recount_ms old: else a program that had made more than the reserve
 * since (and merged slowly) would find the limit reached by the agent's
 * mappings (test_map_budget_sees_the_program_grow).  Over the budget,
 * it is asked again only after recount_every refusals and a second (the
 * program may have unmapped meanwhile), not on every merge.
 */
static bool budget_allows(struct sp_agent *a, uint64_t more)
{
	if (a->figs.mappings + more >= a->recount_at ||
	    sp_now_ms() - a->counted_ms >= recount_ms)
		agent_recount_maps(a);
	if (a->figs.mappings + more <= a->figs.map_budget)
		return true;
	if (++a->refused_since_count >= recount_every &&
	    sp_now_ms() - a->counted_ms >= recount_refused_ms) {
		agent_recount_maps(a);
		if (a->figs.mappings + more <= a->figs.map_budget)
			return true;
	}
	if (!a->budget_logged) {
		log_warnx("mapping budget reached (%llu of vm.max_map_count "
			  "%llu); merging fewer pages. Raise it with: "
			  "sysctl -w vm.max_map_count=262144",
			  (unsigned long long)a->figs.map_budget,
			  (unsigned long long)a->map_limit);
		a->budget_logged = 1;
	}
	return false;
}

/*
 * Put scratch pages [i, i + n) back at addr.  Must not fail.  With copy
 * (a read-only run, read-only again already: MOVE would refuse it, and
 * a page MOVE puts back would be writable until then), by UFFDIO_COPY.
 */
static void move_back(struct sp_agent *a, uintptr_t addr, size_t i,
		      size_t n, bool copy)
{
	uintptr_t dst = addr + i * SP_PAGE;
	uintptr_t src = (uintptr_t)a->slot + i * SP_PAGE;
	size_t moved = 0, k;
	bool no_move = copy || agent_fault("moveback");
	int r;

	if (!no_move &&
	    uffd_move(a->uffd, dst, src, n * SP_PAGE, &moved) == 0)
		return;
	for (k = moved / SP_PAGE; k < n; k++) {
		uintptr_t d = dst + k * SP_PAGE, s = src + k * SP_PAGE;
		size_t one;

		if (!no_move &&
		    uffd_move(a->uffd, d, s, SP_PAGE, &one) == 0)
			continue;
		/* Copy the saved bytes instead; the scratch page is
		 * dropped with the rest of the scratch area later. */
		r = uffd_copy(a->uffd, d, s, SP_PAGE);
		if (r == 0)
			continue;
		/* ENOENT: no VMA of ours there any more.  A raw munmap
		 * that bypassed the lock (libc's own, in free(3)) took the
		 * range, and maybe a raw mmap put a fresh mapping there,
		 * which is the program's: the page belongs to nobody. */
		if (r == -ENOENT)
			continue;
		log_warn("cannot restore page %#lx", (unsigned long)d);
		SP_ASSERT(!"page could not be restored");
	}
}

/*
 * The protection the program gave [s, s + len), if one covers it all and
 * the pool can be mapped with it: readable, not executable.  -1 else.
 */
static int run_prot(const struct sp_agent *a, uintptr_t s, size_t len)
{
	size_t i = rg_first(&a->regions, s);
	int prot = -1;

	for (; i < a->regions.n && a->regions.v[i].start < s + len; i++) {
		if (prot >= 0 && a->regions.v[i].prot != prot)
			return -1;
		prot = a->regions.v[i].prot;
	}
	return prot == PROT_READ || prot == (PROT_READ | PROT_WRITE) ? prot
								   : -1;
}

/*
 * Move [addr, addr + n) out; in[i] says page i is now in scratch.
 * UFFDIO_MOVE answers EINVAL for a range that crosses a VMA boundary as
 * well as for a page in a file-backed VMA (a pool mapping whose
 * copy-on-write broke).  So after an EINVAL the rest goes a page at a
 * time, and only a single page refused with EINVAL is flagged immovable
 * in res (unless it is read-only: then the item was not all read-only,
 * see ro_open).
 */
static int move_out(struct sp_agent *a, uintptr_t addr, size_t n,
		    uint8_t *in, uint8_t *busy, struct sp_item_result *res)
{
	size_t i = 0, k, moved, step = n;
	int tries = 0, r;

	while (i < n) {
		size_t len = (step < n - i ? step : n - i) * SP_PAGE;

		r = uffd_move(a->uffd, (uintptr_t)a->slot + i * SP_PAGE,
			      addr + i * SP_PAGE, len, &moved);
		for (k = 0; k < moved / SP_PAGE; k++)
			in[i + k] = 1;
		i += moved / SP_PAGE;
		if (r == 0) {
			tries = 0;
			continue;	/* step < n: the next page */
		}
		if (r == -EAGAIN && tries++ < 3)
			continue;
		tries = 0;
		if (r == -EINVAL && len > SP_PAGE) {
			step = 1;	/* maybe a VMA boundary: find out */
			continue;
		}
		if (r == -EBUSY)	/* pinned, or shared after fork */
			busy[i] = 1;	/* see unshare_forked */
		else if (r == -EINVAL) {	/* not an anonymous VMA */
			/* (or a read-only page in an item not all read-only:
			 * the daemon plans it again, in an item of its own) */
			if (run_prot(a, addr + i * SP_PAGE, SP_PAGE) !=
			    PROT_READ)
				sp_bit_set(res->immovable, i);
		} else if (r != -ENOENT && r != -EEXIST)
			return r;	/* whole-range refusal */
		i++;
	}
	return 0;
}

/*
 * Are the n pages at addr file pages on the same frames as the agent's
 * view of the pool at pool?  *same: the frames were compared (PFNs read
 * as 0 without CAP_SYS_ADMIN, and then only the file bit is known).  The
 * view was mapped in by compare just before (not again here: 1.1 us a
 * call); a view page not present reads as PFN 0, and then the bytes are
 * compared instead (same_bytes).
 */
static bool pool_pfns_match(struct sp_agent *a, uintptr_t addr,
			    const uint8_t *pool, size_t n, bool *same)
{
	uint64_t mine[SP_ITEM_PAGES], theirs[SP_ITEM_PAGES];
	size_t i;

	*same = false;
	if (sp_pagemap_read(a->pagemap, addr, n, mine) < 0 ||
	    sp_pagemap_read(a->pagemap, (uintptr_t)pool, n, theirs) < 0)
		return false;
	*same = !agent_fault("nopfn");	/* as without CAP_SYS_ADMIN */
	for (i = 0; i < n; i++) {
		if ((mine[i] & (PM_PRESENT | PM_FILE)) !=
		    (PM_PRESENT | PM_FILE))
			return false;
		if (!*same || !PM_PFN(mine[i]) || !PM_PFN(theirs[i]))
			*same = false;
		else if (PM_PFN(mine[i]) != PM_PFN(theirs[i]))
			return false;
	}
	return true;
}

static void reapply_flags(struct sp_agent *a, uintptr_t s, size_t len)
{
	size_t i = rg_first(&a->regions, s);

	for (; i < a->regions.n && a->regions.v[i].start < s + len; i++) {
		uintptr_t lo = a->regions.v[i].start > s
				       ? a->regions.v[i].start : s;
		uintptr_t hi = a->regions.v[i].end < s + len
				       ? a->regions.v[i].end : s + len;

		if (a->regions.v[i].flags & RG_DONTFORK)
			sys_madvise((void *)lo, hi - lo, MADV_DONTFORK);
		if (a->regions.v[i].flags & RG_DONTDUMP)
			sys_madvise((void *)lo, hi - lo, MADV_DONTDUMP);
	}
}

/*
 * Give the pool pages in [p, p + n pages) private copies again without
 * changing a byte: a write fault (MADV_POPULATE_WRITE) on the whole
 * range.  It fails on a hole (a raw munmap), or a read-only mapping.
 * Then page by page, and only pages pagemap still shows from the pool
 * (not a fresh mapping of the program's put in a hole): a write fault
 * again, and on a read-only page (EINVAL) its first byte written back
 * through /proc/self/mem (FOLL_FORCE breaks copy-on-write).  Never on a
 * writable page: a write of the program's between that read and write
 * would be lost (test_unmerge_in_place_while_writing).  The descriptor
 * is the agent's own, kept open (fds.c): one opened here could be closed
 * by the program and its number given to a file of the program's, which
 * the write would then go to.
 */
static void break_cow(struct sp_agent *a, uintptr_t p, size_t n)
{
	static uint64_t pm[SP_ITEM_PAGES];	/* under the agent lock */

	if (!agent_fault("breakcow") &&
	    sys_madvise((void *)p, n * SP_PAGE, MADV_POPULATE_WRITE) == 0)
		return;
	SP_ASSERT(n <= SP_ITEM_PAGES);
	if (sp_pagemap_read(a->pagemap, p, n, pm) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		uintptr_t q = p + i * SP_PAGE;
		char c;

		if ((pm[i] & (PM_PRESENT | PM_FILE)) != (PM_PRESENT | PM_FILE))
			continue;	/* not a pool page (any more) */
		if (sys_madvise((void *)q, SP_PAGE, MADV_POPULATE_WRITE) == 0 ||
		    errno != EINVAL || run_prot(a, q, SP_PAGE) != PROT_READ ||
		    a->memfd < 0)
			continue;
		if (pread(a->memfd, &c, 1, (off_t)q) == 1 &&
		    (!agent_fault("breakcow") || usleep(1000) == 0) &&
		    pwrite(a->memfd, &c, 1, (off_t)q) != 1)
			log_warn("unmerge %#lx", (unsigned long)q);
	}
}

/*
 * After a failed MAP_FIXED the hole must still be there for move_back.
 * Linux restores the old mapping when mmap fails, unless the failure
 * came after it had cleared the old range (a file mapping's PTEs are
 * cleared before its mmap hook runs): then it leaves a gap.  Make the
 * hole again (anonymous, registered) or stop: the saved pages would have
 * nowhere to go.  true: it was made again.
 */
static bool keep_hole(struct sp_agent *a, uintptr_t addr, size_t len)
{
	void *p;

	if (mapped(addr, len))
		return false;
	/* read-write: MOVE moves only out of writable mappings (a
	 * read-only run is writable while it is merged, see ro_open).
	 * Made PROT_NONE, and only then read-write, locked as scratch is:
	 * a hole faulted in (after mlockall(MCL_FUTURE)) would take no
	 * page back (see agent_settle in agent.c).  The raw system call,
	 * as in map_run: the program's bytes go back in here, and TSan
	 * would take the mapping for the agent thread's write. */
	p = (void *)syscall(SYS_mmap, addr, len, PROT_NONE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			    -1, 0);
	if (p != (void *)addr ||
	    agent_settle(p, len, PROT_READ | PROT_WRITE,
			 a->scratch_locked) < 0 ||
	    uffd_register(a->uffd, addr, len,
			  UFFDIO_REGISTER_MODE_MISSING) < 0) {
		log_warn("cannot restore the range at %#lx",
			 (unsigned long)addr);
		SP_ASSERT(!"hole lost after a failed mmap");
	}
	reapply_flags(a, addr, len);
	return true;
}

/*
 * With write-protection the pages were never moved out: a gap a failed
 * MAP_FIXED left (keep_hole made it a hole again) took them.  They were
 * compared equal to the pool pages at pool and could not be written
 * since, so those bytes go back in, or the process stops.
 */
static void refill(struct sp_agent *a, uintptr_t addr, const uint8_t *pool,
		   size_t len)
{
	for (size_t o = 0; o < len; o += SP_PAGE) {
		int r = uffd_copy(a->uffd, addr + o, (uintptr_t)pool + o,
				  SP_PAGE);

		if (r < 0 && r != -EEXIST) {
			log_warn("cannot restore page %#lx",
				 (unsigned long)(addr + o));
			SP_ASSERT(!"page could not be restored");
		}
	}
}

/*
 * Is [addr, addr + n pages) still the empty, registered hole this merge
 * made (in_place, with write-protection: the protected pages)?  A raw munmap(2)
 * that bypassed the lock (libc's own, when free(3) returns a big block)
 * may have taken it since, and a raw mmap may have put a fresh mapping
 * there, which is the program's: the pool must not be mapped over it.
 * A run across a VMA boundary is asked page by page.  Only the instant
 * between this and the mmap stays open.
 */
static bool still_ours(struct sp_agent *a, uintptr_t addr, size_t n,
		       bool in_place)
{
	uintptr_t hole = (uintptr_t)a->scratch + SP_SCRATCH_PAGES * SP_PAGE;
	uint64_t pm[SP_ITEM_PAGES];
	int r;

	if (in_place) {
		/* no hole: the pages compared are still there, present and
		 * write-protected by this merge (a fresh mapping of the
		 * program's never is) */
		if (sp_pagemap_read(a->pagemap, addr, n, pm) < 0)
			return false;
		for (size_t i = 0; i < n; i++)
			if ((pm[i] & (PM_PRESENT | PM_FILE | PM_UFFD_WP)) !=
			    (PM_PRESENT | PM_UFFD_WP))
				return false;
		return true;
	}
	r = uffd_is_hole(a->uffd, addr, hole, n * SP_PAGE);
	if (r != -EINVAL || n == 1)
		return r == 0;
	for (size_t i = 0; i < n; i++)
		if (uffd_is_hole(a->uffd, addr + i * SP_PAGE, hole, SP_PAGE))
			return false;
	return true;
}

/*
 * The stage.  The agent's short-lived mappings (copies of pages it
 * unmerges or merges again, pool pages staged under mlockall) are made
 * in a window it keeps reserved, never where the kernel would place
 * them: there one could land in a hole the program has just made with a
 * raw munmap (libc's, in free), a raw mmap(MAP_FIXED) of the program's
 * into its hole would replace it, and the agent would move the
 * program's new mapping over the pages it meant to replace
 * (test_agent_maps_nothing_in_holes: a copy of 2 MiB came into a hole of
 * 4 MiB every time).  The window stays mapped all along, reserved
 * (PROT_NONE, nothing allocated) where nothing is staged, so nothing else
 * can come into it, and MAP_FIXED there replaces only the agent's own.
 * Where a part of the window could not be kept (stage_move), the window
 * is not used again, and what needs it is not done: fewer pages merge,
 * or unmerge in place (break_cow).
 */
static long stage_map(struct sp_agent *a, size_t off, size_t len, int prot,
		      int flags, int fd, off_t foff)
{
	long t;

	if (agent_fault("nostage"))	/* as once a part was lost */
		a->stage_lost = 1;
	if (!a->stage || a->stage_lost || off + len > SP_STAGE_MAP) {
		errno = ENOMEM;
		return -1;
	}
	t = syscall(SYS_mmap, a->stage + off, len, prot, flags | MAP_FIXED,
		    fd, foff);
	/* a failed MAP_FIXED may have cleared the range first */
	if (t == -1 && !mapped((uintptr_t)a->stage + off, len))
		a->stage_lost = 1;
	return t;
}

/* [t, t + len) of the window reserved again (whatever was staged there
 * is dropped). */
static void stage_drop(struct sp_agent *a, long t, size_t len)
{
	if (syscall(SYS_mmap, t, len, PROT_NONE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1,
		    0) != t &&
	    !mapped((uintptr_t)t, len)) {
		log_warn("the agent's window lost a part at %#lx",
			 (unsigned long)t);
		a->stage_lost = 1;
	}
}

/*
 * mremap [t, t + len) of the window over [dst, dst + len), and take the
 * hole it leaves back at once (MAP_FIXED_NOREPLACE).  Another thread's
 * mmap that the kernel placed there in between (microseconds, and the
 * window lies far below where the kernel places mappings: agent.c,
 * map_stage) keeps it, and the window is not used again.  Not
 * MREMAP_DONTUNMAP, which would leave no hole: it clears VM_LOCKED on
 * the whole source VMA, which here
 * may hold the other copies of a batch still to be moved (neighbouring
 * mappings merge), and under mlockall they would come out unlocked
 * (QEMU with mem-lock=on: 626 of its guest RAM's mappings, and the pages
 * did not merge again, UFFDIO_MOVE refusing an unlocked source).
 */
static bool stage_move(struct sp_agent *a, long t, size_t len, uintptr_t dst)
{
	if (syscall(SYS_mremap, t, len, len, MREMAP_MAYMOVE | MREMAP_FIXED,
		    dst) != (long)dst)
		return false;
	if (syscall(SYS_mmap, t, len, PROT_NONE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
			    MAP_FIXED_NOREPLACE,
		    -1, 0) != t) {
		log_warn("the agent's window lost a part at %#lx; copies are "
			 "no longer made", (unsigned long)t);
		a->stage_lost = 1;
	}
	return true;
}

/*
 * After mlockall(MCL_FUTURE) a new mapping is locked and faulted in at
 * once, for writing where it is writable: the pool pages would be
 * copied before anyone wrote them.  So the pool pages are mapped
 * elsewhere PROT_NONE (never faulted in), locked on fault like the range
 * they replace (it was moved out of, so it is locked as scratch is) or
 * unlocked, given their protection, and moved over the hole by mremap
 * in one step: the program never sees the range unmapped or PROT_NONE.
 */
static void *map_staged(struct sp_agent *a, uintptr_t addr, size_t len,
			int prot, uint64_t pgoff)
{
	long t = stage_map(a, 0, len, PROT_NONE, MAP_PRIVATE, a->poolfd,
			   (off_t)(pgoff * SP_PAGE));
	int err;

	if (t == -1)
		return MAP_FAILED;
	if (agent_settle((void *)t, len, prot, a->scratch_locked) == 0 &&
	    stage_move(a, t, len, addr))
		return (void *)addr;
	err = errno;
	stage_drop(a, t, len);
	errno = err;
	return MAP_FAILED;
}

/*
 * Which of the n pages at addr hold the bytes of the agent's pool view at
 * pool?  eq[i] for page i, or with eq NULL up to the first that does not.
 * Returns how many do.  Read through /proc/self/mem into the comparison
 * buffer, not in place: a raw munmap (libc's) since the mapping was made
 * would make that a SIGSEGV in this thread.  And without a pin, which
 * would give a page shared with a twin (below) a copy of its own.
 */
static size_t equal_pages(struct sp_agent *a, uintptr_t addr,
			  const uint8_t *pool, size_t n, uint8_t *eq)
{
	size_t got = 0;

	for (size_t c = 0; c < n; c += SP_CMP_PAGES) {
		size_t m = n - c < SP_CMP_PAGES ? n - c : SP_CMP_PAGES;

		if (a->memfd < 0 ||
		    pread(a->memfd, a->cmpbuf, m * SP_PAGE,
			  (off_t)(addr + c * SP_PAGE)) != (ssize_t)(m * SP_PAGE))
			return got;
		for (size_t k = 0; k < m; k++) {
			bool e = memcmp(a->cmpbuf + k * SP_PAGE,
					pool + (c + k) * SP_PAGE, SP_PAGE) == 0;

			if (!eq && !e)
				return got;
			if (eq)
				eq[c + k] = e;
			got += e;
		}
	}
	return got;
}

static bool same_bytes(struct sp_agent *a, uintptr_t addr,
		       const uint8_t *pool, size_t n)
{
	return equal_pages(a, addr, pool, n, NULL) == n;
}

/*
 * Runs of up to SHORT_RUN pages are compared and checked with fewer
 * system calls: the pool pages are copied along with the moved-out ones
 * (compare), and the new mapping is read back (read_back) rather than
 * populated and looked up in pagemap beside the pool view.  One merged
 * page took ten calls, seven now: 15.1 to 17.0 us in bench/steps.c's
 * sequence against 17.5 (2026-12-04).  For longer runs the kernel's copy
 * costs more than the calls it saves: every run read back cost
 * one-pattern 0.86 and 0.87 s of CPU against 0.77 and 0.84, cloned-vms at
 * full speed 1.93 and 1.99 against 1.86 and 1.89 (samepage alone,
 * alternating builds).
 */
#define SHORT_RUN 4

/*
 * The n pages just mapped at addr read as saved, the program's old pages
 * (in scratch)?  Read by process_vm_readv, which faults them in as the
 * populate did (a thread's read then finds them mapped), and which meets
 * a raw munmap of the program's with EFAULT, not SIGSEGV.  Stronger than
 * the pagemap check: the bytes are the program's own, whatever the pool
 * holds.  A write of the program's since the mapping made a private copy
 * (the kernel's copy-on-write: the write is in it, whatever this says);
 * if its bytes differ the check fails and the pages are made the
 * program's (break_cow).  If they do not (a word written and put back),
 * the run counts as merged, and the scanner's next look sees the copy
 * (not a file page) and takes it as written after merging.
 */
static bool read_back(struct sp_agent *a, uintptr_t addr,
		      const uint8_t *saved, size_t n)
{
	struct iovec l = { a->cmpbuf, n * SP_PAGE },
		     r = { (void *)addr, n * SP_PAGE };

	return process_vm_readv(a->pid, &l, 1, &r, 1, 0) ==
		       (ssize_t)(n * SP_PAGE) &&
	       memcmp(a->cmpbuf, saved, n * SP_PAGE) == 0;
}

/*
 * Map pool pages [pgoff, pgoff + n) over the hole at addr.  Their content
 * was compared byte for byte with the moved-out pages before (compare),
 * and the pool is not written while leased, so the program can only ever
 * read the saved bytes here.  Then the new mapping is checked: present,
 * file-backed and on the pool's own frames (pagemap); where PFNs cannot
 * be read (no CAP_SYS_ADMIN), byte for byte against the pool.  A short
 * run whose old pages are saved (in scratch: not with write-protection)
 * is read back instead, byte for byte against them (read_back).
 *   0        merged
 *   1        mapped, and to be read back by the caller (defer: a short
 *            run with its old pages saved; merge_group reads several
 *            back in one call)
 *   -EIO     mapped but not merged (a check failed; or a thread of the
 *            program wrote a page at once): the pages were made private,
 *            as the program's own; nothing may be moved back over them
 *   other    nothing mapped; the hole is there for move_back
 */
static int map_run(struct sp_agent *a, uintptr_t addr, uint64_t pgoff,
		   size_t n, int prot, const uint8_t *saved, bool in_place,
		   bool defer)
{
	size_t len = n * SP_PAGE;
	const uint8_t *pool = a->pool + pgoff * SP_PAGE;
	bool same;
	void *r;

	if (!budget_allows(a, 2)) {
		a->figs.budget_refusals += n;
		return -ENOMEM;
	}
	if (!still_ours(a, addr, n, in_place))	/* never the program's own */
		return -ENOENT;
	/* The raw system call, not the next mmap: for the program these
	 * bytes do not change, and a sanitizer's interceptor would take the
	 * new mapping for a write by the agent thread (TSan reports every
	 * later read by the program as a race). */
	if (agent_fault("mapgap"))	/* as a failure after the clearing */
		syscall(SYS_munmap, addr, len);
	r = agent_fault("map") || agent_fault("mapgap") ? MAP_FAILED
	    : a->def_locked ? map_staged(a, addr, len, prot, pgoff)
			    : (void *)syscall(SYS_mmap, addr, len, prot,
					      MAP_PRIVATE | MAP_FIXED,
					      a->poolfd,
					      (off_t)(pgoff * SP_PAGE));
	if (r == MAP_FAILED) {
		int err = agent_fault("map") || agent_fault("mapgap")
				  ? -ENOMEM : -errno;

		if (keep_hole(a, addr, len) && in_place)
			refill(a, addr, pool, len);
		return err;
	}
	a->figs.mappings += 2;
	reapply_flags(a, addr, len);
	if (agent_fault("checkgap"))
		usleep(2000);	/* widen the window for tests */
	if (defer && saved && n <= SHORT_RUN && !a->no_vm_read)
		return 1;
	if (agent_fault("verify") ||
	    (saved && n <= SHORT_RUN && !a->no_vm_read
		     ? !read_back(a, addr, saved, n)
		     : sys_madvise((void *)addr, len, MADV_POPULATE_READ) < 0 ||
			       !pool_pfns_match(a, addr, pool, n, &same) ||
			       (!same && !same_bytes(a, addr, pool, n)))) {
		log_debug("check after mapping failed at %#lx",
			  (unsigned long)addr);
		break_cow(a, addr, n);
		return -EIO;
	}
	return 0;
}

static void set_bits(struct sp_item_result *res, size_t i, size_t n)
{
	for (; n; i++, n--)
		sp_bit_set(res->merged, i);
}

/*
 * Pages [i, i + n) could not merge for want of a mapping: the daemon is
 * to try them again only some passes later, as pages that may be pinned
 * (the bit means "worth trying again later").  Tried on every pass, two
 * programs of 96,000 pages at the budget had 248,000 refusals in 20 s,
 * each a new pool page in the daemon and a move out, a comparison and a
 * move back here: 92% of a CPU spent merging nothing (2026-12-05).
 */
static void wait_bits(struct sp_item_result *res, size_t i, size_t n)
{
	for (; n; i++, n--)
		sp_bit_set(res->pinned, i);
}

/*
 * Read the pages [c, c + m) of the item at src (those with in[] set:
 * moved into scratch, or write-protected in place) into dst by
 * process_vm_readv on ourselves, and with them, if view is not NULL, the
 * m pool pages at view into vdst (the same call faults them in).  On
 * this machine kind the first touch of a page just moved into scratch,
 * or of a pool page, costs about 5 us; a kernel copy costs about 1.5 us
 * a page in runs (measured).  Pages not moved are not read: scratch is
 * registered with userfaultfd and a read of a hole there would wait for
 * ourselves.
 */
static bool read_moved(struct sp_agent *a, const uint8_t *src,
		       const uint8_t *in, size_t c, size_t m, uint8_t *dst,
		       const uint8_t *view, uint8_t *vdst)
{
	struct iovec lio[SP_CMP_PAGES + 1], rio[SP_CMP_PAGES + 1];
	size_t nv = 0, want = 0, k, e;
	ssize_t got;

	for (k = 0; k < m; k = e) {
		for (; k < m && !in[c + k]; k++)
			;
		for (e = k; e < m && in[c + e]; e++)
			;
		if (e == k)
			break;
		lio[nv].iov_base = dst + k * SP_PAGE;
		rio[nv].iov_base = (void *)(uintptr_t)(src + (c + k) * SP_PAGE);
		lio[nv].iov_len = rio[nv].iov_len = (e - k) * SP_PAGE;
		want += (e - k) * SP_PAGE;
		nv++;
	}
	if (!nv)
		return true;
	if (view) {
		lio[nv].iov_base = vdst;
		rio[nv].iov_base = (void *)(uintptr_t)view;
		lio[nv].iov_len = rio[nv].iov_len = m * SP_PAGE;
		want += m * SP_PAGE;
		nv++;
	}
	got = process_vm_readv(a->pid, lio, nv, rio, nv, 0);
	if (got < 0 && (errno == EPERM || errno == ENOSYS)) {
		a->no_vm_read = 1;	/* seccomp, say: compare in place */
		return false;
	}
	return got == (ssize_t)want;
}

/*
 * eq[i]: page i, at src + i pages, was moved out (or write-protected)
 * and equals its pool page (or zero).  Only moved pages (in scratch) are
 * ever compared in place: the program's own could be unmapped under
 * this thread by a raw munmap.
 */
static void compare(struct sp_agent *a, const struct sp_item *it,
		    const uint8_t *src, const uint8_t *in, uint8_t *eq)
{
	uint8_t *mine = a->cmpbuf, *pool = a->cmpbuf + SP_CMP_PAGES * SP_PAGE;
	size_t n = it->npages, c, k;

	for (c = 0; c < n; c += SP_CMP_PAGES) {
		size_t m = n - c < SP_CMP_PAGES ? n - c : SP_CMP_PAGES;
		const uint8_t *view = it->kind == SP_ITEM_POOL
				? a->pool + (it->pgoff + c) * SP_PAGE : NULL;
		/* a short run's pool pages are copied along (SHORT_RUN) */
		bool along = view && m <= SHORT_RUN;
		bool copied = !a->no_vm_read && !agent_fault("inplace") &&
			      read_moved(a, src, in, c, m, mine,
					 along ? view : NULL, pool);
		bool mapped_in = false;

		/* Else the pool pages are read in the agent's view of the
		 * pool once it is mapped in (one call for all; a first touch
		 * costs a fault a page), else copied (pread) */
		if (copied && it->kind == SP_ITEM_POOL && !along) {
			mapped_in = sys_madvise((void *)(uintptr_t)view,
						m * SP_PAGE,
						MADV_POPULATE_READ) == 0;
			if (!mapped_in &&
			    pread(a->poolfd, pool, m * SP_PAGE,
				  (off_t)((it->pgoff + c) * SP_PAGE)) !=
				    (ssize_t)(m * SP_PAGE))
				copied = false;
		}
		for (k = 0; k < m; k++) {
			size_t i = c + k;
			/* in place where the copies failed: slower, as good */
			const uint8_t *pm = copied ? mine + k * SP_PAGE
						   : src + i * SP_PAGE;
			const uint8_t *pp = !view ? NULL
					    : copied && !mapped_in
						    ? pool + k * SP_PAGE
						    : view + k * SP_PAGE;

			eq[i] = in[i] && !agent_fault("differ") &&
				(copied || src == a->slot) &&
				(it->kind == SP_ITEM_ZERO
					 ? sp_page_is_zero(pm)
					 : memcmp(pm, pp, SP_PAGE) == 0);
		}
	}
}

/* Move back every page of [i, j) that is in scratch, a run at a time. */
static void restore(struct sp_agent *a, uintptr_t addr, const uint8_t *in,
		    size_t i, size_t j, bool copy)
{
	while (i < j) {
		size_t k;

		for (; i < j && !in[i]; i++)
			;
		for (k = i; k < j && in[k]; k++)
			;
		if (k > i)
			move_back(a, addr, i, k - i, copy);
		i = k;
	}
}

/*
 * Mark the regions under [s, e) RG_MERGED ("pool pages may be mapped
 * here"), each whole.  A mark per run would split the region table at
 * every merge, and each split moves the rest of the table: with pages
 * merged one by one (scattered duplicates), that was a memmove of up to
 * a megabyte per merge.  Whole marks are conservative: DONTNEED and
 * mremap treat the whole region as possibly merged.  Marked before the
 * mapping is made: DONTNEED must never miss a pool mapping (it would
 * read the pool page back instead of zeros).
 */
static int mark_merged(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	size_t i = rg_first(&a->regions, s);

	while (i < a->regions.n && a->regions.v[i].start < e) {
		struct sp_region *r = &a->regions.v[i];

		if (r->flags & RG_MERGED) {
			i++;
			continue;
		}
		if (rg_update(&a->regions, r->start, r->end, RG_MERGED, 0,
			      -1) < 0)
			return -ENOMEM;
		i = rg_first(&a->regions, s);	/* the table may have moved */
	}
	return 0;
}

/*
 * Merge the equal sub-run [i, j).  1: merged; 0: nothing changed, the
 * pages must be moved back; -1: mapped but left private (see map_run),
 * the saved pages are dropped; 2: mapped, the check after mapping left
 * to the caller (defer; map_run).
 */
static int merge_run(struct sp_agent *a, const struct sp_item *it,
		     size_t i, size_t j, struct sp_item_result *res,
		     bool defer)
{
	uintptr_t at = it->addr + i * SP_PAGE;
	size_t n = j - i;
	int r, prot;

	if (it->kind == SP_ITEM_ZERO) {
		/* With write-protection the pages are still there: dropped
		 * first (an access meanwhile waits, MISSING mode). */
		if (a->safety == SP_SAFETY_WP &&
		    (!still_ours(a, at, n, true) ||
		     (sys_madvise((void *)at, n * SP_PAGE,
				  MADV_DONTNEED_LOCKED) < 0 &&
		      sys_madvise((void *)at, n * SP_PAGE, MADV_DONTNEED) < 0)))
			return 0;
		if (uffd_zeropage(a->uffd, at, n * SP_PAGE) < 0)
			return 0;
		a->zero_pages += n;
		return 1;
	}
	/* the program's protection, kept: a read-only page stays so */
	prot = run_prot(a, at, n * SP_PAGE);
	if (prot < 0 || mark_merged(a, at, at + n * SP_PAGE) < 0)
		return 0;
	r = map_run(a, at, it->pgoff + i, n, prot,
		    a->safety == SP_SAFETY_MOVE ? a->slot + i * SP_PAGE : NULL,
		    a->safety == SP_SAFETY_WP, defer);
	if (r == 1)
		return 2;
	if (r == -ENOMEM)	/* the budget, or the kernel's own limit */
		wait_bits(res, i, n);
	if (r < 0 && r != -EIO)
		return 0;
	if (r == -EIO) {
		/* private pages in a file mapping: MOVE refuses them */
		for (; i < j; i++)
			sp_bit_set(res->immovable, i);
		return -1;
	}
	a->merged_pages += n;
	return 1;
}

/*
 * Read-only runs.  UFFDIO_MOVE moves only between writable mappings, so
 * a read-only run is made writable while it is merged, and read-only
 * again before anyone is woken.  The region table says the run is
 * read-only, but it knows only what went through libc: first the kernel
 * is asked (PROCMAP_QUERY, Linux 6.11) that the run lies in one private
 * anonymous r-- mapping.  Then userfaultfd write-protects it, and only
 * then is it made writable: a write the program tries meanwhile waits
 * in the kernel and, once woken, faults on the read-only mapping as it
 * would have without samepage.  Reads of pages in place go on.
 */
static bool ro_open(struct sp_agent *a, uintptr_t s, size_t len)
{
	struct sp_vma v;

	if (a->mapsfd < 0 || sp_vma_query(a->mapsfd, s, &v) < 0 ||
	    v.prot != PROT_READ || v.shared || v.file || v.start > s ||
	    v.end < s + len)
		return false;
	if (uffd_register(a->uffd, s, len,
			  UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP) < 0)
		return false;
	if (uffd_writeprotect(a->uffd, s, len) < 0 ||
	    syscall(SYS_mprotect, s, len, PROT_READ | PROT_WRITE) < 0) {
		let_go(a, s, len, true);	/* clears the marks */
		return false;
	}
	return true;
}

/* Make [s, s + len) read-only again: the pool parts already are. */
static void ro_close(uintptr_t s, size_t len)
{
	if (syscall(SYS_mprotect, s, len, PROT_READ) == 0)
		return;
	/* a raw munmap took part of it (ENOMEM): the rest, page by page */
	for (uintptr_t p = s; p < s + len; p += SP_PAGE)
		if (syscall(SYS_mprotect, p, SP_PAGE, PROT_READ) < 0 &&
		    mapped(p, SP_PAGE))
			log_warn("cannot make %#lx read-only again",
				 (unsigned long)p);
}

/* Free the old pages of merged items, all in one go. */
void agent_release_scratch(struct sp_agent *a)
{
	/* (the kernel refuses MADV_DONTNEED on a locked mapping) */
	if (a->scratch_used)
		sys_madvise(a->scratch, a->scratch_used * SP_PAGE,
			    a->scratch_locked ? MADV_DONTNEED_LOCKED
					      : MADV_DONTNEED);
	a->scratch_used = 0;
}

/*
 * Pages UFFDIO_MOVE refused with EBUSY are pinned for I/O, or not marked
 * exclusive to this process: shared with a parent or child since fork,
 * or no longer (the other took a copy) but not marked so until its next
 * write fault.  None of those is pinned: fork copies a pinned page for
 * the child at once, and a pin makes a shared page the pinner's own
 * first.  So each is given a write fault here, without a byte changed
 * (MADV_POPULATE_WRITE): a copy of its own, as a write would give it, or
 * the mark alone where it is mapped once.  A pinned page is marked
 * already and writable: nothing happens to it.  Each then has a second
 * try at once (redo; agent_merge_item), as KSM merges such pages, and
 * a page refused again is taken for pinned.  Called once the range is
 * no longer registered: a page libc dropped meanwhile (its own
 * MADV_DONTNEED) faults in as the zeros it reads anyway, and never
 * waits for this thread.  Read-only ranges, and the second try (redo
 * NULL), have no second try.
 */
static void unshare_forked(struct sp_agent *a, uintptr_t addr, size_t n,
			   const uint8_t *busy, uint8_t *redo,
			   struct sp_item_result *res)
{
	uint64_t pm[SP_ITEM_PAGES];
	bool known = redo && sp_pagemap_read(a->pagemap, addr, n, pm) == 0;

	for (size_t i = 0; i < n; i++) {
		if (!busy[i])
			continue;
		if (!known) {
			a->figs.pinned_skipped++;
			sp_bit_set(res->pinned, i);
		} else if ((pm[i] & (PM_PRESENT | PM_FILE)) == PM_PRESENT &&
			 sys_madvise((void *)(addr + i * SP_PAGE), SP_PAGE,
				     MADV_POPULATE_WRITE) == 0)
			redo[i] = 1;
	}
}

/*
 * Is the item still to be merged?  1: yes.  0: stale, or never (res
 * says so).  -ERANGE: it names pages outside the pool.
 */
static int item_ok(struct sp_agent *a, const struct sp_item *it,
		   struct sp_item_result *res)
{
	size_t n = it->npages, len = n * SP_PAGE;

	memset(res, 0, sizeof(*res));
	if (!rg_covered(&a->regions, it->addr, it->addr + len, RG_MERGEABLE))
		return 0;	/* unmapped or unmerged since: stale */
	if (it->kind == SP_ITEM_POOL &&
	    (it->pgoff + n) * SP_PAGE > a->pool_bytes)
		return -ERANGE;
	if (agent_owns(a, it->addr, it->addr + len)) {
		/* a region left from memory libc freed without the
		 * interposed munmap, reused for the agent's own */
		for (size_t i = 0; i < n; i++)
			sp_bit_set(res->immovable, i);
		return 0;
	}
	return 1;
}

static int merge_once(struct sp_agent *a, const struct sp_item *it,
		      struct sp_item_result *res, uint8_t *redo)
{
	uint8_t in[SP_ITEM_PAGES] = { 0 }, eq[SP_ITEM_PAGES];
	uint8_t back[SP_ITEM_PAGES] = { 0 };	/* to put back, read-only */
	uint8_t busy[SP_ITEM_PAGES] = { 0 };	/* refused: see unshare_forked */
	size_t n = it->npages, len = n * SP_PAGE, i, j, over = 0;
	bool ro, ok;
	int r, r2;

	r = item_ok(a, it, res);
	if (r <= 0)
		return r;
	if (it->kind == SP_ITEM_POOL && !budget_allows(a, 2)) {
		/* no mapping to be had: nothing moved (wait_bits) */
		a->figs.budget_refusals += n;
		wait_bits(res, 0, n);
		return 0;
	}
	ro = run_prot(a, it->addr, len) == PROT_READ;
	if (ro ? !ro_open(a, it->addr, len)
	       : uffd_register(a->uffd, it->addr, len,
				 UFFDIO_REGISTER_MODE_MISSING) < 0) {
		if (ro)		/* not as the table says: leave it be */
			for (i = 0; i < n; i++)
				sp_bit_set(res->immovable, i);
		return 0;
	}
	if (a->scratch_used + n > SP_SCRATCH_PAGES)
		agent_release_scratch(a);
	a->slot = a->scratch + a->scratch_used * SP_PAGE;
	a->scratch_used += n;
	r = move_out(a, it->addr, n, in, busy, res);
	if (agent_fault("delay"))
		usleep(200000);	/* widen the window for tests */
	compare(a, it, a->slot, in, eq);
	for (i = 0; i < n; i++)
		if (in[i] && !eq[i])
			a->figs.changed_skipped++;
	for (i = 0; i < n; i = j) {
		for (j = i + 1; j < n && eq[j] == eq[i]; j++)
			;
		r2 = eq[i] ? merge_run(a, it, i, j, res, false) : 0;
		if (r2 > 0)
			set_bits(res, i, j - i);
		if (r2 != 0 && it->kind == SP_ITEM_POOL)
			over += j - i;	/* mapped over: registered no more */
		if (r2 == 0 && ro)	/* after ro_close, below */
			memcpy(back + i, in + i, j - i);
		else if (r2 == 0)
			restore(a, it->addr, in, i, j, false);
	}
	if (agent_fault("latedelay"))
		usleep(200000);	/* all mapped or put back (read-write) */
	if (ro) {
		/* read-only first, then the pages back: never writable */
		ro_close(it->addr, len);
		restore(a, it->addr, back, 0, n, true);
	}
	/* A thread waiting on an address the pool now covers is not woken
	 * by unregister, which wakes only what it unregisters: let_go
	 * wakes the whole item.  Where the pool covers the whole item
	 * nothing of it is registered any more, and unregister (a VMA walk
	 * under the mmap lock taken for writing) is left out: the usual
	 * case for a single page.  Not unregistered, a populate could wait
	 * on this thread (below). */
	ok = let_go(a, it->addr, len, over != n || ro);
	if (memchr(busy, 1, n))
		unshare_forked(a, it->addr, n, busy, ro || !ok ? NULL : redo,
			       res);
	return r;
}

/*
 * The write-protect fallback, for kernels without UFFDIO_MOVE, where the
 * user opted in (SAMEPAGE_NO_PIN_CHECK=1; agent.c).  The pages stay in
 * place.  Userfaultfd write-protects them: the program's writes wait in
 * the kernel, its reads go on.  Then the same steps as merge_once: each
 * protected page is compared with its pool page, and the pool pages are
 * mapped over the equal sub-runs (a zero run is dropped, and
 * UFFDIO_ZEROPAGE maps the zero page); still_ours checks first that the
 * pages are still the protected ones.  A waiting write retries on the
 * pool mapping (and breaks copy-on-write) or, where the page stayed, on
 * the page once unregister has lifted the protection.  What this cannot
 * do is see a pin: a page pinned for I/O before the protection (O_DIRECT
 * in flight, an io_uring fixed buffer, VFIO) is merged all the same, and
 * what the device writes into it afterwards is lost.  Read-only ranges
 * are left alone.
 */
static int merge_wp(struct sp_agent *a, const struct sp_item *it,
		    struct sp_item_result *res)
{
	uint8_t in[SP_ITEM_PAGES] = { 0 }, eq[SP_ITEM_PAGES];
	uint64_t pm[SP_ITEM_PAGES];
	size_t n = it->npages, len = n * SP_PAGE, i, j;
	int r = item_ok(a, it, res);

	if (r <= 0)
		return r;
	if (run_prot(a, it->addr, len) != (PROT_READ | PROT_WRITE)) {
		for (i = 0; i < n; i++)
			sp_bit_set(res->immovable, i);
		return 0;
	}
	if (uffd_register(a->uffd, it->addr, len,
			  UFFDIO_REGISTER_MODE_MISSING |
				  UFFDIO_REGISTER_MODE_WP) < 0)
		return 0;
	if (uffd_writeprotect(a->uffd, it->addr, len) == 0 &&
	    sp_pagemap_read(a->pagemap, it->addr, n, pm) == 0) {
		for (i = 0; i < n; i++)
			in[i] = (pm[i] & (PM_PRESENT | PM_FILE | PM_UFFD_WP)) ==
				(PM_PRESENT | PM_UFFD_WP);
		compare(a, it, (const uint8_t *)it->addr, in, eq);
		if (agent_fault("delay"))
			usleep(200000);	/* compared, not replaced: writes wait */
		for (i = 0; i < n; i++)
			if (in[i] && !eq[i])
				a->figs.changed_skipped++;
		for (i = 0; i < n; i = j) {
			for (j = i + 1; j < n && eq[j] == eq[i]; j++)
				;
			if (eq[i] && merge_run(a, it, i, j, res, false) > 0)
				set_bits(res, i, j - i);
		}
	}
	if (agent_fault("latedelay"))
		usleep(200000);
	/* unregistered (the protection lifted), then the writes woken */
	let_go(a, it->addr, len, true);
	return 0;
}

/*
 * Pages per twin at most.  A twin costs a fork and two madvise passes
 * over the program's regions, about 1.5 ms here whatever it looks at
 * (cow-storm, 4 x 256 MiB written after merging: 1,020 twins of 256
 * pages, a fifth of the agents' CPU).  Its pages are write-protected
 * until their copies are in place, so a program's write to one of them
 * waits up to the reclaim of all: for 1,024, 2.3 ms (p50), 3.0 ms (p90)
 * and 23 ms at most over 256 reclaims (cow-storm, 2026-12-04).
 */
#define AGAIN_PAGES 1024
#define NO_POOL_PAGE UINT64_MAX	/* a page of a zero item: no pool page */
_Static_assert(AGAIN_PAGES <= SP_STAGE_PAGES,
	       "a reclaim's copies fit the stage");

/*
 * A process made only to be looked at, sharing the program's memory
 * copy-on-write.  Fork copies for the child every anonymous page that may
 * be pinned for I/O (folio_maybe_dma_pinned: O_DIRECT in flight, io_uring
 * fixed buffers, VFIO) and shares every other one.  So while the child
 * lives, a page of the program's that pagemap shows mapped exclusively
 * may be pinned; one mapped twice is not.  Raw clone(2): no atfork
 * handlers run, no SIGCHLD is sent (exit signal 0; reaped with __WCLONE,
 * which the program's wait(-1) does not take), and the descriptor table
 * is shared (CLONE_FILES), so that the child holds no file open of its
 * own.  It waits in pause(2), every signal blocked, until SIGKILL.
 */
static long twin_start(void)
{
	long parent = syscall(SYS_getpid);
	long pid = syscall(SYS_clone, (unsigned long)CLONE_FILES, 0UL, NULL,
			   NULL, 0UL);

	if (pid == 0) {
		/* Never outlive the agent thread (another thread's exit or
		 * execve kills it): the twin would hold every descriptor of
		 * the program's open for ever. */
		if (syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 ||
		    syscall(SYS_getppid) != parent)
			syscall(SYS_exit_group, 0);
		for (;;)
			syscall(SYS_pause);
	}
	return pid;
}

/*
 * Anonymous pages the twin got a share of: fork write-protected each in
 * the program, which takes a fault on its next write to it (about 15 us
 * here).  The program's mergeable regions are kept out (twin_scope), but
 * memory it did not opt in (a heap) is not.  -1: unknown.
 */
static long twin_anon_pages(long pid)
{
	char path[64], buf[4096];
	const char *p;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%ld/status", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	p = strstr(buf, "RssAnon:");
	return p ? strtol(p + 8, NULL, 10) / (long)(SP_PAGE / 1024) : -1;
}

/* SAMEPAGE_FAULT=latepin: a pin for reading, such as a device that
 * reads from the page takes (process_vm_readv pins what it reads). */
static void pin_briefly(struct sp_agent *a, uintptr_t p)
{
	uint8_t buf[64];
	struct iovec lio = { buf, sizeof(buf) }, rio = { (void *)p, sizeof(buf) };

	if (syscall(SYS_process_vm_readv, a->pid, &lio, 1, &rio, 1, 0) < 0)
		log_warn("latepin %#lx", (unsigned long)p);
}

static void twin_end(long pid)
{
	siginfo_t si;

	syscall(SYS_kill, pid, SIGKILL);
	while (syscall(SYS_waitid, P_PID, pid, &si, WEXITED | __WCLONE,
		       NULL) < 0 && errno == EINTR)
		;
}

/* Does the program keep the page at p out of its children? */
static bool dontfork(const struct sp_agent *a, uintptr_t p)
{
	size_t i = rg_first(&a->regions, p);

	return i < a->regions.n && a->regions.v[i].start <= p &&
	       (a->regions.v[i].flags & RG_DONTFORK);
}

/*
 * Fork copies the page tables of every mapping it copies, and
 * write-protects the program's anonymous pages in them: each page the
 * program writes afterwards takes a fault (about 15 us here, a second for
 * 256 MiB written; 15 ms for the fork itself).  So the program's mergeable
 * regions are kept out of the twin (MADV_DONTFORK), but for the pages it is
 * made to look at; on: before the twin, !on: after.
 */
static void twin_scope(struct sp_agent *a, bool on)
{
	for (size_t i = 0; i < a->regions.n; i++) {
		const struct sp_region *r = &a->regions.v[i];

		if (!(r->flags & RG_DONTFORK))	/* (those are out already) */
			sys_madvise((void *)r->start, r->end - r->start,
				    on ? MADV_DONTFORK : MADV_DOFORK);
	}
}

/*
 * Is the page at p in a private, read-write mapping of the pool file?
 * (PROCMAP_QUERY, Linux 6.11.)  Other pages MOVE refuses (a locked page
 * in an unlocked item, say) are left alone: replacing those would lose
 * what the program set on them.
 */
static bool in_pool_mapping(struct sp_agent *a, uintptr_t p,
			    struct sp_vma *v)
{
	/* v: the last answer; pages of one run mostly share a mapping */
	if (!(p >= v->start && p < v->end) &&
	    (a->mapsfd < 0 || sp_vma_query(a->mapsfd, p, v) < 0)) {
		v->start = v->end = 0;
		return false;
	}
	return a->pool_ino && v->file && !v->shared &&
	       v->prot == (PROT_READ | PROT_WRITE) && v->inode == a->pool_ino;
}

/* Present, a private copy (not the pool's page), write-protected by us. */
static bool cow_copy(uint64_t pm)
{
	return (pm & (PM_PRESENT | PM_FILE | PM_UFFD_WP)) ==
	       (PM_PRESENT | PM_UFFD_WP);
}

/*
 * Copy len bytes of the program's pages at src into the new mapping m,
 * without a pin: a pin (as process_vm_readv takes) would give the program
 * a copy of its own of a page it shares with the twin, and it would look
 * pinned.  UFFDIO_COPY, with m registered for it alone, reads the pages
 * in place and writes new ones through the kernel's own mapping: 1.1 us
 * a page here.  m is unregistered again before it moves: the program's
 * range must not fault to us afterwards.  Where m is populated already
 * (mlockall(MCL_FUTURE) faults new mappings in; UFFDIO_COPY fills only
 * holes), through /proc/self/mem, also without a pin: 11.3 us a page, a
 * fault and a first touch of each new page.
 */
static int copy_run(struct sp_agent *a, uintptr_t m, uintptr_t src,
		    size_t len)
{
	if (agent_fault("nocopy"))
		return -1;
	if (uffd_register(a->uffd, m, len, UFFDIO_REGISTER_MODE_MISSING) == 0) {
		int r = uffd_copy(a->uffd, m, src, len);

		if (uffd_unregister(a->uffd, m, len) < 0)
			return -1;
		if (r != -EEXIST)
			return r;
	}
	if (a->memfd < 0)
		return -1;
	return pread(a->memfd, (void *)m, len, (off_t)src) == (ssize_t)len
		       ? 0 : -1;
}

/* The stretch of pages from k, to *e: the run of pages with on[] set
 * that follow one another in memory, or page k alone if it is off.
 * Returns on[k]. */
static bool run_at(const uintptr_t *pg, const uint8_t *on, size_t k,
		   size_t n, size_t *e)
{
	*e = k + 1;
	if (!on[k])
		return false;
	while (*e < n && on[*e] && pg[*e] == pg[*e - 1] + SP_PAGE)
		(*e)++;
	return true;
}

/*
 * The last look at pages [k, e) of a reclaim, from k: how far they are
 * all still the protected copy and shared with the twin (*keep), or all
 * not.  Returns the end of that stretch; the rest is looked at again.
 * Not a hole, nor a fresh mapping of the program's put there by a raw
 * mmap, nor a page pinned since the twin was made: a pin for writing
 * waits for the protection; one for reading (a device that reads from
 * the page) makes the page the program's own first, as a write would.
 * Left as it is, the device would read the old page for as long as it
 * held it, and never see the program's writes to the new one.  Pinned
 * pages are marked later[].
 */
static size_t last_look(struct sp_agent *a, const uintptr_t *pg, size_t k,
			size_t e, uint8_t *later, bool *keep)
{
	uint64_t pm[SP_ITEM_PAGES];
	size_t q;
	bool seen;

	if (e - k > SP_ITEM_PAGES)
		e = k + SP_ITEM_PAGES;
	seen = sp_pagemap_read(a->pagemap, pg[k], e - k, pm) == 0;
	*keep = false;
	for (q = k; q < e; q++) {
		bool copy = seen && cow_copy(pm[q - k]);
		bool pinned = copy && (pm[q - k] & PM_EXCL) &&
			      !agent_fault("nopincheck");

		if (q == k)
			*keep = copy && !pinned;
		else if (*keep != (copy && !pinned))
			break;
		if (pinned) {
			later[q] = 1;
			a->figs.pinned_skipped++;
		}
	}
	return q;
}

/* Between a reclaim's look at the pages on[] and their replacement:
 * SAMEPAGE_FAULT=slowagain holds 100 ms, latepin pins every second page
 * (a pin for reading taken meanwhile). */
static void hold_for_tests(struct sp_agent *a, const uintptr_t *pg,
			   const uint8_t *on, size_t n)
{
	if (!memchr(on, 1, n))
		return;
	if (agent_fault("slowagain"))
		usleep(100000);
	if (agent_fault("latepin"))
		for (size_t k = 1; k < n; k += 2)
			if (on[k])
				pin_briefly(a, pg[k]);
}

/* The stretch of pages from k with on[] set that follow one another in
 * memory and in the pool (slot[]), at most SP_ITEM_PAGES, to *e; or page
 * k alone if it is off, or has no pool page.  Returns whether it is on. */
static bool pool_run_at(const uintptr_t *pg, const uint64_t *slot,
			const uint8_t *on, size_t k, size_t n, size_t *e)
{
	*e = k + 1;
	if (!on[k] || slot[k] == NO_POOL_PAGE)
		return false;
	while (*e < n && *e - k < SP_ITEM_PAGES && on[*e] &&
	       pg[*e] == pg[*e - 1] + SP_PAGE && slot[*e] == slot[*e - 1] + 1)
		(*e)++;
	return true;
}

/*
 * Written pages (cand[], protected, the twin made) whose bytes equal the
 * pool pages their items name are merged where they are: compared in
 * place (equal_pages: after the twin, for a page pinned until then may
 * have been written by its device up to then) and the pool pages mapped
 * over them, as merge_wp does, once the last look says they are still
 * the protected copies shared with the twin.  No copy, no mremap, and
 * no second merge of the copy (register, UFFDIO_MOVE and its TLB
 * flush).  hit[k]: page k is merged; cand[k] is cleared for every page
 * taken here.  The rest are made anonymous (reclaim) as before.
 */
static void merge_in_place(struct sp_agent *a, const uintptr_t *pg,
			   const uint64_t *slot, size_t n, uint8_t *cand,
			   uint8_t *later, uint8_t *hit)
{
	uint8_t eq[AGAIN_PAGES] = { 0 };
	size_t k, e, got = 0;

	if (a->memfd < 0 || agent_fault("nodirect"))
		return;
	for (k = 0; k < n; k = e) {
		const uint8_t *view;

		if (!pool_run_at(pg, slot, cand, k, n, &e) ||
		    (slot[k] + (e - k)) * SP_PAGE > a->pool_bytes)
			continue;
		view = a->pool + slot[k] * SP_PAGE;
		/* (one call; else a fault a page) */
		sys_madvise((void *)(uintptr_t)view, (e - k) * SP_PAGE,
			    MADV_POPULATE_READ);
		got += equal_pages(a, pg[k], view, e - k, eq + k);
	}
	if (!got)
		return;
	hold_for_tests(a, pg, eq, n);
	for (k = 0; k < n; k = e) {
		bool keep;
		int r;

		if (!pool_run_at(pg, slot, eq, k, n, &e))
			continue;
		e = last_look(a, pg, k, e, later, &keep);
		memset(cand + k, 0, e - k);
		if (!keep)
			continue;
		if (mark_merged(a, pg[k], pg[e - 1] + SP_PAGE) < 0) {
			memset(later + k, 1, e - k);
			continue;
		}
		r = map_run(a, pg[k], slot[k], e - k, PROT_READ | PROT_WRITE,
			    NULL, true, false);
		if (r == 0) {
			memset(hit + k, 1, e - k);
			a->merged_pages += e - k;
		} else if (r != -EIO && r != -ENOENT) {
			memset(later + k, 1, e - k);	/* the budget, say */
		}
	}
}

/*
 * Pages the program wrote after they were merged hold private copies,
 * left in the mapping of the pool file, where UFFDIO_MOVE cannot take
 * them: they could never merge again, even when their bytes come to
 * equal another page's again.  Here such pages (pg[0..n), one each, in
 * read-write mappings) are copied into fresh anonymous mappings put in
 * their place (mremap), as anonymize does, so that they can.  A page
 * pinned for I/O must not be: the device would go on writing into the
 * old page.  So the pages are write-protected first (no new pin for
 * writing can be taken; writes wait), then a twin (above) tells which
 * may be pinned, and only the others are replaced, each stretch after a
 * last look that its pages are still shared with the twin, which lives
 * until then (a pin for reading taken meanwhile would have made a page
 * the program's own).  Those whose bytes equal the pool pages their
 * items name (slot[k]; NO_POOL_PAGE: none) are not copied but merged where
 * they are (merge_in_place).  hit[k]: page k is merged; done[k]: it is
 * in an anonymous mapping now, its bytes unchanged; later[k]: it may be
 * pinned, or a step failed that may not fail next time (the mapping
 * budget, a twin or a copy that could not be made): worth trying again
 * after the daemon's wait.  None: not a private copy in a read-write
 * pool mapping (any more), or a check after mapping failed; left alone.
 *
 * Each step works on runs of consecutive pages, one system call a run:
 * a run written after its merge (a guest rewriting its memory) is
 * write-protected with one TLB flush and put back with one mremap, where
 * a call a page cost three flushes a page (cow-storm: 47 s of CPU to
 * merge 756 MiB again).  What is checked stays per page.
 */
static void reclaim(struct sp_agent *a, const uintptr_t *pg,
		    const uint64_t *slot, size_t n, uint8_t *done,
		    uint8_t *later, uint8_t *hit)
{
	uint8_t reg[AGAIN_PAGES] = { 0 }, cand[AGAIN_PAGES] = { 0 };
	uint8_t rw[AGAIN_PAGES], fork_too[AGAIN_PAGES] = { 0 };
	uint8_t copied[AGAIN_PAGES] = { 0 };
	uint64_t pm[AGAIN_PAGES];
	uintptr_t t[AGAIN_PAGES];
	struct sp_vma v = { 0 };
	size_t k, e, q, nc = 0, single_to = 0;
	long pid;
	bool ok;

	SP_ASSERT(n <= AGAIN_PAGES);
	for (k = 0; k < n; k++)
		rw[k] = run_prot(a, pg[k], SP_PAGE) == (PROT_READ | PROT_WRITE);
	for (k = 0; k < n; k = e) {
		size_t len;

		if (!run_at(pg, rw, k, n, &e))
			continue;
		if (k < single_to)
			e = k + 1;
		ok = budget_allows(a, 2);
		if (ok && ((e > k + 1 && agent_fault("regrun")) ||
			   uffd_register(a->uffd, pg[k], (e - k) * SP_PAGE,
					 UFFDIO_REGISTER_MODE_WP) < 0)) {
			ok = false;
			if (e > k + 1) {
				/* one of the run's mappings cannot be:
				 * the run a page at a time, so that the
				 * others still can */
				single_to = e;
				e = k + 1;
				ok = uffd_register(a->uffd, pg[k], SP_PAGE,
						   UFFDIO_REGISTER_MODE_WP) == 0;
			}
		}
		if (!ok) {
			memset(later + k, 1, e - k);
			continue;
		}
		len = (e - k) * SP_PAGE;
		memset(reg + k, 1, e - k);
		/* after the protection: a raw munmap and mmap since would
		 * show, as a fresh mapping of the program's */
		if (uffd_writeprotect(a->uffd, pg[k], len) < 0 ||
		    sp_pagemap_read(a->pagemap, pg[k], e - k, pm + k) < 0)
			continue;
		for (q = k; q < e; q++)
			if (cow_copy(pm[q]) && in_pool_mapping(a, pg[q], &v))
				cand[q] = 1, nc++;
	}
	if (nc)
		twin_scope(a, true);
	/* only these pages go to the twin; one of a MADV_DONTFORK range
	 * (QEMU's guest RAM) would be left out, and look pinned */
	for (k = 0; k < n; k = e) {
		if (!run_at(pg, cand, k, n, &e))
			continue;
		if (sys_madvise((void *)pg[k], (e - k) * SP_PAGE,
				MADV_DOFORK) == 0)
			memset(fork_too + k, 1, e - k);
	}
	/* A device may write a page pinned until now, and let go of it,
	 * up to the twin: so the pages are compared after it, never before
	 * (test_device_write_before_twin_kept holds here) */
	if (nc && agent_fault("pretwin"))
		usleep(300000);
	pid = nc && !agent_fault("notwin") ? twin_start() : -1;
	if (pid > 0 && agent_fault("slowtwin"))
		usleep(500000);	/* widen the window for tests */
	if (nc)
		twin_scope(a, false);
	for (k = 0; k < n; k++) {
		if (fork_too[k] && dontfork(a, pg[k]))
			reapply_flags(a, pg[k], SP_PAGE);
		if (cand[k] && pid <= 0) {	/* no twin: no way to tell */
			cand[k] = 0;
			later[k] = 1;
		}
	}
	if (pid > 0)
		merge_in_place(a, pg, slot, n, cand, later, hit);
	for (k = 0; k < n; k = e) {	/* the copies, a run at a time */
		size_t len;
		long m;

		if (!run_at(pg, cand, k, n, &e))
			continue;
		len = (e - k) * SP_PAGE;
		/* (each page's copy at its own offset: n <= SP_STAGE_PAGES) */
		m = stage_map(a, k * SP_PAGE, len, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (m == -1) {
			memset(later + k, 1, e - k);
			continue;
		}
		if (copy_run(a, (uintptr_t)m, pg[k], len) < 0) {
			stage_drop(a, m, len);
			memset(later + k, 1, e - k);
			continue;
		}
		for (q = k; q < e; q++) {
			t[q] = (uintptr_t)m + (q - k) * SP_PAGE;
			copied[q] = 1;
		}
	}
	hold_for_tests(a, pg, copied, n);
	/* Each stretch of a run in its pages' place, right after a look at
	 * the pages from its start (last_look).  Runs of copies are whole
	 * runs of candidates: consecutive in t too. */
	for (k = 0; k < n; k = e) {
		bool keep;
		size_t len;

		if (!run_at(pg, copied, k, n, &e))
			continue;
		e = last_look(a, pg, k, e, later, &keep);
		len = (e - k) * SP_PAGE;
		if (keep && stage_move(a, (long)t[k], len, pg[k])) {
			a->figs.mappings += 2;
			reapply_flags(a, pg[k], len);
			memset(done + k, 1, e - k);
			continue;
		}
		/* not ours to place, or ENOMEM (the kernel's own mapping
		 * limit): the copies go */
		stage_drop(a, (long)t[k], len);
		if (keep)
			memset(later + k, 1, e - k);
	}
	if (pid > 0) {
		/* Each page shared with the twin, but for the candidates,
		 * costs the program a fault on its next write to it.  The
		 * regions the agent knows of are kept out, but not the
		 * break (malloc's main arena) nor thread stacks: 13,600
		 * pages in QEMU with mem-lock=on, where all are present.
		 * Past 32,768 such pages, the next twin waits ten times as
		 * long as the faults for the excess may take (30 us each
		 * here with the other CPU busy: 2.3 s for 256 MiB). */
		long over = twin_anon_pages(pid) - (long)nc - 32768;

		a->twin_after_ms = sp_now_ms() +
				   (over > 0 ? (uint64_t)over * 300 / 1000 : 0);
		twin_end(pid);
	}
	for (k = 0; k < n; k = e) {
		if (!run_at(pg, reg, k, n, &e))
			continue;
		/* (a replaced page is registered no more) */
		for (size_t r = k, re; r < e; r = re) {
			bool gone = done[r] || hit[r];

			for (re = r + 1;
			     re < e && (done[re] || hit[re]) == gone; re++)
				;
			let_go(a, pg[r], (re - r) * SP_PAGE, !gone);
		}
	}
}

/* reclaim, which merges in place the pages equal to their pool pages,
 * then merge the rest at once, n pages of a batch: page k is page at[k]
 * of item from[k] (in order).  Consecutive pages of one item merge as one
 * run, as they were planned.  Before the time the last twin set, the
 * pages are left to be tried again after the wait for pinned pages. */
static void again(struct sp_agent *a, const struct sp_item *items,
		  struct sp_item_result *res, const uintptr_t *pg,
		  const uint32_t *from, const uint32_t *at, size_t n)
{
	uint8_t done[AGAIN_PAGES] = { 0 }, later[AGAIN_PAGES] = { 0 };
	uint8_t hit[AGAIN_PAGES] = { 0 };
	uint64_t slot[AGAIN_PAGES];
	size_t k, e;

	/* (the items' pool pages are in the view's range already: each
	 * went through agent_merge_item first) */
	for (k = 0; k < n; k++)
		slot[k] = items[from[k]].kind == SP_ITEM_POOL
				  ? items[from[k]].pgoff + at[k]
				  : NO_POOL_PAGE;
	if (sp_now_ms() < a->twin_after_ms)
		memset(later, 1, n);
	else
		reclaim(a, pg, slot, n, done, later, hit);
	for (k = 0; k < n; k++)
		if (hit[k]) {
			sp_bit_set(res[from[k]].merged, at[k]);
			res[from[k]].immovable[at[k] / 64] &=
				~(1ULL << (at[k] % 64));
		}
	for (k = 0; k < n; k = e) {
		struct sp_item sub = items[from[k]];
		struct sp_item_result sr, *r = &res[from[k]];

		for (e = k + 1; e < n && done[e] == done[k] &&
				from[e] == from[k] && at[e] == at[e - 1] + 1;
		     e++)
			;
		/* tried again after the daemon's wait for pinned pages,
		 * as a page MOVE refused as pinned */
		for (size_t q = k; q < e; q++) {
			if (later[q])
				sp_bit_set(r->pinned, at[q]);
			if (done[q] || later[q])
				r->immovable[at[q] / 64] &=
					~(1ULL << (at[q] % 64));
		}
		if (!done[k])
			continue;
		sub.addr += at[k] * SP_PAGE;
		sub.pgoff += sub.kind == SP_ITEM_POOL ? at[k] : 0;
		sub.npages = (uint32_t)(e - k);
		if (agent_merge_item(a, &sub, &sr) < 0)
			continue;
		for (size_t q = k; q < e; q++)
			if (sp_bit(sr.merged, q - k))
				sp_bit_set(r->merged, at[q]);
	}
}

/*
 * After a batch: its pages refused as immovable that hold private copies
 * in pool mappings are merged where they are, or made anonymous again
 * and merged at once (reclaim), with one twin for up to AGAIN_PAGES of
 * them.
 */
void agent_merge_again(struct sp_agent *a, const struct sp_item *items,
		       struct sp_item_result *res, size_t nitems)
{
	uintptr_t pg[AGAIN_PAGES];
	uint32_t from[AGAIN_PAGES], at[AGAIN_PAGES];
	uint64_t pm[SP_ITEM_PAGES];
	size_t n = 0;

	if (a->safety != SP_SAFETY_MOVE || !a->shmem_wp ||
	    agent_fault("noreclaim"))
		return;
	for (size_t i = 0; i < nitems; i++) {
		bool any = false;

		for (uint32_t w = 0; w < SP_ITEM_WORDS; w++)
			any |= res[i].immovable[w] != 0;
		/* one read for the item: reclaim checks each page again
		 * once it is write-protected */
		if (!any || sp_pagemap_read(a->pagemap, items[i].addr,
					    items[i].npages, pm) < 0)
			continue;
		for (uint32_t j = 0; j < items[i].npages; j++) {
			if (!sp_bit(res[i].immovable, j) ||
			    (pm[j] & (PM_PRESENT | PM_FILE)) != PM_PRESENT)
				continue;
			pg[n] = items[i].addr + j * SP_PAGE;
			from[n] = (uint32_t)i;
			at[n++] = j;
			if (n == AGAIN_PAGES) {
				again(a, items, res, pg, from, at, n);
				n = 0;
				agent_let_in(a);	/* as between items */
			}
		}
	}
	if (n)
		again(a, items, res, pg, from, at, n);
}

/*
 * Pool pages the agent reads in its view (to compare, to check a mapping)
 * stay mapped there, and a pool page mapped anywhere but in the daemon's
 * own mapping is never freed (pool.c: the kernel's word that nobody maps
 * it).  Every pool page an agent had compared stayed in the pool for as
 * long as the program lived, written over or not (2,000 of 2,000 left in
 * test_pool_freed_while_programs_live).  So the view is emptied, the
 * pool file untouched: one MADV_DONTNEED over the slots items named since
 * the last time (and the page tables around them), at the end of the
 * first batch a second after (agent.c: or after that second, if no batch
 * comes).  Emptied at the end of every batch it cost 40 us a batch in
 * scattered (the slots of 64 single pages lie all over the pool), about
 * 3% of the agents' CPU.  A page still in the view only waits: GC sees
 * it in the daemon's own mapping, not exclusive, and frees it later.
 */
#define VIEW_KEEP_MS 1000

static void view_touch(struct sp_agent *a, const struct sp_item *it)
{
	uint64_t slots = a->pool_bytes / SP_PAGE;

	/* (an item outside the pool is refused, item_ok: never past the
	 * view, where the program's own memory may lie) */
	if (it->kind != SP_ITEM_POOL || it->pgoff > slots ||
	    it->npages > slots - it->pgoff)
		return;
	if (a->view_hi <= a->view_lo) {
		a->view_lo = it->pgoff;
		a->view_hi = it->pgoff + it->npages;
		a->view_since_ms = sp_now_ms();
		return;
	}
	if (it->pgoff < a->view_lo)
		a->view_lo = it->pgoff;
	if (it->pgoff + it->npages > a->view_hi)
		a->view_hi = it->pgoff + it->npages;
}

uint64_t agent_view_due_ms(const struct sp_agent *a)
{
	return a->view_hi > a->view_lo ? a->view_since_ms + VIEW_KEEP_MS
				       : UINT64_MAX;
}

void agent_drop_view(struct sp_agent *a, bool now)
{
	/* A read fault maps the pages around it that the pool file holds
	 * (fault-around, within one page table): the daemon's slots
	 * populated ahead, say.  So whole page tables' worth (2 MiB) go. */
	const uintptr_t pt = (uintptr_t)512 * SP_PAGE;
	uintptr_t v = (uintptr_t)a->pool, end = v + a->pool_bytes;
	uintptr_t lo = (v + a->view_lo * SP_PAGE) & ~(pt - 1);
	uintptr_t hi = (v + a->view_hi * SP_PAGE + pt - 1) & ~(pt - 1);
	void *p = (void *)(lo < v ? v : lo);
	size_t len = (hi > end ? end : hi) - (uintptr_t)p;

	if (!now && sp_now_ms() < agent_view_due_ms(a))
		return;
	if (a->pool && a->view_hi > a->view_lo &&
	    sys_madvise(p, len, MADV_DONTNEED) < 0 &&
	    sys_madvise(p, len, MADV_DONTNEED_LOCKED) < 0)
		log_warn("cannot empty the pool view");
	a->view_lo = a->view_hi = 0;
}

/* Pages of it just given copies of their own (redo[], shared after
 * fork: unshare_forked): their second try, at once, so that each copy
 * lives microseconds */
static void second_try(struct sp_agent *a, const struct sp_item *it,
		       struct sp_item_result *res, const uint8_t *redo)
{
	size_t n = it->npages, i, j, k;

	for (i = 0; i < n; i = j) {
		struct sp_item sub = *it;
		struct sp_item_result sr;

		for (j = i + 1; j < n && redo[j] == redo[i]; j++)
			;
		if (!redo[i])
			continue;
		sub.addr += i * SP_PAGE;
		sub.pgoff += it->kind == SP_ITEM_POOL ? i : 0;
		sub.npages = (uint32_t)(j - i);
		if (merge_once(a, &sub, &sr, NULL) < 0)
			continue;
		for (k = 0; k < j - i; k++) {
			if (sp_bit(sr.merged, k))
				sp_bit_set(res->merged, i + k);
			if (sp_bit(sr.immovable, k))
				sp_bit_set(res->immovable, i + k);
			if (sp_bit(sr.pinned, k))
				sp_bit_set(res->pinned, i + k);
		}
	}
}

int agent_merge_item(struct sp_agent *a, const struct sp_item *it,
		     struct sp_item_result *res)
{
	uint8_t redo[SP_ITEM_PAGES] = { 0 };
	int r;

	view_touch(a, it);
	if (a->safety == SP_SAFETY_WP)
		return merge_wp(a, it, res);
	r = merge_once(a, it, res, redo);
	if (r == 0)
		second_try(a, it, res, redo);
	return r;
}

/*
 * Single pages, the usual item where duplicates lie scattered, go
 * through merge_once's steps GROUP at a time, each step for every page
 * before the next: the moved-out pages and their pool pages are copied
 * to be compared in one process_vm_readv, and the new mappings read
 * back in one, where each page took two.  In bench/steps.c's sequence
 * (one process alone), 12.4 to 13.4 us a page in groups of 8 or 16
 * against 15.6 to 15.9 a page at a time (2026-12-05).  What is checked,
 * and in what order for each page, is merge_once's: registered, moved
 * out, compared, the hole checked and the pool page mapped, read back,
 * woken; a page not merged is moved back before anyone is woken.  The
 * pages of the group stay out (an access waits) until the group is
 * done: some 100 us (8 pages at about 13 us each, in one process alone;
 * longer where the CPUs are busy).
 */
#define GROUP 8

/* May the item go in a group?  A single read-write page of a pool item
 * in the mode that moves pages out, with kernel copies allowed. */
static bool groupable(struct sp_agent *a, const struct sp_item *it)
{
	return it->kind == SP_ITEM_POOL && it->npages == 1 &&
	       a->safety == SP_SAFETY_MOVE && !a->no_vm_read &&
	       run_prot(a, it->addr, SP_PAGE) == (PROT_READ | PROT_WRITE) &&
	       !agent_fault("inplace");
}

/* Copy the nv pages at from[] into cmpbuf, in one call; how many came
 * whole (a raw munmap of one ends the copy there: EFAULT) */
static size_t read_pages(struct sp_agent *a, const uint8_t *const *from,
			 size_t nv)
{
	struct iovec lio[2 * GROUP], rio[2 * GROUP];
	ssize_t got;

	SP_ASSERT(nv <= 2 * GROUP && nv <= 2 * SP_CMP_PAGES);
	for (size_t v = 0; v < nv; v++) {
		lio[v].iov_base = a->cmpbuf + v * SP_PAGE;
		rio[v].iov_base = (void *)(uintptr_t)from[v];
		lio[v].iov_len = rio[v].iov_len = SP_PAGE;
	}
	got = nv ? process_vm_readv(a->pid, lio, nv, rio, nv, 0) : 0;
	if (got < 0 && (errno == EPERM || errno == ENOSYS))
		a->no_vm_read = 1;	/* seccomp, say */
	return got < 0 ? 0 : (size_t)got / SP_PAGE;
}

/* Returns an item that named pages outside the pool (item_ok), or NULL. */
static const struct sp_item *merge_group(struct sp_agent *a,
					 const struct sp_item *its,
					 struct sp_item_result *res, size_t k)
{
	const struct sp_item *outside = NULL;
	uint8_t live[GROUP] = { 0 }, in[GROUP] = { 0 }, busy[GROUP] = { 0 };
	uint8_t eq[GROUP] = { 0 }, over[GROUP] = { 0 }, wait[GROUP] = { 0 };
	uint8_t redo[GROUP] = { 0 }, *slot[GROUP];
	const uint8_t *from[2 * GROUP];
	size_t i, v, nv, got;
	bool ok;
	int r;

	SP_ASSERT(k <= GROUP);
	if (a->scratch_used + k > SP_SCRATCH_PAGES)
		agent_release_scratch(a);
	for (i = 0; i < k; i++) {	/* registered and moved out */
		const struct sp_item *it = &its[i];

		view_touch(a, it);
		r = item_ok(a, it, &res[i]);
		if (r == -ERANGE && !outside)
			outside = it;
		if (r <= 0)
			continue;
		if (!budget_allows(a, 2)) {
			a->figs.budget_refusals++;
			wait_bits(&res[i], 0, 1);
			continue;
		}
		if (uffd_register(a->uffd, it->addr, SP_PAGE,
				  UFFDIO_REGISTER_MODE_MISSING) < 0)
			continue;
		live[i] = 1;
		slot[i] = a->slot = a->scratch + a->scratch_used * SP_PAGE;
		a->scratch_used++;
		move_out(a, it->addr, 1, in + i, busy + i, &res[i]);
	}
	if (agent_fault("delay") && memchr(live, 1, k))
		usleep(200000);	/* widen the window for tests */
	for (i = nv = 0; i < k; i++)	/* compared */
		if (in[i]) {
			from[nv++] = slot[i];
			from[nv++] = a->pool + its[i].pgoff * SP_PAGE;
		}
	got = read_pages(a, from, nv);
	for (i = v = 0; i < k; i++) {
		if (!in[i])
			continue;
		/* in place where the copy fell short: slower, as good */
		eq[i] = !agent_fault("differ") &&
			(v + 2 <= got
				 ? memcmp(a->cmpbuf + v * SP_PAGE,
					  a->cmpbuf + (v + 1) * SP_PAGE,
					  SP_PAGE) == 0
				 : memcmp(from[v], from[v + 1], SP_PAGE) == 0);
		v += 2;
		if (!eq[i])
			a->figs.changed_skipped++;
	}
	for (i = 0; i < k; i++) {	/* mapped, or moved back */
		r = 0;
		if (eq[i]) {
			a->slot = slot[i];
			r = merge_run(a, &its[i], 0, 1, &res[i], true);
		}
		if (r == 1)
			set_bits(&res[i], 0, 1);
		over[i] = r != 0;
		wait[i] = r == 2;
		if (in[i] && r == 0) {
			a->slot = slot[i];
			restore(a, its[i].addr, in + i, 0, 1, false);
		}
	}
	for (i = nv = 0; i < k; i++)	/* read back */
		if (wait[i])
			from[nv++] = (const uint8_t *)(uintptr_t)its[i].addr;
	got = read_pages(a, from, nv);
	for (i = v = 0; i < k; i++) {
		if (!wait[i])
			continue;
		if (!agent_fault("verify") &&
		    (v < got ? memcmp(a->cmpbuf + v * SP_PAGE, slot[i],
				      SP_PAGE) == 0
			     : read_back(a, its[i].addr, slot[i], 1))) {
			set_bits(&res[i], 0, 1);
			a->merged_pages++;
		} else {
			log_debug("check after mapping failed at %#lx",
				  (unsigned long)its[i].addr);
			break_cow(a, its[i].addr, 1);
			sp_bit_set(res[i].immovable, 0);
		}
		v++;
	}
	if (agent_fault("latedelay") && memchr(live, 1, k))
		usleep(200000);	/* all mapped or put back */
	for (i = 0; i < k; i++) {	/* woken (see merge_once) */
		if (!live[i])
			continue;
		ok = let_go(a, its[i].addr, SP_PAGE, !over[i]);
		if (busy[i])
			unshare_forked(a, its[i].addr, 1, busy + i,
				       ok ? redo + i : NULL, &res[i]);
	}
	for (i = 0; i < k; i++)
		if (redo[i])
			second_try(a, &its[i], &res[i], redo + i);
	return outside;
}

/*
 * Merge items from its[0]: the single pages there, up to GROUP, as a
 * group (merge_group; a lone one too: single pages take one path), or
 * else the first item alone.  Returns how many were done; *outside: one
 * that named pages outside the pool (skipped, item_ok), or NULL.
 */
size_t agent_merge_items(struct sp_agent *a, const struct sp_item *its,
			 struct sp_item_result *res, size_t n,
			 const struct sp_item **outside)
{
	size_t k = 0;

	while (k < n && k < GROUP && groupable(a, &its[k]))
		k++;
	if (k) {
		*outside = merge_group(a, its, res, k);
		return k;
	}
	*outside = agent_merge_item(a, its, res) == -ERANGE ? its : NULL;
	return 1;
}

/* Are the n pages at p all pool pages, present? */
static bool all_pool(struct sp_agent *a, uintptr_t p, size_t n)
{
	static uint64_t pm[SP_ITEM_PAGES];	/* under the agent lock */

	if (sp_pagemap_read(a->pagemap, p, n, pm) < 0)
		return false;
	for (size_t i = 0; i < n; i++)
		if ((pm[i] & (PM_PRESENT | PM_FILE)) != (PM_PRESENT | PM_FILE))
			return false;
	return true;
}

/*
 * Unmerging gives pages private copies again.  Broken in place (break_cow)
 * they would stay in a mapping of the pool file, where UFFDIO_MOVE cannot
 * take them: to merge again they would need agent_merge_again's twin,
 * one fork per 256.  So a run of pool pages is
 * copied into a fresh anonymous mapping, and mremap(2) puts that in the
 * run's place in one step.  Meanwhile the program's writes to the run
 * wait in the kernel (userfaultfd write-protection of the pool mapping,
 * shmem, Linux 5.19); reads go on, of the same bytes.  Only pool pages:
 * a pin for writing (O_DIRECT into the page, io_uring) breaks
 * copy-on-write first, so no device can be writing into a page that is
 * replaced here.  Pages the program made private by writing are left
 * where they are, private already.  false: nothing was changed.
 */
static bool anonymize(struct sp_agent *a, uintptr_t p, size_t n)
{
	size_t len = n * SP_PAGE;
	int prot = run_prot(a, p, len);
	bool rw = prot == (PROT_READ | PROT_WRITE), ok = false;
	struct iovec lio, rio;
	long t = -1;

	/* (read-only runs need no write-protection: writes fault anyway) */
	if (prot < 0 || (rw && !a->shmem_wp) || agent_fault("breakcow"))
		return false;
	if (rw &&
	    uffd_register(a->uffd, p, len, UFFDIO_REGISTER_MODE_WP) < 0)
		return false;
	if (rw && uffd_writeprotect(a->uffd, p, len) < 0)
		goto out;
	/* after the write-protection: no page was made private since */
	if (!all_pool(a, p, n))
		goto out;
	/* Raw system calls: a sanitizer's interceptors would take these
	 * bytes for the agent's, and the program's later use for races. */
	t = stage_map(a, 0, len, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* populated first: one call, not a page fault per page of the copy */
	if (t == -1 || syscall(SYS_madvise, t, len, MADV_POPULATE_WRITE) < 0)
		goto out;
	lio.iov_base = (void *)t;
	rio.iov_base = (void *)p;
	lio.iov_len = rio.iov_len = len;
	if (syscall(SYS_process_vm_readv, a->pid, &lio, 1, &rio, 1, 0) !=
	    (long)len)
		goto out;
	if (n >= 64 && agent_fault("slowunmerge"))
		usleep(20000);	/* widen the window for tests */
	if (!rw && syscall(SYS_mprotect, t, len, prot) < 0)
		goto out;
	/* Still the pool mapping?  A raw munmap (libc's, in free) may have
	 * left a hole since, and a raw mmap a fresh mapping of the
	 * program's: neither may be mapped over.  Only the instant until
	 * the mremap stays open. */
	if (!all_pool(a, p, n))
		goto out;
	if (!stage_move(a, t, len, p))
		goto out;
	t = -1;
	reapply_flags(a, p, len);
	ok = true;
out:
	if (t != -1)
		stage_drop(a, t, len);
	if (rw)		/* replaced (ok): registered no more */
		let_go(a, p, len, !ok);
	return ok;
}

/*
 * Does the page at q read as zeros?  Read through /proc/self/mem, not in
 * place: a raw munmap (libc's) since pagemap was read would make that
 * a SIGSEGV in this thread.  Under the agent lock.
 */
static bool reads_zero(struct sp_agent *a, uintptr_t q)
{
	static uint8_t page[SP_PAGE];

	return a->memfd >= 0 &&
	       pread(a->memfd, page, SP_PAGE, (off_t)q) == (ssize_t)SP_PAGE &&
	       sp_page_is_zero(page);
}

/* Under the agent lock, also on a program's thread (an interposed
 * MADV_UNMERGEABLE), whose stack may be small: the pagemap buffers here
 * and in all_pool and break_cow are static (each function its own, since
 * they nest). */
int agent_unmerge_range(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	static uint64_t pm[SP_ITEM_PAGES];

	while (s < e) {
		size_t n = (e - s) / SP_PAGE, i, j;

		if (n > SP_ITEM_PAGES)
			n = SP_ITEM_PAGES;
		if (sp_pagemap_read(a->pagemap, s, n, pm) < 0)
			return -EIO;
		/* 2: a pool page; 1: the shared zero page; 0: private */
		for (i = 0; i < n; i++) {
			if (!(pm[i] & PM_PRESENT))
				pm[i] = 0;
			else if (pm[i] & PM_FILE)
				pm[i] = 2;
			else
				pm[i] = !(pm[i] & PM_EXCL) &&
					reads_zero(a, s + i * SP_PAGE);
		}
		for (i = 0; i < n; i = j) {
			uintptr_t p = s + i * SP_PAGE;

			for (j = i + 1; j < n && pm[j] == pm[i]; j++)
				;
			if (pm[i] == 2 && anonymize(a, p, j - i))
				continue;
			if (pm[i])
				break_cow(a, p, j - i);
		}
		s += n * SP_PAGE;
	}
	return 0;
}

int agent_unmerge_all(struct sp_agent *a)
{
	for (size_t i = 0; i < a->regions.n; i++) {
		struct sp_region *r = &a->regions.v[i];

		if (r->flags & (RG_MERGEABLE | RG_MERGED))
			agent_unmerge_range(a, r->start, r->end);
	}
	return 0;
}
