/*
 * client.c - the daemon's book of one client: its registered ranges, one
 * pstate per page, and the merge batches it has not answered yet.
 *
 * Every pool reference a client holds is one pstate whose slot is a pool
 * slot; references are taken only when the agent reports a page merged
 * and dropped when the scanner sees the page CoW-broken or gone, when the
 * range is unregistered, or when the client goes away.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sp.h"

struct client *client_by_id(struct daemon *d, int id)
{
	for (struct client *c = d->clients; c; c = c->next)
		if (c->id == id)
			return c;
	return NULL;
}

size_t client_range_first(const struct client *c, uint64_t addr)
{
	size_t lo = 0, hi = c->nr;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (c->r[mid].start + c->r[mid].npages * SP_PAGE <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

struct pstate *client_page(struct client *c, uint64_t addr)
{
	size_t i = client_range_first(c, addr);

	if (i >= c->nr || c->r[i].start > addr)
		return NULL;
	return &c->r[i].st[(addr - c->r[i].start) / SP_PAGE];
}

void client_release(struct client *c, struct pool *p, struct pstate *st)
{
	if (ST_IS_POOL(st->slot)) {
		pool_unref(p, ST_POOL(st->slot));
		c->merging--;
	} else if (st->slot == ST_ZERO) {
		c->zero--;
	}
	st->slot = ST_NONE;
}

/* Cut [s, e) out of range i; returns how many ranges replace it. */
static int range_cut(struct daemon *d, struct client *c, size_t i,
		     uint64_t s, uint64_t e)
{
	struct drange r = c->r[i], keep[2];
	uint64_t re = r.start + r.npages * SP_PAGE;
	int nk = 0;

	if (s < r.start)
		s = r.start;
	if (e > re)
		e = re;
	for (uint64_t a = s; a < e; a += SP_PAGE)
		client_release(c, &d->pool, &r.st[(a - r.start) / SP_PAGE]);
	c->registered -= (e - s) / SP_PAGE;
	if (s > r.start)
		keep[nk++] = (struct drange){ r.start, (s - r.start) / SP_PAGE,
					      NULL };
	if (e < re)
		keep[nk++] = (struct drange){ e, (re - e) / SP_PAGE, NULL };
	for (int k = 0; k < nk; k++) {
		keep[k].st = malloc(keep[k].npages * sizeof(struct pstate));
		SP_ASSERT(keep[k].st);
		memcpy(keep[k].st, r.st + (keep[k].start - r.start) / SP_PAGE,
		       keep[k].npages * sizeof(struct pstate));
	}
	free(r.st);
	if (nk == 2) {
		struct drange *v = realloc(c->r, (c->nr + 1) * sizeof(*v));

		SP_ASSERT(v);
		c->r = v;
		memmove(&c->r[i + 1], &c->r[i], (c->nr - i) * sizeof(*v));
		c->nr++;
	}
	if (nk == 0) {
		memmove(&c->r[i], &c->r[i + 1], (c->nr - i - 1) * sizeof(*c->r));
		c->nr--;
	}
	for (int k = 0; k < nk; k++)
		c->r[i + k] = keep[k];
	return nk;
}

void client_unreg(struct daemon *d, struct client *c, uint64_t s, uint64_t e)
{
	size_t i = client_range_first(c, s);

	while (i < c->nr && c->r[i].start < e)
		i += (size_t)range_cut(d, c, i, s, e);
}

int client_reg(struct daemon *d, struct client *c, uint64_t s, uint64_t len)
{
	struct drange r = { s, len / SP_PAGE, NULL };
	struct drange *v;
	size_t i;

	if ((s | len) & (SP_PAGE - 1) || !len || s + len < s)
		return -EINVAL;
	client_unreg(d, c, s, s + len);
	r.st = calloc(r.npages, sizeof(struct pstate));
	v = realloc(c->r, (c->nr + 1) * sizeof(*v));
	if (!r.st || !v) {
		free(r.st);
		if (v)
			c->r = v;
		return -ENOMEM;
	}
	c->r = v;
	i = client_range_first(c, s);
	memmove(&c->r[i + 1], &c->r[i], (c->nr - i) * sizeof(*v));
	c->r[i] = r;
	c->nr++;
	c->registered += r.npages;
	return 0;
}

static void unlease(struct daemon *d, const struct sp_item *it)
{
	if (it->kind != SP_ITEM_POOL)
		return;
	for (uint32_t j = 0; j < it->npages; j++) {
		struct slot *s = &d->pool.s[it->pgoff + j];

		SP_ASSERT(s->lease > 0);
		s->lease--;
		d->pool.leased--;
	}
}

void client_apply(struct daemon *d, struct client *c, const struct sp_item *it,
		  const struct sp_item_result *res)
{
	for (uint32_t j = 0; j < it->npages; j++) {
		struct pstate *st = client_page(c, it->addr + j * SP_PAGE);
		bool merged = res && sp_bit(res->merged, j);

		if (!st)
			continue;	/* unregistered meanwhile */
		st->flags &= ~(uint32_t)PS_INFLIGHT;
		if (res && sp_bit(res->immovable, j))
			st->flags |= PS_IMMOVABLE;
		if (res && sp_bit(res->pinned, j))
			st->flags = (st->flags & ((1u << PS_WAIT_SHIFT) - 1)) |
				    PS_WAIT_PASSES << PS_WAIT_SHIFT;
		if (!merged)
			continue;
		st->flags &= ~(uint32_t)PS_WRITTEN;
		client_release(c, &d->pool, st);
		if (it->kind == SP_ITEM_ZERO) {
			st->slot = ST_ZERO;
			c->zero++;
		} else {
			pool_ref(&d->pool, (uint32_t)it->pgoff + j);
			st->slot = ST_SLOT(it->pgoff + j);
			c->merging++;
		}
	}
	unlease(d, it);
}

void client_done(struct daemon *d, struct client *c, const struct sp_msg *m)
{
	struct batch **bp = &c->inflight, *b;

	while (*bp && (*bp)->id != m->done->batch)
		bp = &(*bp)->next;
	if (!(b = *bp)) {
		log_warnx("pid %d answered unknown batch %u", (int)c->pid,
			  m->done->batch);
		return;
	}
	*bp = b->next;
	c->ninflight--;
	c->figs = m->done->figs;
	for (uint32_t i = 0; i < b->nitems; i++)
		client_apply(d, c, &b->items[i],
			   i < m->done->nitems ? &m->results[i] : NULL);
	free(b);
}

void client_drop_batches(struct daemon *d, struct client *c)
{
	while (c->inflight) {
		struct batch *b = c->inflight;

		c->inflight = b->next;
		for (uint32_t i = 0; i < b->nitems; i++)
			client_apply(d, c, &b->items[i], NULL);
		free(b);
	}
	c->ninflight = 0;
	for (uint32_t i = 0; i < c->npend; i++)
		client_apply(d, c, &c->pend[i], NULL);
	c->npend = 0;
}
