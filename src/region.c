/*
 * region.c - the agent's record of the program's private anonymous
 * mappings: a sorted array of disjoint [start, end) intervals with their
 * protection and samepage flags.  Only mappings the agent saw being made
 * (through the interposed mmap) are here: their whole life goes through
 * the interposers, so merging can be serialised with it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sp.h"

size_t rg_first(const struct sp_regions *rs, uintptr_t addr)
{
	size_t lo = 0, hi = rs->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (rs->v[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static size_t table_bytes(size_t cap)
{
	return (cap * sizeof(struct sp_region) + SP_PAGE - 1) &
	       ~(size_t)(SP_PAGE - 1);
}

/*
 * The table lives in a mapping of its own, made with raw system calls
 * (the agent interposes mmap): never in malloc's memory, which the
 * program may have opted in (prctl, --all).  The agent must not touch a
 * page while it merges it; it touches the table then.
 */
static int rg_reserve(struct sp_regions *rs, size_t more)
{
	struct sp_region *v;
	size_t cap;

	if (rs->n + more <= rs->cap)
		return 0;
	cap = rs->cap ? rs->cap * 2 : 64;
	while (cap < rs->n + more)
		cap *= 2;
	cap = table_bytes(cap) / sizeof(*v);	/* the page, used whole */
	v = rs->v ? (void *)syscall(SYS_mremap, rs->v, table_bytes(rs->cap),
				    table_bytes(cap), MREMAP_MAYMOVE)
		  : (void *)syscall(SYS_mmap, NULL, table_bytes(cap),
				    PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (v == MAP_FAILED)
		return -ENOMEM;
	rs->v = v;
	rs->cap = cap;
	return 0;
}

/* Where the table is: [*s, *s + len), for whoever must keep off it. */
void rg_storage(const struct sp_regions *rs, uintptr_t *s, size_t *len)
{
	*s = (uintptr_t)rs->v;
	*len = rs->v ? table_bytes(rs->cap) : 0;
}

static void rg_insert_at(struct sp_regions *rs, size_t i,
			 const struct sp_region *r)
{
	memmove(&rs->v[i + 1], &rs->v[i], (rs->n - i) * sizeof(*r));
	rs->v[i] = *r;
	rs->n++;
}

static void rg_delete(struct sp_regions *rs, size_t i, size_t count)
{
	memmove(&rs->v[i], &rs->v[i + count],
		(rs->n - i - count) * sizeof(rs->v[0]));
	rs->n -= count;
}

/* Make x an interval boundary.  Needs room for one more element. */
static void rg_split(struct sp_regions *rs, uintptr_t x)
{
	size_t i = rg_first(rs, x);
	struct sp_region r;

	if (i >= rs->n || rs->v[i].start >= x)
		return;
	r = rs->v[i];
	rs->v[i].end = x;
	r.start = x;
	rg_insert_at(rs, i + 1, &r);
}

static bool rg_same(const struct sp_region *a, const struct sp_region *b)
{
	return a->end == b->start && a->prot == b->prot &&
	       a->flags == b->flags;
}

/* Merge equal neighbours around [i - 1, j + 1]. */
static void rg_coalesce(struct sp_regions *rs, size_t i, size_t j)
{
	size_t k = i ? i - 1 : 0;

	if (j + 1 > rs->n)
		j = rs->n ? rs->n - 1 : 0;
	while (k + 1 < rs->n && k <= j) {
		if (rg_same(&rs->v[k], &rs->v[k + 1])) {
			rs->v[k].end = rs->v[k + 1].end;
			rg_delete(rs, k + 1, 1);
			if (j)
				j--;
		} else {
			k++;
		}
	}
}

void rg_remove(struct sp_regions *rs, uintptr_t s, uintptr_t e)
{
	size_t i, j;

	if (s >= e || rg_reserve(rs, 2) < 0) {
		/* Without room to split, drop every overlapping interval
		 * whole: forgetting a mapping only means merging less. */
		i = rg_first(rs, s);
		for (j = i; j < rs->n && rs->v[j].start < e; j++)
			;
		rg_delete(rs, i, j - i);
		return;
	}
	rg_split(rs, s);
	rg_split(rs, e);
	i = rg_first(rs, s);
	for (j = i; j < rs->n && rs->v[j].start < e; j++)
		;
	rg_delete(rs, i, j - i);
}

int rg_add(struct sp_regions *rs, uintptr_t s, uintptr_t e, int prot,
	   unsigned flags)
{
	struct sp_region r = { s, e, prot, flags };
	size_t i;

	if (s >= e)
		return -EINVAL;
	rg_remove(rs, s, e);
	if (rg_reserve(rs, 1) < 0)
		return -ENOMEM;
	i = rg_first(rs, s);
	rg_insert_at(rs, i, &r);
	rg_coalesce(rs, i, i);
	return 0;
}

int rg_update(struct sp_regions *rs, uintptr_t s, uintptr_t e,
	      unsigned set, unsigned clear, int prot)
{
	size_t i, j;

	if (s >= e)
		return 0;
	if (rg_reserve(rs, 2) < 0)
		return -ENOMEM;
	rg_split(rs, s);
	rg_split(rs, e);
	i = rg_first(rs, s);
	for (j = i; j < rs->n && rs->v[j].start < e; j++) {
		rs->v[j].flags = (rs->v[j].flags | set) & ~clear;
		if (prot >= 0)
			rs->v[j].prot = prot;
	}
	if (j > i)
		rg_coalesce(rs, i, j - 1);
	return 0;
}

bool rg_covered(const struct sp_regions *rs, uintptr_t s, uintptr_t e,
		unsigned flags)
{
	size_t i = rg_first(rs, s);
	uintptr_t at = s;

	for (; i < rs->n && at < e; i++) {
		if (rs->v[i].start > at)
			return false;
		if ((rs->v[i].flags & flags) != flags)
			return false;
		at = rs->v[i].end;
	}
	return at >= e;
}

bool rg_any(const struct sp_regions *rs, uintptr_t s, uintptr_t e,
	    unsigned flags)
{
	for (size_t i = rg_first(rs, s); i < rs->n && rs->v[i].start < e; i++)
		if ((rs->v[i].flags & flags) == flags)
			return true;
	return false;
}

void rg_free(struct sp_regions *rs)
{
	if (rs->v)
		syscall(SYS_munmap, rs->v, table_bytes(rs->cap));
	memset(rs, 0, sizeof(*rs));
}
