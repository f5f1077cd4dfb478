/*
 * scan.c - the scanner: walk the registered pages of every client, a
 * budget of pages per wake-up as ksmd does, and plan merges.
 *
 * DESIGN
 * Per chunk of a range: read the client's pagemap, skip pages that are
 * not present (reading them would allocate them on this kernel) or
 * already merged; read the rest (sp_read_pages: pages shared after fork
 * without copying them) and hash them with xxh3.  A page equal to a pool
 * page (full compare) is planned onto it, when first seen as KSM merges a
 * page equal to one in its stable tree.  Otherwise a page is a candidate
 * when first read, or once its hash is unchanged since the previous pass:
 * one seen to change waits a pass (the volatility filter; KSM puts even
 * a page it has never read through it, for its unstable tree is sorted
 * by content, where this table is keyed by hash and a pair is compared in
 * full).  An all-zero candidate is planned as a zero page; one equal
 * to a page in the unstable table (re-read and compared in full) gets a
 * new pool slot, and both are planned onto it, unless they are one frame
 * shared after fork.  Plans for consecutive
 * pages with consecutive slots become one item: one mapping in the client.
 * A run of pages of one content goes onto a block of copies of its page
 * (pool.c), so that it too is one mapping per block.
 * The agent compares again before anything is replaced.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kernel-page-flags.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "hash.h"
#include "sp.h"

#define CHUNK 512
/* Pages visited per wake-up, present or not, per page of the budget. */
static const uint64_t visit_factor = 16;
/* A client busy this long is left out of the pass, so that one stuck
 * agent cannot hold up the others. */
const uint64_t sp_busy_skip_ms = 1000;
/* Least time between two garbage collections of the pool. */
static const uint64_t gc_interval_ms = 1000;

/*
 * The kernel's shared zero page as pagemap shows it: a read of fresh
 * anonymous memory maps it, not mapped exclusively.  0 where a read
 * allocates a page of the reader's own (pvm_no_zero_page) or PFNs are
 * hidden (no CAP_SYS_ADMIN).
 */
static uint64_t zero_pfn(void)
{
	uint8_t *p = mmap(NULL, SP_PAGE, PROT_READ,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t pm = 0;

	if (p != MAP_FAILED && fd >= 0) {
		(void)*(volatile uint8_t *)p;
		if (sp_pagemap_read(fd, (uintptr_t)p, 1, &pm) < 0)
			pm = 0;
	}
	if (fd >= 0)
		close(fd);
	if (p != MAP_FAILED)
		munmap(p, SP_PAGE);
	return (pm & PM_PRESENT) && !(pm & PM_EXCL) ? PM_PFN(pm) : 0;
}

/*
 * The scanner's state in d: its read buffer, the hash of a page of
 * zeros, the zero page's frame, /proc/kpageflags (or -1: see
 * zeros_of_its_own), the pool
 * (pool_bytes of file) and the unstable table.  0, or -1.
 */
int scan_init(struct daemon *d, uint64_t pool_bytes)
{
	d->buf = aligned_alloc(SP_PAGE, SP_ITEM_PAGES * SP_PAGE);
	d->cmp = aligned_alloc(SP_PAGE, SP_PAGE);
	if (!d->buf || !d->cmp)
		return -1;
	memset(d->cmp, 0, SP_PAGE);
	d->zero_hash = XXH3_64bits(d->cmp, SP_PAGE);
	d->zero_pfn = zero_pfn();
	d->kpageflags = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
	if (pool_init(&d->pool, pool_bytes) < 0 ||
	    ut_init(&d->ut, 1 << 16) < 0)
		return -1;
	return 0;
}

/*
 * The slot to map the page at addr onto, for content at index slot i.
 * Without a block that is i.  A run of pages of one content goes onto
 * consecutive copies of its block (pool.c, pool_block), which the run
 * makes longer as the content's references pay for it, and from its
 * start again at the block's end: one mapping per block, not per page.
 */
static uint32_t target_slot(struct daemon *d, struct client *c,
			    uint64_t addr, uint32_t i)
{
	bool cont = c->run_addr && addr == c->run_addr + SP_PAGE &&
		    i == c->run_slot;
	uint32_t blk, len = pool_block(&d->pool, i, &blk);

	if (cont && len && c->run_blk == blk && c->run_off + 1 < len) {
		c->run_off++;
	} else {
		if (cont)
			len = pool_grow_block(&d->pool, i, &blk);
		c->run_off = 0;
	}
	c->run_addr = addr;
	c->run_slot = i;
	c->run_blk = len ? blk : NO_SLOT;
	return len ? blk + c->run_off : i;
}

static void plan(struct daemon *d, struct client *c, struct pstate *st,
		 uint64_t addr, uint32_t kind, uint32_t slot)
{
	struct sp_item *last = c->npend ? &c->pend[c->npend - 1] : NULL;

	st->flags |= PS_INFLIGHT;
	if (kind == SP_ITEM_POOL) {
		slot = target_slot(d, c, addr, slot);
		d->pool.s[slot].lease++;
		d->pool.leased++;
	}
	if (last && last->kind == kind &&
	    last->addr + last->npages * SP_PAGE == addr &&
	    last->npages < SP_ITEM_PAGES &&
	    (kind == SP_ITEM_ZERO || last->pgoff + last->npages == slot)) {
		last->npages++;
		return;
	}
	if (c->npend == SP_BATCH_ITEMS)
		scan_flush(d, c);
	c->pend[c->npend++] = (struct sp_item){
		.addr = addr, .pgoff = slot, .npages = 1, .kind = kind,
	};
}

void scan_flush(struct daemon *d, struct client *c)
{
	struct {
		struct sp_merge h;
		struct sp_item it[SP_BATCH_ITEMS];
	} m;
	struct batch *b;

	if (!c->npend)
		return;
	b = malloc(sizeof(*b));
	SP_ASSERT(b);
	b->id = ++c->next_batch;
	b->nitems = c->npend;
	memcpy(b->items, c->pend, c->npend * sizeof(struct sp_item));
	m.h.batch = b->id;
	m.h.nitems = b->nitems;
	memcpy(m.it, b->items, b->nitems * sizeof(struct sp_item));
	c->npend = 0;
	if (sp_send(c->fd, SP_MERGE, &m,
		    sizeof(m.h) + b->nitems * sizeof(struct sp_item)) < 0) {
		for (uint32_t i = 0; i < b->nitems; i++)
			client_apply(d, c, &b->items[i], NULL);
		free(b);
		return;
	}
	b->next = c->inflight;
	c->inflight = b;
	c->ninflight++;
}

/* More than 1,000 copy-on-write breaks seen in a second: busy for 2 s. */
static void cow_seen(struct client *c)
{
	uint64_t now = sp_now_ms();

	if (now - c->cow_win_ms >= 1000) {
		c->cow_win_ms = now;
		c->cow_in_win = 0;
	}
	if (++c->cow_in_win > 1000)
		c->cow_busy_until_ms = now + 2000;
}

/* Is this page worth reading?  Also notices merges that ended. */
static bool classify(struct daemon *d, struct client *c, struct pstate *st,
		     uint64_t pm)
{
	if (st->flags & PS_INFLIGHT)
		return false;
	if (!(pm & PM_PRESENT)) {
		client_release(c, &d->pool, st);	/* unmapped, dropped */
		/* a new page next */
		st->flags &= ~(uint32_t)(PS_IMMOVABLE | PS_WRITTEN) &
			     ((1u << PS_WAIT_SHIFT) - 1);
		return false;
	}
	if (st->flags & PS_IMMOVABLE)
		return false;
	if (st->flags >> PS_WAIT_SHIFT) {	/* pinned: a pass less */
		st->flags -= 1u << PS_WAIT_SHIFT;
		return false;
	}
	if (pm & PM_FILE)
		return false;		/* a pool page: still merged */
	if (ST_IS_POOL(st->slot)) {	/* CoW broken: written after merging */
		client_release(c, &d->pool, st);
		st->flags |= PS_WRITTEN;
		cow_seen(c);
	}
	/* To merge such a page again the agent must make it anonymous
	 * again, with a fork that holds the program's mmap lock
	 * (merge.c, agent_merge_again): not while the program is breaking
	 * copy-on-write by the thousand (its writes would wait). */
	if ((st->flags & PS_WRITTEN) && sp_now_ms() < c->cow_busy_until_ms)
		return false;
	if (!(pm & PM_EXCL) &&
	    (st->slot == ST_ZERO || !PM_PFN(pm) || PM_PFN(pm) == d->zero_pfn))
		return false;	/* the zero page, or PFNs hidden: cannot tell */
	/* Otherwise a page of the program's own, maybe shared after fork
	 * (not exclusive: the agent gives it a copy of its own first, as a
	 * write would, and merges that); or a zero page written. */
	client_release(c, &d->pool, st);
	return true;
}

/*
 * A page of zeros not mapped exclusively: a frame of zeros a parent and
 * its child share since fork, to be merged as any other, or a zero page
 * of the kernel's, which costs nothing and must be left alone.  classify
 * knows the zero page's frame where a read of fresh memory maps it, but
 * not the huge zero page's (a read of a THP range).  /proc/kpageflags
 * tells (KPF_ZERO_PAGE, both kinds); without it such pages are left
 * alone.
 */
static bool zeros_of_its_own(const struct daemon *d, uint64_t pm)
{
	uint64_t f;

	return d->kpageflags >= 0 && PM_PFN(pm) &&
	       pread(d->kpageflags, &f, sizeof(f),
		     (off_t)(PM_PFN(pm) * sizeof(f))) == (ssize_t)sizeof(f) &&
	       !(f >> KPF_ZERO_PAGE & 1);
}

/*
 * The other page of a pair, at oaddr in oc, as pagemap shows it now, not
 * as when it went into the unstable table: a fork since then shares it
 * with the child, and then it must be read through mem (sp_read_pages),
 * and two pages that are both not mapped exclusively may be one frame,
 * shared by a parent and its child: merging them would save nothing.
 * So pages that are both shared pair only when pagemap shows two
 * frames, neither the zero page; and a shared page of zeros, as the page
 * in hand (handle_page), only once kpageflags shows it is not one of the
 * kernel's zero pages.  A page no longer present is not read (that would
 * allocate it on this kernel).
 */
static bool may_pair(struct daemon *d, struct client *oc, uint64_t oaddr,
		     uint64_t pm, bool zeros, uint64_t *opm)
{
	if (sp_pagemap_read(oc->pagemap, oaddr, 1, opm) < 0 ||
	    (*opm & (PM_PRESENT | PM_FILE)) != PM_PRESENT)
		return false;
	if (*opm & PM_EXCL)
		return true;
	return PM_PFN(*opm) && PM_PFN(*opm) != d->zero_pfn &&
	       ((pm & PM_EXCL) || PM_PFN(*opm) != PM_PFN(pm)) &&
	       (!zeros || zeros_of_its_own(d, *opm));
}

static bool try_pair(struct daemon *d, struct client *c, struct pstate *st,
		     uint64_t addr, const uint8_t *page, uint64_t h,
		     uint64_t pm, struct ut_entry *e)
{
	struct client *oc = client_by_id(d, e->client);
	struct pstate *ost;
	uint64_t opm;
	uintptr_t oaddr;
	uint8_t ok;
	uint32_t slot;

	if (!oc || oc->ninflight >= SP_MAX_INFLIGHT)
		return false;
	ost = client_page(oc, e->addr);
	if (!ost || (ost->flags & PS_INFLIGHT) || ost->slot != ST_NONE ||
	    ost->hash != h)
		return false;
	if (!may_pair(d, oc, e->addr, pm,
		      h == d->zero_hash && sp_page_is_zero(page), &opm))
		return false;
	oaddr = (uintptr_t)e->addr;
	if (sp_read_pages(oc->pid, oc->mem, &oaddr, &opm, 1, d->cmp, &ok) != 1 ||
	    memcmp(d->cmp, page, SP_PAGE) != 0)
		return false;
	slot = pool_alloc(&d->pool, h, page);
	if (slot == NO_SLOT)
		return false;
	plan(d, oc, ost, e->addr, SP_ITEM_POOL, slot);
	plan(d, c, st, addr, SP_ITEM_POOL, slot);
	ut_del(&d->ut, e);
	return true;
}

static void handle_page(struct daemon *d, struct client *c, uint64_t addr,
			struct pstate *st, const uint8_t *page, uint64_t pm,
			uint64_t h)
{
	bool changed = (st->flags & PS_SEEN) && st->hash != h;
	struct ut_entry *e;
	uint32_t slot;

	if (changed)
		d->volatile_cur++;
	st->hash = h;
	st->flags |= PS_SEEN;
	if (c->ninflight >= SP_MAX_INFLIGHT)
		return;
	/* A page seen to change since the last pass is written to: it
	 * pairs with no other page until its hash holds still a pass.  A
	 * page equal to a pool page merges all the same, as KSM merges one
	 * equal to a page of its stable tree; but not one of zeros (it may
	 * be one of the kernel's zero pages, below). */
	if (changed) {
		slot = h == d->zero_hash && sp_page_is_zero(page)
			       ? NO_SLOT : pool_lookup(&d->pool, h, page);
		if (slot != NO_SLOT)
			plan(d, c, st, addr, SP_ITEM_POOL, slot);
		return;
	}
	/* Seen for the first time, or unchanged: a candidate. */
	if (h == d->zero_hash && sp_page_is_zero(page)) {
		if (!(pm & PM_EXCL) && !zeros_of_its_own(d, pm))
			return;
		if (d->use_zero_pages) {
			plan(d, c, st, addr, SP_ITEM_ZERO, 0);
			return;
		}
	}
	slot = pool_lookup(&d->pool, h, page);
	if (slot != NO_SLOT) {
		plan(d, c, st, addr, SP_ITEM_POOL, slot);
		return;
	}
	e = ut_find(&d->ut, h);
	if (e && !(e->client == c->id && e->addr == addr) &&
	    try_pair(d, c, st, addr, page, h, pm, e))
		return;
	ut_put(&d->ut, h, c->id, addr);
}

/* The hash of a page, and where handle_page will look for it loaded
 * meanwhile: the pool's index always, the unstable table only for a
 * page read for the first time or whose hash held still (the only ones
 * looked up there). */
static uint64_t next_hash(struct daemon *d, const uint8_t *page, bool ok,
			  const struct pstate *st)
{
	uint64_t h;

	if (!ok)
		return 0;
	h = XXH3_64bits(page, SP_PAGE);
	pool_prefetch(&d->pool, h);
	if (!(st->flags & PS_SEEN) || st->hash == h)
		ut_prefetch(&d->ut, h);
	return h;
}

/*
 * Scan pages [first, first + n) of r; returns pages read.  *done: pages
 * of the n dealt with.  It stops short at a page that comes when the
 * client has SP_MAX_INFLIGHT batches out: that page is scanned again,
 * from where the scan stopped, once the agent has answered.
 */
static uint64_t scan_chunk(struct daemon *d, struct client *c,
			  struct drange *r, uint64_t first, uint64_t n,
			  uint64_t *done)
{
	static uint64_t pm[CHUNK], cpm[CHUNK];
	static uint32_t idx[CHUNK];
	static uintptr_t at[CHUNK];
	static uint8_t ok[CHUNK];
	uint64_t base = r->start + first * SP_PAGE, nc = 0, k, got = 0, h;

	*done = n;
	if (sp_pagemap_read(c->pagemap, base, n, pm) < 0)
		return 0;
	for (uint64_t i = 0; i < n; i++) {
		if (!classify(d, c, &r->st[first + i], pm[i]))
			continue;
		idx[nc] = (uint32_t)i;
		at[nc] = (uintptr_t)(base + i * SP_PAGE);
		cpm[nc] = pm[i];
		nc++;
	}
	if (!nc || !sp_read_pages(c->pid, c->mem, at, cpm, nc, d->buf, ok))
		return 0;
	/* Each page's hash is taken one page ahead (next_hash): a lookup is
	 * a cache miss in tables of megabytes. */
	h = next_hash(d, d->buf, ok[0], &r->st[first + idx[0]]);
	for (k = 0; k < nc; k++) {
		uint64_t hk = h;

		if (c->ninflight >= SP_MAX_INFLIGHT) {
			*done = idx[k];
			break;
		}
		if (k + 1 < nc)
			h = next_hash(d, d->buf + (k + 1) * SP_PAGE, ok[k + 1],
				      &r->st[first + idx[k + 1]]);
		if (!ok[k])
			continue;	/* unmapped, or out for a merge */
		handle_page(d, c, at[k], &r->st[first + idx[k]],
			    d->buf + k * SP_PAGE, cpm[k], hk);
		got++;
	}
	d->pages_scanned += got;
	return got;
}

static void end_pass(struct daemon *d)
{
	uint64_t now = sp_now_ms();

	d->full_scans++;
	d->pages_volatile = d->volatile_cur;
	d->volatile_cur = 0;
	ut_clear(&d->ut);
	/* GC reads every process's maps, each at least twice (pool.c), and
	 * a program of 48,000 mappings takes some 20 ms a read: at most a
	 * twentieth of the time in GC, whatever it costs. */
	if (now - d->last_gc >= gc_interval_ms &&
	    now - d->last_gc >= 20 * d->gc_cost_ms) {
		uint64_t n = pool_gc(&d->pool);

		if (n)
			log_debug("freed %llu pool pages", (unsigned long long)n);
		d->last_gc = sp_now_ms();
		d->gc_cost_ms = d->last_gc - now;
	}
	for (struct client *c = d->clients; c; c = c->next) {
		if (!c->passed_over)
			c->scan_at = 0;	/* else on from where it stopped */
		c->scan_done = c->passed_over = false;
	}
}

static bool in_pass(const struct client *c)
{
	return c->agent && c->nr && !c->scan_done;
}

/* The first client from id `from` on, round the list, that this pass
 * has still to scan. */
static struct client *next_client(struct daemon *d, int from)
{
	struct client *best = NULL, *first = NULL;

	for (struct client *c = d->clients; c; c = c->next) {
		if (!in_pass(c))
			continue;
		if (c->id >= from && (!best || c->id < best->id))
			best = c;
		if (!first || c->id < first->id)
			first = c;
	}
	return best ? best : first;
}

static int pass_left(struct daemon *d)
{
	int n = 0;

	for (struct client *c = d->clients; c; c = c->next)
		n += in_pass(c);
	return n;
}

/* Clients whose agents can take another batch. */
static int ready_clients(struct daemon *d)
{
	int n = 0;

	for (struct client *c = d->clients; c; c = c->next)
		n += c->agent && c->nr && c->ninflight < SP_MAX_INFLIGHT;
	return n;
}

/*
 * Scan up to pages_to_scan pages.  A pass takes the clients in turn, a
 * chunk of each, so that the plans of a pass go to every agent at once:
 * the pairs a page of one program makes are with pages anywhere in the
 * others.  A client with SP_MAX_INFLIGHT batches unanswered is passed in
 * the turn; when every client the pass has left is in that state, the
 * tick stops where it is and returns true (stalled): the caller waits
 * for a MERGE_DONE instead of scanning on.  Hashing pages that cannot be
 * sent is wasted, and at full speed the scanner would lap the agents,
 * planning a few batches per pass.  Ending the pass without a client
 * would lose its pairs (each pass end clears the unstable index), so
 * only a client busy for sp_busy_skip_ms is left out of the pass, and
 * the next starts it where it stopped.
 */
bool scan_tick(struct daemon *d)
{
	uint64_t budget = d->pages_to_scan;
	uint64_t visits = budget * visit_factor;
	int wraps = 0, busy = 0;
	bool stalled = false;

	while (budget && visits) {
		struct client *c = next_client(d, d->cur_client);
		struct drange *r;
		uint64_t first, n, got, done;
		size_t i;

		if (!c) {
			if (wraps++)
				break;
			end_pass(d);
			busy = 0;
			continue;
		}
		d->cur_client = c->id + 1;	/* a chunk each, in turn */
		i = client_range_first(c, c->scan_at);
		if (i >= c->nr) {
			c->scan_done = true;
			continue;
		}
		if (c->ninflight >= SP_MAX_INFLIGHT) {
			uint64_t now = sp_now_ms();

			if (!c->busy_since)
				c->busy_since = now;
			if (now - c->busy_since >= sp_busy_skip_ms &&
			    ready_clients(d)) {
				/* stuck (a stopped program, say) */
				c->scan_done = c->passed_over = true;
				continue;
			}
			if (++busy >= pass_left(d)) {
				stalled = true;	/* wait for an answer */
				break;
			}
			continue;
		}
		c->busy_since = 0;
		busy = 0;
		r = &c->r[i];
		first = c->scan_at > r->start ? (c->scan_at - r->start) / SP_PAGE
					      : 0;
		n = r->npages - first;
		n = n < CHUNK ? n : CHUNK;
		n = n < visits ? n : visits;
		got = scan_chunk(d, c, r, first, n, &done);
		budget -= got < budget ? got : budget;
		visits -= done;
		c->scan_at = r->start + (first + done) * SP_PAGE;
	}
	for (struct client *c = d->clients; c; c = c->next)
		scan_flush(d, c);
	return stalled;
}
