/* test_index.c - the unstable table and the pool: lookups compare full
 * contents, references count, and GC frees only unmapped slots; and the
 * scanner's reads copy no page shared after fork. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "sp.h"

static uint8_t page[SP_PAGE], other[SP_PAGE];

static void unstable_basics(void **state)
{
	struct unstable u;

	(void)state;
	assert_int_equal(ut_init(&u, 8), 0);
	ut_put(&u, 1, 3, 42);
	for (uint64_t i = 1; i <= 1000; i++)
		ut_put(&u, i * 977, 1, i);
	assert_int_equal(u.n, 1001);	/* grew */
	assert_int_equal(ut_find(&u, 1)->addr, 42);	/* kept through growing */
	assert_int_equal(ut_find(&u, 1)->client, 3);
	assert_non_null(ut_find(&u, 977 * 500));
	assert_int_equal(ut_find(&u, 977 * 500)->addr, 500);
	ut_del(&u, ut_find(&u, 977 * 500));
	assert_null(ut_find(&u, 977 * 500));
	ut_put(&u, 977 * 500, 2, 5);	/* reuses the tombstone */
	assert_int_equal(ut_find(&u, 977 * 500)->client, 2);
	assert_int_equal(ut_find(&u, 977 * 500)->addr, 5);
	for (int k = 0; k < 100000; k++) {	/* churn: must not fill up */
		ut_put(&u, 5000000 + (uint64_t)k, 1, 0);
		ut_del(&u, ut_find(&u, 5000000 + (uint64_t)k));
	}
	ut_clear(&u);
	assert_int_equal(u.n, 0);
	assert_null(ut_find(&u, 977));
	free(u.v);
}

static void pool_lookup_compares_content(void **state)
{
	struct pool p;
	uint32_t a, b;
	uint64_t meta;

	(void)state;
	assert_int_equal(pool_init(&p, 64 << 20), 0);
	memset(page, 1, sizeof(page));
	memset(other, 2, sizeof(other));
	a = pool_alloc(&p, 42, page);
	assert_int_not_equal(a, NO_SLOT);
	/* same hash, other content: a collision must not match */
	assert_int_equal(pool_lookup(&p, 42, other), NO_SLOT);
	b = pool_alloc(&p, 42, other);
	assert_int_equal(b, a + 1);	/* runs get consecutive slots */
	assert_int_equal(pool_lookup(&p, 42, other), b);
	assert_int_equal(pool_lookup(&p, 42, page), a);
	assert_memory_equal(p.base + (uint64_t)a * SP_PAGE, page, SP_PAGE);
	meta = pool_meta_bytes(&p);	/* a and b nobody's: metadata */
	pool_ref(&p, a);
	pool_ref(&p, a);
	assert_int_equal(p.shared, 1);
	assert_int_equal(p.total_refs, 2);
	assert_int_equal(pool_meta_bytes(&p), meta - SP_PAGE);
	pool_unref(&p, a);
	pool_unref(&p, a);
	assert_int_equal(p.shared, 0);
	assert_int_equal(pool_meta_bytes(&p), meta);
}

/*
 * The content index through growth, and removal from the middle of long
 * probe runs: hashes that share their low 32 bits (the index's tag) in
 * groups of 16, and homes crowded into the last 4,000 entries, whatever
 * the index's size, so that runs wrap round its end.
 */
static uint64_t ix_hash(uint32_t k)
{
	return ((uint64_t)k << 32) | (0xffffffffu - (k / 16) * 97u % 4000u);
}

static void ix_page(uint8_t *pg, uint32_t k)
{
	memset(pg, 0, SP_PAGE);
	memcpy(pg, &k, sizeof(k));
}

static void pool_index_survives_growth_and_removal(void **state)
{
	enum { n = 30000 };
	static uint32_t slot[n];
	struct pool p;

	(void)state;
	assert_int_equal(pool_init(&p, 256 << 20), 0);
	for (uint32_t k = 0; k < n; k++) {
		ix_page(page, k);
		slot[k] = pool_alloc(&p, ix_hash(k), page);
		assert_int_not_equal(slot[k], NO_SLOT);
		if (k % 3)
			pool_ref(&p, slot[k]);
	}
	assert_true(p.ixcap >= 2 * n);	/* grew from 8192 */
	assert_int_equal(pool_gc(&p), n / 3);	/* every third: unreferenced */
	assert_int_equal(p.nindexed, n - n / 3);
	for (uint32_t k = 0; k < n; k++) {
		ix_page(page, k);
		assert_int_equal(pool_lookup(&p, ix_hash(k), page),
				 k % 3 ? slot[k] : NO_SLOT);
	}
	/* the freed ones come back, first on the slots freed first (all
	 * 10,000 are reused but the last 4,095) */
	for (uint32_t k = 0, reused = 0, before = p.bump; k < n; k += 3) {
		uint32_t was = slot[k];

		ix_page(page, k);
		slot[k] = pool_alloc(&p, ix_hash(k), page);
		assert_int_not_equal(slot[k], NO_SLOT);
		reused += slot[k] < before;
		if (k < 3 * 5000)
			assert_int_equal(slot[k], was);
		if (k + 3 >= n)
			assert_int_equal(reused, n / 3 - 4095);
	}
	for (uint32_t k = 0; k < n; k++) {
		ix_page(page, k);
		assert_int_equal(pool_lookup(&p, ix_hash(k), page), slot[k]);
		ix_page(other, k + n);	/* same hash, other bytes */
		assert_int_equal(pool_lookup(&p, ix_hash(k), other), NO_SLOT);
	}
}

/* A new pool with two slots side by side, of bytes `fill` and fill + 1
 * (hashes 1 and 2): a, and b = a + 1. */
static void two_slots(struct pool *p, uint32_t *a, uint32_t *b, int fill)
{
	assert_int_equal(pool_init(p, 64 << 20), 0);
	memset(page, fill, sizeof(page));
	memset(other, fill + 1, sizeof(other));
	*a = pool_alloc(p, 1, page);
	*b = pool_alloc(p, 2, other);
	assert_int_equal(*b, *a + 1);
}

static void gc_spares_mapped_slots(void **state)
{
	struct pool p;
	uint32_t a, b;
	uint8_t *m;
	pid_t pid;
	int up[2], down[2];	/* child->parent, parent->child */
	char c;

	(void)state;
	two_slots(&p, &a, &b, 3);
	/* A child maps slot a privately without touching it: no PTE, no
	 * mapcount; GC must still see its VMA and spare the slot. */
	assert_int_equal(pipe(up), 0);
	assert_int_equal(pipe(down), 0);
	pid = fork();
	if (pid == 0) {
		/* Drop the inherited daemon-side view: fork copies no PTEs
		 * for it, so it would pin every slot (rightly) in GC. */
		munmap(p.base, p.bytes);
		m = mmap(NULL, SP_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE,
			 p.fd, (off_t)a * SP_PAGE);
		if (write(up[1], "x", 1) != 1)
			_exit(1);
		if (read(down[0], &c, 1) != 1)
			_exit(1);
		_exit(m[0] == 3 ? 0 : 2);	/* zeros if punched */
	}
	assert_int_equal(read(up[0], &c, 1), 1);
	assert_int_equal(pool_gc(&p), 1);	/* b only */
	assert_int_equal(pool_lookup(&p, 2, other), NO_SLOT);
	assert_int_equal(pool_lookup(&p, 1, page), a);
	assert_int_equal(write(down[1], "y", 1), 1);
	{
		int st;

		assert_int_equal(waitpid(pid, &st, 0), pid);
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	}
	assert_int_equal(pool_gc(&p), 1);	/* now a too */
	(void)b;
}

/*
 * An agent's view of the pool (a shared, read-only mapping of all of it)
 * does not keep slots from being freed: only a page present in it does,
 * which shows in the daemon's own mapping (not exclusive).  Until
 * 2026-12-05 every view kept every slot, and the pool never shrank while
 * a program lived.
 */
static void gc_passes_over_views(void **state)
{
	struct pool p;
	uint32_t a, b;
	uint8_t *v;
	pid_t pid;
	int up[2], down[2];
	char c;

	(void)state;
	two_slots(&p, &a, &b, 6);
	assert_int_equal(pipe(up), 0);
	assert_int_equal(pipe(down), 0);
	pid = fork();
	if (pid == 0) {
		volatile uint8_t x;

		close(up[0]);	/* EOF, not a hang, if the parent fails */
		close(down[1]);
		munmap(p.base, p.bytes);
		v = mmap(NULL, p.bytes, PROT_READ, MAP_SHARED | MAP_NORESERVE,
			 p.fd, 0);
		if (v == MAP_FAILED)
			_exit(1);
		x = v[(size_t)a * SP_PAGE];	/* a present in the view */
		(void)x;
		if (write(up[1], "x", 1) != 1 || read(down[0], &c, 1) != 1)
			_exit(1);
		/* the view emptied, as the agent does (b too: fault-around
		 * may have mapped it beside a) */
		madvise(v + (size_t)a * SP_PAGE, 2 * SP_PAGE, MADV_DONTNEED);
		if (write(up[1], "x", 1) != 1 || read(down[0], &c, 1) != 1)
			_exit(1);
		_exit(0);
	}
	assert_int_equal(read(up[0], &c, 1), 1);
	/* fault-around may have mapped b beside a: then neither goes */
	{
		uint64_t freed = pool_gc(&p);

		assert_true(freed <= 1);
		assert_true(p.s[a].used);
		assert_int_equal(pool_lookup(&p, 1, page), a);
	}
	assert_int_equal(write(down[1], "y", 1), 1);
	assert_int_equal(read(up[0], &c, 1), 1);	/* a dropped */
	pool_gc(&p);
	assert_false(p.s[a].used);
	assert_false(p.s[b].used);
	assert_int_equal(p.used, 0);
	assert_int_equal(write(down[1], "y", 1), 1);
	{
		int st;

		assert_int_equal(waitpid(pid, &st, 0), pid);
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	}
}

/*
 * A mapping of the pool that moves while GC reads the maps.  The kernel
 * lets go of a process's mmap lock between reads of its maps (a page of
 * text at a time), so a mapping moved from an address not yet read to
 * one already read is in neither.  A child maps slot a privately without
 * touching it (no PTE: only its VMA says it maps the slot), behind 600
 * mappings of its own, and moves it from one end to the other and back,
 * a move every 5 ms.  GC must never free slot a.  With one read of the
 * maps it did within 400 GCs; it reads them until two reads agree now.
 * A move during each of two reads in a row can still beat that (moves
 * without pause did: docs/design.md, Pool lifetime).
 */
static void gc_misses_no_moving_mapping(void **state)
{
	enum { PAD = 1200 };
	struct pool p;
	uint32_t a, b;
	uint8_t *r, *lo, *hi;
	pid_t pid;
	int up[2];
	char c;

	(void)state;
	two_slots(&p, &a, &b, 8);
	assert_int_equal(pipe(up), 0);
	pid = fork();
	if (pid == 0) {
		close(up[0]);
		munmap(p.base, p.bytes);
		r = mmap(NULL, PAD * SP_PAGE, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (r == MAP_FAILED)
			_exit(1);
		for (size_t i = 1; i < PAD - 1; i += 2)	/* 600 VMAs */
			mprotect(r + i * SP_PAGE, SP_PAGE, PROT_READ);
		lo = r;
		hi = r + (PAD - 1) * SP_PAGE;
		if (mmap(lo, SP_PAGE, PROT_READ, MAP_PRIVATE | MAP_FIXED, p.fd,
			 (off_t)a * SP_PAGE) != lo ||
		    write(up[1], "x", 1) != 1)
			_exit(1);
		for (;;) {
			if (mremap(lo, SP_PAGE, SP_PAGE,
				   MREMAP_MAYMOVE | MREMAP_FIXED, hi) != hi)
				_exit(1);
			usleep(5000);
			if (mremap(hi, SP_PAGE, SP_PAGE,
				   MREMAP_MAYMOVE | MREMAP_FIXED, lo) != lo)
				_exit(1);
			usleep(5000);
		}
	}
	close(up[1]);
	assert_int_equal(read(up[0], &c, 1), 1);
	for (int i = 0; i < 400 && p.s[a].used; i++)
		pool_gc(&p);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	assert_true(p.s[a].used);	/* never freed while mapped */
	assert_false(p.s[b].used);
	assert_int_equal(pool_gc(&p), 1);	/* a once the child is gone */
}

/*
 * Blocks: copies of a slot's page on consecutive slots, made only once
 * its references pay for them (64 a copy), freed with the slot or let
 * go when few of them are mapped.
 */
static void pool_blocks(void **state)
{
	struct pool p;
	uint32_t a, first, len, old;

	(void)state;
	assert_int_equal(pool_init(&p, 64 << 20), 0);
	memset(page, 5, sizeof(page));
	a = pool_alloc(&p, 7, page);
	assert_int_equal(pool_block(&p, a, &first), 0);
	for (int i = 0; i < 127; i++)
		pool_ref(&p, a);
	assert_int_equal(pool_grow_block(&p, a, &first), 0);	/* 127 */
	pool_ref(&p, a);
	len = pool_grow_block(&p, a, &first);
	assert_int_equal(len, 2);	/* 128 references: 2 copies */
	assert_int_equal(first, a + 1);
	assert_int_equal(p.used, 3);
	for (uint32_t j = 0; j < len; j++) {
		assert_memory_equal(p.base + (uint64_t)(first + j) * SP_PAGE,
				    page, SP_PAGE);
		assert_true(p.s[first + j].copy);
	}
	assert_int_equal(pool_lookup(&p, 7, page), a);	/* never a copy */
	/* 1,024 references: straight to 16 copies, after the old block */
	for (int i = 0; i < 1024 - 128; i++)
		pool_ref(&p, a);
	old = first;
	assert_int_equal(pool_grow_block(&p, a, &first), 16);
	assert_int_equal(first, old + 2);
	/* half the new block mapped, the old one not: GC frees the old
	 * copies only; the slot and its block stay */
	for (uint32_t j = 0; j < 8; j++)
		pool_ref(&p, first + j);
	assert_int_equal(pool_gc(&p), 2);
	assert_false(p.s[old].used);
	assert_int_equal(pool_block(&p, a, &first), 16);
	/* all references gone but 2 of 16: the block is let go, and every
	 * copy nothing maps is freed, and the slot, which nothing maps */
	for (int i = 0; i < 1024; i++)
		pool_unref(&p, a);
	for (uint32_t j = 2; j < 8; j++)
		pool_unref(&p, first + j);
	assert_int_equal(pool_gc(&p), 15);
	assert_false(p.s[a].used);
	assert_true(p.s[first].used && p.s[first + 1].used);
	assert_int_equal(pool_lookup(&p, 7, page), NO_SLOT);
	pool_unref(&p, first);
	pool_unref(&p, first + 1);
	assert_int_equal(pool_gc(&p), 2);
	assert_int_equal(p.used, 0);
}

/*
 * A child shares 8 pages with this process since fork, writes 2 of them
 * (its own now), and has one unmapped.  sp_read_pages reads them all from
 * the child, the one unmapped excepted, and leaves the shared ones
 * shared: process_vm_readv would have copied them in the child.
 */
/*
 * Pages read in runs: consecutive pages go in one piece of one
 * process_vm_readv (the kernel takes the program's mmap lock once per
 * piece, not once per page), others on their own; every byte lands
 * where its page's index says.  A page gone since pagemap was read ends
 * the read there: the pages before it are read, none after.
 */
static void read_pages_in_runs(void **state)
{
	enum { N = 16 };
	uint8_t *p = mmap(NULL, N * SP_PAGE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *buf = malloc(N * SP_PAGE), ok[N];
	static const int pick[] = { 0, 1, 2, 5, 6, 9, 10, 11, 12, 15 };
	enum { NP = sizeof(pick) / sizeof(pick[0]) };
	uint64_t pm[N];
	uintptr_t at[N];

	(void)state;
	assert_true(p != MAP_FAILED && buf);
	for (int i = 0; i < N; i++) {
		memset(p + i * SP_PAGE, 'a' + i, SP_PAGE);
		pm[i] = PM_PRESENT | PM_EXCL;
	}
	for (int k = 0; k < NP; k++)
		at[k] = (uintptr_t)p + (uintptr_t)pick[k] * SP_PAGE;
	memset(buf, 0, N * SP_PAGE);
	assert_int_equal(sp_read_pages(getpid(), -1, at, pm, NP, buf, ok), NP);
	for (int k = 0; k < NP; k++) {
		assert_int_equal(ok[k], 1);
		assert_memory_equal(buf + k * SP_PAGE, p + pick[k] * SP_PAGE,
				    SP_PAGE);
	}
	/* page 7 unmapped after pagemap said present */
	assert_int_equal(munmap(p + 7 * SP_PAGE, SP_PAGE), 0);
	for (int i = 0; i < N; i++)
		at[i] = (uintptr_t)p + (uintptr_t)i * SP_PAGE;
	memset(buf, 0, N * SP_PAGE);
	assert_int_equal(sp_read_pages(getpid(), -1, at, pm, N, buf, ok), 7);
	for (int i = 0; i < N; i++) {
		assert_int_equal(ok[i], i < 7);
		if (i < 7)
			assert_memory_equal(buf + i * SP_PAGE,
					    p + i * SP_PAGE, SP_PAGE);
	}
	munmap(p, N * SP_PAGE);
	free(buf);
}

static void read_pages_copies_nothing(void **state)
{
	enum { N = 8 };
	uint8_t *p = mmap(NULL, N * SP_PAGE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *buf = malloc(N * SP_PAGE), ok[N], c = 0;
	uint64_t pm[N];
	uintptr_t at[N];
	int go[2], ready[2], mem, pmfd;
	char path[64];
	pid_t pid;

	(void)state;
	assert_true(p != MAP_FAILED && buf);
	for (int i = 0; i < N; i++)
		memset(p + i * SP_PAGE, 'a' + i, SP_PAGE);
	assert_int_equal(pipe(go), 0);
	assert_int_equal(pipe(ready), 0);
	pid = fork();
	if (pid == 0) {
		close(go[1]);	/* EOF on go when the parent is done */
		close(ready[0]);
		p[2 * SP_PAGE] = 'X';	/* its own copy */
		p[6 * SP_PAGE] = 'Y';
		munmap(p + 4 * SP_PAGE, SP_PAGE);
		if (write(ready[1], &c, 1) != 1 || read(go[0], &c, 1) < 0)
			_exit(1);	/* read: 0 at EOF */
		_exit(0);
	}
	close(go[0]);
	close(ready[1]);
	assert_int_equal(read(ready[0], &c, 1), 1);
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	pmfd = open(path, O_RDONLY);
	snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
	mem = open(path, O_RDONLY);
	assert_true(pmfd >= 0 && mem >= 0);
	assert_int_equal(sp_pagemap_read(pmfd, (uintptr_t)p, N, pm), 0);
	for (int i = 0; i < N; i++) {
		at[i] = (uintptr_t)p + (uintptr_t)i * SP_PAGE;
		if (i == 2 || i == 6)
			assert_true(pm[i] & PM_EXCL);
		else if (i != 4)
			assert_false(pm[i] & PM_EXCL);	/* shared */
	}
	assert_int_equal(sp_read_pages(pid, mem, at, pm, N, buf, ok), N - 1);
	for (int i = 0; i < N; i++) {
		uint8_t want = i == 2 ? 'X' : i == 6 ? 'Y' : (uint8_t)('a' + i);

		assert_int_equal(ok[i], i != 4);
		if (i != 4)
			assert_int_equal(buf[i * SP_PAGE], want);
	}
	assert_int_equal(sp_pagemap_read(pmfd, (uintptr_t)p, N, pm), 0);
	for (int i = 0; i < N; i++)
		if (i != 2 && i != 4 && i != 6)
			assert_false(pm[i] & PM_EXCL);	/* still shared */
	close(go[1]);
	close(ready[0]);
	assert_int_equal(waitpid(pid, NULL, 0), pid);
	close(pmfd);
	close(mem);
	free(buf);
	munmap(p, N * SP_PAGE);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(unstable_basics),
		cmocka_unit_test(pool_blocks),
		cmocka_unit_test(pool_lookup_compares_content),
		cmocka_unit_test(pool_index_survives_growth_and_removal),
		cmocka_unit_test(gc_spares_mapped_slots),
		cmocka_unit_test(gc_passes_over_views),
		cmocka_unit_test(gc_misses_no_moving_mapping),
		cmocka_unit_test(read_pages_in_runs),
		cmocka_unit_test(read_pages_copies_nothing),
	};

	log_init(LOG_TO_STDERR, 0, "test_index");
	return cmocka_run_group_tests_name("index", tests, NULL, NULL);
}
