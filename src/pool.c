/*
 * pool.c - the pool of canonical pages and its content index.
 *
 * DESIGN
 * The pool is one memfd that only the daemon writes; clients map its pages
 * MAP_PRIVATE, so the kernel does copy-on-write for them.  A slot is one
 * pool page.  Slots come from a bump pointer so that a run of new
 * duplicates gets consecutive slots (one mmap per run in the client);
 * freed slots are reused first-freed-first once enough have piled up.
 *
 * A slot is freed (hole punched) only when the kernel says nobody else
 * maps it: our own mapping is exclusive (pagemap bit 56) AND no other
 * process has a VMA of the pool over it without a private copy in place.
 * The second check matters: fork does not copy page-table entries of a
 * private file mapping that has no anonymous pages yet, so a child can map
 * a slot with no mapcount to show for it (measured on this kernel).
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sp.h"

/* Reuse freed slots once this many have piled up, else bump. */
static const uint32_t reuse_after = 4096;
/* New pool pages are allocated this many at a time, by one
 * MADV_POPULATE_WRITE: a page fault per page costs about 10 us here. */
static const uint32_t populate_ahead = 256;

static int ix_grow(struct pool *p);

int pool_init(struct pool *p, uint64_t bytes)
{
	struct stat st;

	memset(p, 0, sizeof(*p));
	p->fd = memfd_create(SP_POOL_NAME, MFD_CLOEXEC);
	if (p->fd < 0)
		return -errno;
	if (ftruncate(p->fd, (off_t)bytes) < 0 || fstat(p->fd, &st) < 0)
		return -errno;
	p->base = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_NORESERVE, p->fd, 0);
	if (p->base == MAP_FAILED)
		return -errno;
	madvise(p->base, bytes, MADV_NOHUGEPAGE);
	p->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	p->bytes = bytes;
	p->nslots = (uint32_t)(bytes / SP_PAGE);
	p->dev = st.st_dev;
	p->ino = st.st_ino;
	return ix_grow(p);
}

/*
 * The content index: open addressing with linear probing, 8 bytes an
 * entry (the slot, and the low 32 bits of its hash), at most half full.
 * A lookup that misses, as most do while a pass reads pages nobody has
 * seen, stops at an empty entry without touching the slots' metadata:
 * chained buckets cost a cache miss for the bucket and one more for each
 * slot on its chain (16% of the daemon's samples at full speed).
 */
static struct ixent *ix_home(const struct pool *p, uint32_t tag)
{
	return &p->ix[tag & (p->ixcap - 1)];
}

static struct ixent *ix_next(const struct pool *p, struct ixent *e)
{
	return ++e == p->ix + p->ixcap ? p->ix : e;
}

static void ix_put(struct pool *p, uint32_t i, uint32_t tag)
{
	struct ixent *e = ix_home(p, tag);

	while (e->slot1)
		e = ix_next(p, e);
	*e = (struct ixent){ .slot1 = i + 1, .tag = tag };
	p->nindexed++;
}

static int ix_grow(struct pool *p)
{
	struct ixent *old = p->ix, *v;
	uint64_t oldcap = p->ixcap, cap = oldcap ? oldcap * 2 : 8192;

	v = calloc(cap, sizeof(*v));
	if (!v)
		return -ENOMEM;
	p->ix = v;
	p->ixcap = cap;
	p->nindexed = 0;
	for (uint64_t k = 0; k < oldcap; k++)
		if (old[k].slot1)
			ix_put(p, old[k].slot1 - 1, old[k].tag);
	free(old);
	return 0;
}

/* Backward-shift deletion: no tombstones, so misses stay short. */
static void ix_remove(struct pool *p, uint32_t i)
{
	uint64_t mask = p->ixcap - 1, j, k;

	j = (uint64_t)(ix_home(p, (uint32_t)p->s[i].hash) - p->ix);
	while (p->ix[j].slot1 != i + 1) {
		SP_ASSERT(p->ix[j].slot1);
		j = (j + 1) & mask;
	}
	for (k = (j + 1) & mask; p->ix[k].slot1; k = (k + 1) & mask) {
		uint64_t home = p->ix[k].tag & mask;

		/* the entry at k may move back to j unless its home lies
		 * cyclically in (j, k] */
		if (j < k ? (j < home && home <= k) : (j < home || home <= k))
			continue;
		p->ix[j] = p->ix[k];
		j = k;
	}
	p->ix[j] = (struct ixent){ 0 };
	p->nindexed--;
}

/* Start loading where pool_lookup(hash) will look: the scanner hashes
 * the next page meanwhile. */
void pool_prefetch(const struct pool *p, uint64_t hash)
{
	__builtin_prefetch(ix_home(p, (uint32_t)hash));
}

uint32_t pool_lookup(struct pool *p, uint64_t hash, const void *page)
{
	uint32_t tag = (uint32_t)hash;

	for (struct ixent *e = ix_home(p, tag); e->slot1; e = ix_next(p, e)) {
		uint32_t i = e->slot1 - 1;

		if (e->tag == tag && p->s[i].hash == hash &&
		    memcmp(p->base + (uint64_t)i * SP_PAGE, page, SP_PAGE) == 0)
			return i;
	}
	return NO_SLOT;
}

/* The next slot from the bump pointer. */
static uint32_t bump_slot(struct pool *p)
{
	if (p->bump >= p->nslots)
		return NO_SLOT;
	if (p->bump >= p->populated) {
		uint32_t end = p->nslots - p->bump < populate_ahead
				       ? p->nslots : p->bump + populate_ahead;

		/* on failure the pages fault in one by one, as before */
		madvise(p->base + (uint64_t)p->bump * SP_PAGE,
			(uint64_t)(end - p->bump) * SP_PAGE, MADV_POPULATE_WRITE);
		p->populated = end;
	}
	if (p->bump >= p->cap) {
		uint32_t cap = p->cap ? p->cap * 2 : 65536;
		struct slot *s = realloc(p->s, cap * sizeof(*s));

		if (!s)
			return NO_SLOT;
		memset(s + p->cap, 0, (cap - p->cap) * sizeof(*s));
		p->s = s;
		p->cap = cap;
	}
	return p->bump++;
}

static uint32_t take_slot(struct pool *p)
{
	uint32_t nfree = p->nfree - p->fhead;

	if (nfree >= reuse_after || (p->bump >= p->nslots && nfree)) {
		uint32_t i = p->freelist[p->fhead++];

		if (p->fhead == p->nfree)
			p->fhead = p->nfree = 0;
		return i;
	}
	return bump_slot(p);
}

uint32_t pool_alloc(struct pool *p, uint64_t hash, const void *page)
{
	uint32_t i;

	if ((p->nindexed + 1) * 2 > p->ixcap && ix_grow(p) < 0)
		return NO_SLOT;
	i = take_slot(p);
	if (i == NO_SLOT)
		return NO_SLOT;
	memcpy(p->base + (uint64_t)i * SP_PAGE, page, SP_PAGE);
	p->s[i] = (struct slot){ .hash = hash, .used = 1 };
	ix_put(p, i, (uint32_t)hash);
	p->used++;
	return i;
}

/*
 * Blocks.  Every page that merges onto a slot is one mapping in its
 * program, for the pool file's offsets must be consecutive for one
 * mapping to cover consecutive pages.  A run of pages of one content
 * (a pattern a program filled its memory with, say) would cost a
 * mapping per page: 262,144 for a GiB, far past vm.max_map_count (65,530
 * by default), where kernel KSM needs none.  So such content gets a
 * block: copies of its page on consecutive slots, which a run maps
 * block_max pages to a mapping.
 *
 * Copies cost memory, so a block is only as long as the content's
 * references pay for: 2^k copies once it has block_refs * 2^k references
 * and leases (the slot's and its block's).  Blocks that grow are new
 * ones (the slots after a block are taken), and the old stay as long as
 * pages map them: all the copies ever made come to less than 2 / block_refs
 * of the references, about 3%.  A mapping costs the kernel 140 to 230
 * bytes (a vm_area_struct, and an anon_vma once written; measured here),
 * 3.5 to 5.6% of the page it saves.
 */
_Static_assert(sizeof(struct slot) == 24, "a slot's metadata");

static const uint32_t block_max = 64;
static const uint32_t block_refs = 64;

/* The block of index slot i: its length (0: none) and *first. */
uint32_t pool_block(const struct pool *p, uint32_t i, uint32_t *first)
{
	*first = p->s[i].blk;
	return p->s[i].blen;
}

/* References and leases of index slot i and of its block. */
static uint64_t content_refs(const struct pool *p, uint32_t i)
{
	const struct slot *s = &p->s[i];
	uint64_t n = (uint64_t)s->refs + s->lease;

	for (uint32_t j = 0; j < s->blen; j++)
		n += (uint64_t)p->s[s->blk + j].refs + p->s[s->blk + j].lease;
	return n;
}

/*
 * Give index slot i a longer block, if its references pay for one:
 * copies of its page on consecutive slots from the bump pointer.  The
 * old block, if any, stays until nothing maps it.  Returns the length of
 * the block now (0: none) and *first.
 */
uint32_t pool_grow_block(struct pool *p, uint32_t i, uint32_t *first)
{
	uint64_t refs = content_refs(p, i);
	uint32_t want = 1, b;

	while (want < block_max && refs >= (uint64_t)want * 2 * block_refs)
		want *= 2;
	if (want < 2 || want <= p->s[i].blen || p->bump + want > p->nslots)
		return pool_block(p, i, first);
	b = p->bump;
	for (uint32_t j = 0; j < want; j++) {
		uint32_t k = bump_slot(p);

		if (k == NO_SLOT)	/* no memory for the slot table: */
			return pool_block(p, i, first);	/* GC frees these */
		memcpy(p->base + (uint64_t)k * SP_PAGE,
		       p->base + (uint64_t)i * SP_PAGE, SP_PAGE);
		p->s[k] = (struct slot){ .hash = p->s[i].hash, .used = 1,
					 .copy = 1 };
		p->used++;
	}
	p->s[i].blk = b;
	p->s[i].blen = want;
	return pool_block(p, i, first);
}

void pool_ref(struct pool *p, uint32_t i)
{
	SP_ASSERT(i < p->bump && p->s[i].used);
	if (p->s[i].refs++ == 0)
		p->shared++;
	p->total_refs++;
}

void pool_unref(struct pool *p, uint32_t i)
{
	SP_ASSERT(i < p->bump && p->s[i].used && p->s[i].refs > 0);
	if (--p->s[i].refs == 0)
		p->shared--;
	p->total_refs--;
}

uint64_t pool_meta_bytes(const struct pool *p)
{
	return (uint64_t)p->cap * sizeof(struct slot) +
	       p->ixcap * sizeof(struct ixent) +
	       (uint64_t)(p->nfree - p->fhead) * sizeof(uint32_t) +
	       (uint64_t)(p->populated - p->bump) * SP_PAGE + /* not used yet */
	       (uint64_t)(p->used - p->shared) * SP_PAGE; /* nobody's: leased,
							    * or to be freed */
}

/* Mark cand[i] = 1 for slots nobody references in our books and that our
 * own mapping holds exclusively.  Returns how many. */
static uint64_t gc_candidates(struct pool *p, uint8_t *cand)
{
	uint64_t pm[512], n = 0;

	for (uint32_t i = 0; i < p->bump; i += 512) {
		uint32_t k = p->bump - i < 512 ? p->bump - i : 512;

		if (sp_pagemap_read(p->pagemap,
				    (uintptr_t)p->base + (uint64_t)i * SP_PAGE,
				    k, pm) < 0)
			return 0;
		for (uint32_t j = 0; j < k; j++) {
			struct slot *s = &p->s[i + j];

			cand[i + j] = s->used && !s->refs && !s->lease &&
				      (!(pm[j] & PM_PRESENT) ||
				       (pm[j] & PM_EXCL));
			n += cand[i + j];
		}
	}
	return n;
}

/* One VMA of the pool in another process: unmark the slots it uses. */
static void gc_vma(int pmfd, uint64_t start, uint64_t end, uint64_t pgoff,
		   uint32_t bump, uint8_t *cand)
{
	uint64_t pm[512];

	for (uint64_t a = start; a < end && pgoff < bump;) {
		uint64_t k = (end - a) / SP_PAGE;

		if (k > 512)
			k = 512;
		if (pgoff + k > bump)
			k = bump - pgoff;
		if (pmfd < 0 || sp_pagemap_read(pmfd, a, k, pm) < 0) {
			memset(cand + pgoff, 0, k);	/* cannot tell */
		} else {
			for (uint64_t j = 0; j < k; j++)
				if (!(pm[j] & PM_PRESENT) || (pm[j] & PM_FILE))
					cand[pgoff + j] = 0;
		}
		a += k * SP_PAGE;
		pgoff += k;
	}
}

struct pvma {
	uint64_t s, e, off;
};

/*
 * The private mappings of the pool in one process, from its maps, into
 * *v (grown as needed); their number, -1 if the maps cannot be opened
 * (the process is gone, or not ours to read), -2 if they cannot be kept
 * (no memory).
 * A shared mapping is an agent's view of the pool, never a program's
 * memory: the agent reads leased slots there, and empties it once a
 * second (merge.c, agent_drop_view).  A page still present in it shows
 * in our own mapping, not exclusive any more (gc_candidates), and waits.
 */
static long pool_vmas(const struct pool *p, const char *pid,
		      struct pvma **v, size_t *cap)
{
	char path[300], line[512];
	size_t n = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%s/maps", pid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long s, e, off, ino;
		unsigned maj, mnr;
		char perms[8];

		if (!strstr(line, SP_POOL_NAME) ||
		    sscanf(line, "%llx-%llx %7s %llx %x:%x %llu", &s, &e, perms,
			   &off, &maj, &mnr, &ino) != 7 ||
		    ino != p->ino || perms[3] == 's')
			continue;
		if (n == *cap) {
			size_t c = *cap ? 2 * *cap : 64;
			struct pvma *nv = realloc(*v, c * sizeof(**v));

			if (!nv) {
				fclose(f);
				return -2;
			}
			*v = nv;
			*cap = c;
		}
		(*v)[n++] = (struct pvma){ s, e, off };
	}
	fclose(f);
	return (long)n;
}

/*
 * One process: unmark the slots its mappings of the pool use.  The
 * kernel lets go of the process's mmap lock between reads of its maps (a
 * page of text at a time), so a mapping moved meanwhile from an address
 * not read yet to one read already is in neither: a child's mapping of
 * a slot it has not touched (no PTE: only the mapping says it maps the
 * slot) was missed that way, and its slot freed
 * (gc_misses_no_moving_mapping in tests/unit/test_index.c).  So the maps
 * are read until two reads in a row agree: a move during either read
 * makes them differ.  Where they never do (four reads), nothing is freed
 * this time.  Mappings that move over and over, within every read, can
 * still be missed by both: see docs/design.md, Pool lifetime.
 */
static void gc_process(struct pool *p, const char *pid, uint8_t *cand)
{
	static struct pvma *v[2];
	static size_t cap[2];
	long n[2] = { -1, -1 };
	char path[300];
	int pmfd, k = 0;
	bool same = false;

	n[0] = pool_vmas(p, pid, &v[0], &cap[0]);
	for (int t = 1; t < 4 && n[k] >= 0 && !same; t++) {
		k ^= 1;
		n[k] = pool_vmas(p, pid, &v[k], &cap[k]);
		same = n[k] >= 0 && n[k] == n[k ^ 1] &&
		       (!n[k] || memcmp(v[k], v[k ^ 1],
					(size_t)n[k] * sizeof(**v)) == 0);
	}
	if (n[k] == -1)
		return;		/* gone (or not ours to read, as before) */
	if (!same) {	/* kept moving, or no memory: cannot tell */
		log_debug("pid %s: its mappings of the pool not read twice "
			  "alike; nothing freed this time", pid);
		memset(cand, 0, p->bump);
		return;
	}
	snprintf(path, sizeof(path), "/proc/%s/pagemap", pid);
	pmfd = open(path, O_RDONLY | O_CLOEXEC);
	for (long i = 0; i < n[k]; i++)
		gc_vma(pmfd, v[k][i].s, v[k][i].e, v[k][i].off / SP_PAGE,
		       p->bump, cand);
	if (pmfd >= 0)
		close(pmfd);
}

/*
 * Blocks in GC.  A block fewer than a quarter of whose copies are mapped
 * (or about to be) is let go: a run shorter than the block, or pages
 * unmapped since.  Its copies are freed as pages stop mapping them.  A
 * slot in the index and its block are then freed together or not at all:
 * the scanner plans pages onto the block for as long as the slot is in
 * the index.
 */
static void gc_blocks(struct pool *p, uint8_t *cand, bool let_go)
{
	for (uint32_t i = 0; i < p->bump; i++) {
		struct slot *s = &p->s[i];
		uint32_t busy = 0;
		bool all = cand[i];

		if (!s->used || s->copy || !s->blen)
			continue;
		for (uint32_t j = s->blk; j < s->blk + s->blen; j++) {
			busy += p->s[j].refs || p->s[j].lease;
			all = all && cand[j];
		}
		if (let_go && busy * 4 < s->blen) {
			s->blk = s->blen = 0;
			continue;
		}
		if (!all) {
			cand[i] = 0;
			memset(cand + s->blk, 0, s->blen);
		}
	}
}

static void gc_free(struct pool *p, uint32_t i)
{
	if (!p->s[i].copy)
		ix_remove(p, i);
	p->s[i].used = 0;
	p->used--;
	p->freelist[p->nfree++] = i;
}

uint64_t pool_gc(struct pool *p)
{
	uint8_t *cand;
	uint32_t *fl;
	uint64_t freed = 0;
	struct dirent *de;
	char self[32];
	DIR *dir;

	if (!p->bump || p->used == p->shared)
		return 0;
	/* the taken head goes: the list is first-freed-first */
	if (p->fhead) {
		memmove(p->freelist, p->freelist + p->fhead,
			(p->nfree - p->fhead) * sizeof(uint32_t));
		p->nfree -= p->fhead;
		p->fhead = 0;
	}
	cand = calloc(p->bump, 1);
	fl = realloc(p->freelist, (p->nfree + p->bump) * sizeof(uint32_t));
	if (!cand || !fl) {
		free(cand);
		return 0;
	}
	p->freelist = fl;
	if (!gc_candidates(p, cand))
		goto out;
	gc_blocks(p, cand, true);
	if (!memchr(cand, 1, p->bump) || !(dir = opendir("/proc")))
		goto out;
	snprintf(self, sizeof(self), "%d", (int)getpid());
	while ((de = readdir(dir)))
		if (isdigit((unsigned char)de->d_name[0]) &&
		    strcmp(de->d_name, self))
			gc_process(p, de->d_name, cand);
	closedir(dir);
	gc_blocks(p, cand, false);
	/* Consecutive slots in one punch: each walks the pool file's tree
	 * of mappings (every program's pool mappings).  A page a punch cost
	 * 5 us here, 130 to 190 ms a GC once cow-storm's old pages went. */
	for (uint32_t i = 0, j; i < p->bump; i = j) {
		for (; i < p->bump && !cand[i]; i++)
			;
		for (j = i; j < p->bump && cand[j]; j++)
			;
		if (j == i)
			break;
		if (fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      (off_t)i * (off_t)SP_PAGE,
			      (off_t)(j - i) * (off_t)SP_PAGE) < 0) {
			log_warn("punch pool slots %u to %u", i, j - 1);
			continue;
		}
		for (uint32_t k = i; k < j; k++) {
			if (!p->s[k].copy)
				p->s[k].blk = p->s[k].blen = 0;
			gc_free(p, k);
			freed++;
		}
	}
out:
	free(cand);
	return freed;
}
