/*
 * interpose.c - the program's mapping calls, seen by the agent.
 *
 * mmap, munmap, mremap, mprotect and madvise run under the agent lock, so
 * none of them can land inside a merge that is half done, and the agent
 * learns every private anonymous mapping the program makes.  madvise
 * (MADV_MERGEABLE/UNMERGEABLE) and prctl(PR_SET/GET_MEMORY_MERGE) are
 * answered here and never reach the kernel's KSM.
 *
 * Memory glibc maps itself (malloc) is known only from /proc/self/maps:
 * it is taken when the program madvises it, and by merge-any's sweep
 * (agent_sweep_any).  Its munmap and mmap bypass the lock, so merge.c
 * checks that a range is still its own before it maps pool pages there.
 */
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "samepage.h"
#include "sp.h"

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

#define PAGE_UP(x) (((x) + SP_PAGE - 1) & ~(SP_PAGE - 1))

/* What the pool can be mapped as: read-write, or read-only (merge.c,
 * ro_open).  KSM takes any protection. */
static bool mergeable_prot(int prot)
{
	return prot == (PROT_READ | PROT_WRITE) || prot == PROT_READ;
}

/* Forget [s, e): the daemon stops scanning whatever was mergeable. */
static void forget(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	size_t i = rg_first(&a->regions, s);

	for (; i < a->regions.n && a->regions.v[i].start < e; i++) {
		struct sp_region *r = &a->regions.v[i];

		if (r->flags & RG_MERGEABLE)
			agent_notify(a, SP_UNREG, r->start > s ? r->start : s,
				     r->end < e ? r->end : e);
	}
	rg_remove(&a->regions, s, e);
}

static void track_mmap(struct sp_agent *a, uintptr_t s, size_t len,
		       int prot, int flags)
{
	uintptr_t e = s + PAGE_UP(len);
	unsigned rf = 0;

	forget(a, s, e);
	if ((flags & MAP_TYPE) != MAP_PRIVATE || !(flags & MAP_ANONYMOUS) ||
	    (flags & (MAP_HUGETLB | MAP_GROWSDOWN)))
		return;
	if (a->merge_any && len >= a->any_min && mergeable_prot(prot))
		rf = RG_MERGEABLE;
	if (rg_add(&a->regions, s, e, prot, rf) == 0 && rf)
		agent_notify(a, SP_REG, s, e);
}

SAMEPAGE_API void *mmap(void *addr, size_t len, int prot, int flags,
			int fd, off_t off)
{
	struct sp_agent *a = &sp_agent;
	void *p;
	int err;

	if (!a->tracking)
		return sys_mmap(addr, len, prot, flags, fd, off);
	agent_lock(a);
	p = sys_mmap(addr, len, prot, flags, fd, off);
	err = errno;
	if (p != MAP_FAILED)
		track_mmap(a, (uintptr_t)p, len, prot, flags);
	pthread_mutex_unlock(&a->lock);
	errno = err;
	return p;
}

SAMEPAGE_API void *mmap64(void *addr, size_t len, int prot, int flags,
			  int fd, off_t off)
{
	return mmap(addr, len, prot, flags, fd, off);
}

SAMEPAGE_API int munmap(void *addr, size_t len)
{
	struct sp_agent *a = &sp_agent;
	int r, err;

	if (!a->tracking)
		return sys_munmap(addr, len);
	agent_lock(a);
	r = sys_munmap(addr, len);
	err = errno;
	if (r == 0)
		forget(a, (uintptr_t)addr, (uintptr_t)addr + PAGE_UP(len));
	pthread_mutex_unlock(&a->lock);
	errno = err;
	return r;
}

/*
 * mlockall(MCL_CURRENT) faults in every mapping it locks, the agent's
 * scratch area and pool view too: the first would wait forever, the
 * second would fill the pool file (see agent_settle in agent.c).  They are
 * hidden from it, under the lock so that no merge is under way, and
 * given back their protection after: the pool view unlocked, scratch
 * locked on fault, since UFFDIO_MOVE moves only between two locked
 * mappings or two unlocked ones.  The program's memory is locked as it
 * asked, and goes on merging.
 */
static bool under_sanitizer(void)
{
	static _Atomic int sanitized = -1;	/* asked from any thread */
	int s = atomic_load_explicit(&sanitized, memory_order_relaxed);

	if (s < 0) {
		s = dlsym(RTLD_DEFAULT, "__asan_init") ||
		    dlsym(RTLD_DEFAULT, "__tsan_init");
		atomic_store_explicit(&sanitized, s, memory_order_relaxed);
	}
	return s;
}

static void note_mlockall(struct sp_agent *a, int flags)
{
	a->def_locked = (flags & MCL_FUTURE) != 0;
	a->locked_all = (flags & MCL_CURRENT) && (flags & MCL_FUTURE);
	if (flags & MCL_CURRENT)
		a->scratch_locked = 1;
}

SAMEPAGE_API int mlockall(int flags)
{
	struct sp_agent *a = &sp_agent;
	int r, err;

	/* As the sanitizers' own mlockall does: the next mlockall may be
	 * libc's, and it would lock their shadow memory, terabytes of
	 * reservations (an ASan-built agent preloaded into QEMU with
	 * -overcommit mem-lock=on grew to 5 GB locked in 6 s). */
	if (under_sanitizer())
		return 0;

	if (!a->tracking) {	/* (a program that links the library) */
		r = sys_mlockall(flags);
		if (r == 0)
			note_mlockall(a, flags);
		return r;
	}
	agent_lock(a);
	if (flags & MCL_CURRENT)
		agent_hide_own(a, true);
	r = sys_mlockall(flags);
	err = errno;
	if (r == 0)
		note_mlockall(a, flags);
	if (flags & MCL_CURRENT)
		agent_hide_own(a, false);
	pthread_mutex_unlock(&a->lock);
	errno = err;
	return r;
}

SAMEPAGE_API int munlockall(void)
{
	struct sp_agent *a = &sp_agent;
	bool held = a->tracking;
	int r, err;

	if (held)
		agent_lock(a);
	r = (int)syscall(SYS_munlockall);
	err = errno;
	if (r == 0) {
		if (a->scratch_locked && a->scratch &&
		    agent_settle(a->scratch, SP_SCRATCH_MAP,
				 PROT_READ | PROT_WRITE, false) < 0)
			log_warn("cannot unlock the agent's scratch area");
		a->locked_all = a->def_locked = a->scratch_locked = 0;
	}
	if (held)
		pthread_mutex_unlock(&a->lock);
	errno = err;
	return r;
}

/* Some mapping may be unlocked now: see discard. */
SAMEPAGE_API int munlock(const void *addr, size_t len)
{
	struct sp_agent *a = &sp_agent;
	bool held = a->tracking;
	int r, err;

	if (held)
		agent_lock(a);
	r = (int)syscall(SYS_munlock, addr, len);
	err = errno;
	if (r == 0)
		a->locked_all = 0;
	if (held)
		pthread_mutex_unlock(&a->lock);
	errno = err;
	return r;
}

/*
 * The ends of the VMAs that make up [s, e), in order, into *out; their
 * number, or -1 if part of [s, e) is not mapped (the kernel's EFAULT).
 */
static int vma_ends(uintptr_t s, uintptr_t e, uintptr_t **out)
{
	char line[512];
	uintptr_t *v = NULL, at = s;
	int n = 0;
	FILE *f = fopen("/proc/self/maps", "re");

	if (!f)
		return -1;
	while (at < e && fgets(line, sizeof(line), f)) {
		unsigned long vs, ve;
		uintptr_t *nv;

		if (sscanf(line, "%lx-%lx", &vs, &ve) != 2 || ve <= at)
			continue;
		if (vs > at || !(nv = realloc(v, (size_t)(n + 1) * sizeof(*v))))
			break;		/* a hole, or no memory */
		v = nv;
		at = ve < e ? ve : e;
		v[n++] = at;
	}
	fclose(f);
	if (at < e) {
		free(v);
		return -1;
	}
	*out = v;
	return n;
}

/* Move the VMAs ending at ends[0..n) from s to d, keeping each whole. */
static int move_vmas(uintptr_t s, uintptr_t d, const uintptr_t *ends,
		     int n)
{
	for (int i = 0; i < n; i++) {
		uintptr_t lo = i ? ends[i - 1] : s;

		if ((void *)syscall(SYS_mremap, lo, ends[i] - lo, ends[i] - lo,
				    MREMAP_MAYMOVE | MREMAP_FIXED,
				    d + (lo - s)) == MAP_FAILED)
			return i;
	}
	return n;
}

/*
 * Merging split [o, o + oldlen) into pool and anonymous VMAs, and the
 * kernel grows a range only if it is one VMA (else EFAULT).  Grow it as
 * the kernel grows one VMA: in place if the addresses after it are free,
 * else, with MREMAP_MAYMOVE, by moving each of its VMAs in order to a new
 * place of newlen bytes whose tail is fresh anonymous memory.  mremap
 * moves page-table entries, so the very pages go along, pinned ones
 * included; nothing is copied.  Called under the agent lock.
 */
static void *grow_split(uintptr_t o, size_t oldlen, size_t newlen,
			int flags, int prot, int *err)
{
	uintptr_t *ends, n;
	void *t;
	int nv, moved;

	if (newlen <= oldlen || (flags & ~MREMAP_MAYMOVE))
		return MAP_FAILED;
	t = sys_mmap((void *)(o + oldlen), newlen - oldlen, prot,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (t == (void *)(o + oldlen)) {
		*err = 0;
		return (void *)o;
	}
	if (t != MAP_FAILED)	/* a kernel that took NOREPLACE as a hint */
		sys_munmap(t, newlen - oldlen);
	if (!(flags & MREMAP_MAYMOVE)) {
		*err = ENOMEM;	/* as the kernel: no room in place */
		return MAP_FAILED;
	}
	if ((nv = vma_ends(o, o + oldlen, &ends)) < 0)
		return MAP_FAILED;
	t = sys_mmap(NULL, newlen, PROT_NONE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (t == MAP_FAILED) {
		free(ends);
		*err = ENOMEM;
		return MAP_FAILED;
	}
	n = (uintptr_t)t;
	moved = move_vmas(o, n, ends, nv);
	if (moved == nv &&
	    sys_mmap((void *)(n + oldlen), newlen - oldlen, prot,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) !=
		    MAP_FAILED) {
		free(ends);
		*err = 0;
		return t;
	}
	/* Put back what moved: the program must find its pages where
	 * they were.  Moving back into the holes just left cannot lack
	 * room; if the kernel refuses anyway, stop rather than lose them. */
	for (int i = 0; i < moved; i++)
		ends[i] = n + (ends[i] - o);
	SP_ASSERT(move_vmas(n, o, ends, moved) == moved);
	sys_munmap(t, newlen);
	free(ends);
	*err = ENOMEM;
	return MAP_FAILED;
}

SAMEPAGE_API void *mremap(void *old, size_t oldlen, size_t newlen,
			  int flags, ...)
{
	struct sp_agent *a = &sp_agent;
	uintptr_t o = (uintptr_t)old;
	void *want = NULL, *p;
	struct sp_region r = { 0 };
	size_t i;
	bool known;
	int err;
	va_list ap;

	if (flags & MREMAP_FIXED) {
		va_start(ap, flags);
		want = va_arg(ap, void *);
		va_end(ap);
	}
	if (!a->tracking)
		return (void *)syscall(SYS_mremap, old, oldlen, newlen, flags,
				       want);
	agent_lock(a);
	i = rg_first(&a->regions, o);
	known = i < a->regions.n && a->regions.v[i].start <= o;
	if (known)
		r = a->regions.v[i];
	p = (void *)syscall(SYS_mremap, old, oldlen, newlen, flags, want);
	err = errno;
	if (p == MAP_FAILED && err == EFAULT && known &&
	    rg_any(&a->regions, o, o + oldlen, RG_MERGED))
		p = grow_split(o, oldlen, newlen, flags, r.prot, &err);
	if (p != MAP_FAILED) {
		uintptr_t n = (uintptr_t)p;

		forget(a, o, o + PAGE_UP(oldlen));
		forget(a, n, n + PAGE_UP(newlen));
		if (known && rg_add(&a->regions, n, n + PAGE_UP(newlen),
				    r.prot, r.flags) == 0 &&
		    (r.flags & RG_MERGEABLE))
			agent_notify(a, SP_REG, n, n + PAGE_UP(newlen));
	}
	pthread_mutex_unlock(&a->lock);
	errno = err;
	return p;
}

SAMEPAGE_API int mprotect(void *addr, size_t len, int prot)
{
	struct sp_agent *a = &sp_agent;
	int r, err;

	if (!a->tracking)
		return (int)syscall(SYS_mprotect, addr, len, prot);
	agent_lock(a);
	r = (int)syscall(SYS_mprotect, addr, len, prot);
	err = errno;
	if (r == 0)
		rg_update(&a->regions, (uintptr_t)addr,
			  (uintptr_t)addr + PAGE_UP(len), 0, 0, prot);
	pthread_mutex_unlock(&a->lock);
	errno = err;
	return r;
}

/* 0 if [s, e) is fully mapped, as the kernel's madvise checks. */
static int check_mapped(uintptr_t s, uintptr_t e)
{
	if (s & (SP_PAGE - 1))
		return -EINVAL;
	if (s == e)
		return 0;
	if (e < s)
		return -EINVAL;
	return msync((void *)s, e - s, MS_ASYNC) < 0 ? -ENOMEM : 0;
}

int agent_mark_mergeable(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	size_t i = rg_first(&a->regions, s);

	for (; i < a->regions.n && a->regions.v[i].start < e; i++) {
		struct sp_region *r = &a->regions.v[i];
		uintptr_t lo = r->start > s ? r->start : s;
		uintptr_t hi = r->end < e ? r->end : e;

		if ((r->flags & (RG_MERGEABLE | RG_WIPEONFORK)) ||
		    !mergeable_prot(r->prot))
			continue;
		if (rg_update(&a->regions, lo, hi, RG_MERGEABLE, 0, -1) < 0)
			return -ENOMEM;
		agent_notify(a, SP_REG, lo, hi);
		i = rg_first(&a->regions, lo);
	}
	return 0;
}

/* Add [lo, hi) to the region set where no region is known yet, with
 * flags; mergeable parts are sent to the daemon. */
static void add_gaps(struct sp_agent *a, uintptr_t lo, uintptr_t hi,
		     int prot, unsigned flags)
{
	while (lo < hi) {
		size_t i = rg_first(&a->regions, lo);
		uintptr_t next = hi;

		if (i < a->regions.n && a->regions.v[i].start <= lo) {
			lo = a->regions.v[i].end;	/* known: skip it */
			continue;
		}
		if (i < a->regions.n && a->regions.v[i].start < hi)
			next = a->regions.v[i].start;
		if (rg_add(&a->regions, lo, next, prot, flags) < 0)
			return;
		if (flags & RG_MERGEABLE)
			agent_notify(a, SP_REG, lo, next);
		lo = next;
	}
}

/* One line of /proc/self/maps.  *anon: private anonymous memory KSM
 * would take (not the stack, not a file, not shared). */
static bool maps_line(const char *line, uintptr_t *vs, uintptr_t *ve,
		      int *prot, bool *anon)
{
	unsigned long s, e, off, ino;
	char perm[8], dev[16], name[256] = "";

	if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %255s", &s, &e, perm, &off,
		   dev, &ino, name) < 6)
		return false;
	*vs = s;
	*ve = e;
	*prot = (perm[0] == 'r' ? PROT_READ : 0) |
		(perm[1] == 'w' ? PROT_WRITE : 0) |
		(perm[2] == 'x' ? PROT_EXEC : 0);
	*anon = perm[3] == 'p' && ino == 0 && !strcmp(dev, "00:00") &&
		(!name[0] || !strcmp(name, "[heap]") ||
		 !strncmp(name, "[anon:", 6));
	return true;
}

/*
 * Memory samepage did not see being mapped (malloc's own mmaps, memory
 * mapped before the agent started): take the parts of [s, e) that the
 * kernel lists as private anonymous, as KSM would.  Shared, file-backed
 * and stack mappings stay out.
 */
static void adopt_unknown(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	char line[512];
	FILE *f = fopen("/proc/self/maps", "re");

	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		uintptr_t vs, ve;
		int prot;
		bool anon;

		if (!maps_line(line, &vs, &ve, &prot, &anon) || ve <= s)
			continue;
		if (vs >= e)
			break;
		if (anon)
			add_gaps(a, vs > s ? vs : s, ve < e ? ve : e, prot, 0);
	}
	fclose(f);
}

/* Loaded objects' segments: their .bss is anonymous memory that libc
 * and the agent use while they merge. */
struct segs {
	uintptr_t v[256][2];
	size_t n;
	bool full;
};

static int add_segments(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct segs *g = arg;

	(void)size;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t s = info->dlpi_addr + ph->p_vaddr;

		if (ph->p_type != PT_LOAD)
			continue;
		if (g->n == sizeof(g->v) / sizeof(g->v[0])) {
			g->full = true;
			return 1;
		}
		g->v[g->n][0] = s;
		g->v[g->n][1] = s + ph->p_memsz;
		g->n++;
	}
	return 0;
}

static bool in_segments(const struct segs *g, uintptr_t s, uintptr_t e)
{
	for (size_t i = 0; i < g->n; i++)
		if (s < g->v[i][1] && e > g->v[i][0])
			return true;
	return false;
}

/* Forget what the table holds in [s, e), where nothing is mapped now
 * (memory libc freed without the interposed munmap).  Regions that may
 * hold pool mappings stay: forgetting one wrongly would lose track of
 * them, keeping one costs nothing. */
static void forget_unmapped(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	size_t i = rg_first(&a->regions, s);

	while (i < a->regions.n && a->regions.v[i].start < e) {
		struct sp_region *r = &a->regions.v[i];
		uintptr_t lo = r->start > s ? r->start : s;
		uintptr_t hi = r->end < e ? r->end : e;

		if (r->flags & RG_MERGED) {
			i++;
			continue;
		}
		forget(a, lo, hi);
		i = rg_first(&a->regions, hi);
	}
}

/*
 * prctl(PR_SET_MEMORY_MERGE) and --all take every private anonymous
 * mapping of at least any_min bytes, as KSM does: also those libc makes
 * without the interposed mmap (malloc's mmaps and arenas, thread stacks)
 * and those made before the agent started.  So while merge_any is on,
 * /proc/self/maps is swept: when it is turned on, and then from the
 * agent's thread every few seconds (more seldom when a sweep is slow:
 * it costs in proportion to the mappings).  Left out: mappings bigger
 * than RAM (reservations, such as a sanitizer's shadow), loaded
 * objects' segments (.bss, which libc and the agent use), and the
 * agent's own memory.  Called with the agent lock held.
 */
void agent_sweep_any(struct sp_agent *a)
{
	static struct segs g;
	static char line[512];
	uint64_t t0 = sp_now_ms(), took;
	uintptr_t prev = 0, ram = (uintptr_t)sysconf(_SC_PHYS_PAGES) * SP_PAGE;
	size_t min = a->any_min > SP_PAGE ? a->any_min : SP_PAGE;
	FILE *f;

	/* A sanitizer's shadow and allocator memory is private anonymous
	 * too, and every instrumented access (the agent's, or an
	 * interceptor's on its behalf) touches it: no sweep there. */
	if (under_sanitizer()) {
		log_debug("under a sanitizer: merge-any takes only mappings "
			  "made through mmap");
		a->sweep_at_ms = UINT64_MAX;
		return;
	}
	g.n = 0;
	g.full = false;
	dl_iterate_phdr(add_segments, &g);
	f = g.full ? NULL : fopen("/proc/self/maps", "re");
	if (f) {
		while (fgets(line, sizeof(line), f)) {
			uintptr_t vs, ve;
			int prot;
			bool anon;

			if (!maps_line(line, &vs, &ve, &prot, &anon))
				continue;
			if (vs > prev)
				forget_unmapped(a, prev, vs);
			if (ve > prev)
				prev = ve;
			if (!anon || ve - vs < min || ve - vs > ram ||
			    !mergeable_prot(prot) || in_segments(&g, vs, ve) ||
			    agent_owns(a, vs, ve))
				continue;
			add_gaps(a, vs, ve, prot, RG_MERGEABLE);
		}
		fclose(f);
	}
	took = sp_now_ms() - t0;
	a->sweep_every_ms = took * 50 > 2000 ? took * 50 : 2000;
	a->sweep_at_ms = sp_now_ms() + a->sweep_every_ms;
}

SAMEPAGE_API int samepage_merge(void *addr, size_t len)
{
	struct sp_agent *a = &sp_agent;
	uintptr_t s = (uintptr_t)addr, e = s + PAGE_UP(len);
	int r = check_mapped(s, e);

	if (r < 0)
		return r;
	agent_lock(a);
	if (a->tracking && !rg_covered(&a->regions, s, e, 0))
		adopt_unknown(a, s, e);
	r = agent_mark_mergeable(a, s, e);
	pthread_mutex_unlock(&a->lock);
	return r;
}

static void unmerge_locked(struct sp_agent *a, uintptr_t s, uintptr_t e)
{
	size_t i = rg_first(&a->regions, s);

	for (; i < a->regions.n && a->regions.v[i].start < e; i++) {
		struct sp_region *r = &a->regions.v[i];
		uintptr_t lo = r->start > s ? r->start : s;
		uintptr_t hi = r->end < e ? r->end : e;

		if (r->flags & RG_MERGEABLE)
			agent_notify(a, SP_UNREG, lo, hi);
		if (r->flags & (RG_MERGEABLE | RG_MERGED))
			agent_unmerge_range(a, lo, hi);
	}
	rg_update(&a->regions, s, e, 0, RG_MERGEABLE, -1);
}

SAMEPAGE_API int samepage_unmerge(void *addr, size_t len)
{
	struct sp_agent *a = &sp_agent;
	uintptr_t s = (uintptr_t)addr, e = s + PAGE_UP(len);
	int r = check_mapped(s, e);

	if (r < 0)
		return r;
	agent_lock(a);
	unmerge_locked(a, s, e);
	pthread_mutex_unlock(&a->lock);
	return 0;
}

/*
 * The kernel keeps PR_SET_MEMORY_MERGE across execve.  The next program's
 * agent learns it from the environment, which carries the preload too:
 * SAMEPAGE_ALL, empty for off.  setenv and unsetenv may move the
 * environment array while another thread of the program is in getenv
 * (use after free).  samepage run puts SAMEPAGE_ALL in the environment
 * from the start, so putenv here only swaps the pointer in its slot,
 * to one of two static strings, written while the other is the one in
 * use.  Outside the agent lock: without the slot (a program that links
 * the library), putenv allocates, and malloc may mmap.
 */
static void set_all_env(int on, size_t min)
{
	static pthread_mutex_t env_lock = PTHREAD_MUTEX_INITIALIZER;
	static char buf[2][48];
	static int cur;

	pthread_mutex_lock(&env_lock);
	cur ^= 1;
	if (on)
		snprintf(buf[cur], sizeof(buf[cur]), "SAMEPAGE_ALL=%zu", min);
	else
		snprintf(buf[cur], sizeof(buf[cur]), "SAMEPAGE_ALL=");
	putenv(buf[cur]);
	pthread_mutex_unlock(&env_lock);
}

SAMEPAGE_API int samepage_set_merge_any(int on)
{
	struct sp_agent *a = &sp_agent;
	size_t min;

	agent_lock(a);
	a->tracking = 1;
	a->merge_any = on != 0;
	if (on) {
		for (size_t i = 0; i < a->regions.n; i++)
			if (a->regions.v[i].end - a->regions.v[i].start >=
			    a->any_min)
				agent_mark_mergeable(a, a->regions.v[i].start,
						     a->regions.v[i].end);
		agent_sweep_any(a);
	} else if (a->regions.n) {
		unmerge_locked(a, a->regions.v[0].start,
			       a->regions.v[a->regions.n - 1].end);
	}
	min = a->any_min;
	pthread_mutex_unlock(&a->lock);
	set_all_env(on, min);
	return 0;
}

SAMEPAGE_API int samepage_get_merge_any(void)
{
	return sp_agent.merge_any;
}

/*
 * MADV_DONTNEED/FREE on a private anonymous range means "zeros next
 * time".  Where pool pages are mapped the range is a private file
 * mapping, where DONTNEED would show the pool page again: give those
 * parts a fresh anonymous mapping instead.
 *
 * Regions are marked RG_MERGED whole (merge.c), so a marked part may be
 * plain anonymous memory still, and a fresh mapping would lose what the
 * program set on it (MADV_HUGEPAGE, mlock, its own userfaultfd).
 * MADV_FREE tells them apart: the kernel takes it only on anonymous
 * VMAs, and it is a discard the program asked for anyway.
 */
static bool all_anonymous(uintptr_t lo, uintptr_t hi)
{
	return sys_madvise((void *)lo, hi - lo, MADV_FREE) == 0;
}

static int discard(struct sp_agent *a, uintptr_t s, uintptr_t e, int adv)
{
	size_t i = rg_first(&a->regions, s);
	uintptr_t at = s;
	int r = 0;

	/* Every mapping is locked, and the kernel refuses DONTNEED and
	 * FREE on locked ones (EINVAL), pool mappings too: the program's
	 * pages stay as they are, as without samepage. */
	if (a->locked_all && adv != MADV_DONTNEED_LOCKED)
		return sys_madvise((void *)s, e - s, adv) < 0 ? -errno : 0;

	for (; i < a->regions.n && a->regions.v[i].start < e; i++) {
		struct sp_region reg = a->regions.v[i];
		uintptr_t lo = reg.start > s ? reg.start : s;
		uintptr_t hi = reg.end < e ? reg.end : e;

		if (!(reg.flags & RG_MERGED) || all_anonymous(lo, hi))
			continue;
		if (lo > at && sys_madvise((void *)at, lo - at, adv) < 0)
			r = -errno;
		if (sys_mmap((void *)lo, hi - lo, reg.prot,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
			     0) == MAP_FAILED)
			r = -errno;
		if (reg.flags & RG_DONTFORK)
			sys_madvise((void *)lo, hi - lo, MADV_DONTFORK);
		if (reg.flags & RG_DONTDUMP)
			sys_madvise((void *)lo, hi - lo, MADV_DONTDUMP);
		rg_update(&a->regions, lo, hi, 0, RG_MERGED, -1);
		i = rg_first(&a->regions, lo);
		at = hi;
	}
	if (at < e && sys_madvise((void *)at, e - at, adv) < 0)
		r = -errno;
	return r;
}

static unsigned madv_flag(int adv, unsigned *clear)
{
	*clear = 0;
	switch (adv) {
	case MADV_DONTFORK: return RG_DONTFORK;
	case MADV_DOFORK: *clear = RG_DONTFORK; return 0;
	case MADV_DONTDUMP: return RG_DONTDUMP;
	case MADV_DODUMP: *clear = RG_DONTDUMP; return 0;
	case MADV_WIPEONFORK: *clear = RG_MERGEABLE; return RG_WIPEONFORK;
	case MADV_KEEPONFORK: *clear = RG_WIPEONFORK; return 0;
	default: return 0;
	}
}

static int madvise_tracked(struct sp_agent *a, uintptr_t s, uintptr_t e,
			   int adv)
{
	unsigned set, clear;
	int r;

	if (adv == MADV_DONTNEED || adv == MADV_FREE ||
	    adv == MADV_DONTNEED_LOCKED) {
		r = check_mapped(s, e);
		return r < 0 ? r : discard(a, s, e, adv);
	}
	if (sys_madvise((void *)s, e - s, adv) < 0)
		return -errno;
	set = madv_flag(adv, &clear);
	if (set | clear) {
		if (clear & RG_MERGEABLE)
			unmerge_locked(a, s, e);
		rg_update(&a->regions, s, e, set, clear, -1);
	}
	return 0;
}

SAMEPAGE_API int madvise(void *addr, size_t len, int advice)
{
	struct sp_agent *a = &sp_agent;
	uintptr_t s = (uintptr_t)addr, e = s + PAGE_UP(len);
	int r;

	if (advice == MADV_MERGEABLE)
		r = samepage_merge(addr, len);
	else if (advice == MADV_UNMERGEABLE)
		r = samepage_unmerge(addr, len);
	else if (!a->tracking)
		return sys_madvise(addr, len, advice);
	else {
		agent_lock(a);
		r = madvise_tracked(a, s, e, advice);
		pthread_mutex_unlock(&a->lock);
	}
	if (r < 0) {
		errno = -r;
		return -1;
	}
	return 0;
}

/*
 * Calls the kernel allows only to a single-threaded process: the agent's
 * thread is stopped around them (agent_pause).  CLONE_NEWUSER implies
 * CLONE_THREAD; joining a mount namespace needs a filesystem context
 * (CLONE_FS) no other thread shares; nstype 0 may be either.
 */
#define ONE_THREAD_UNSHARE (CLONE_NEWUSER | CLONE_THREAD | CLONE_SIGHAND | \
			    CLONE_VM)
#define ONE_THREAD_SETNS (CLONE_NEWUSER | CLONE_NEWNS)

SAMEPAGE_API int unshare(int flags)
{
	struct sp_agent *a = &sp_agent;
	bool paused = (flags & ONE_THREAD_UNSHARE) && agent_pause(a);
	int r = (int)syscall(SYS_unshare, flags), err = errno;

	if (paused)
		agent_resume(a);
	errno = err;
	return r;
}

SAMEPAGE_API int setns(int fd, int nstype)
{
	struct sp_agent *a = &sp_agent;
	bool paused = (!nstype || (nstype & ONE_THREAD_SETNS)) &&
		      agent_pause(a);
	int r = (int)syscall(SYS_setns, fd, nstype), err = errno;

	if (paused)
		agent_resume(a);
	errno = err;
	return r;
}

SAMEPAGE_API int prctl(int option, ...)
{
	unsigned long arg[4];
	va_list ap;

	va_start(ap, option);
	for (int i = 0; i < 4; i++)
		arg[i] = va_arg(ap, unsigned long);
	va_end(ap);
	if (option == PR_SET_MEMORY_MERGE || option == PR_GET_MEMORY_MERGE) {
		if (arg[1] || arg[2] || arg[3] ||
		    (option == PR_GET_MEMORY_MERGE && arg[0])) {
			errno = EINVAL;
			return -1;
		}
		if (option == PR_GET_MEMORY_MERGE)
			return samepage_get_merge_any();
		return samepage_set_merge_any((int)arg[0]);
	}
	return (int)syscall(SYS_prctl, option, arg[0], arg[1], arg[2],
			    arg[3]);
}
