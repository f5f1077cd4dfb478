/*
 * index.c - the unstable table: pages seen once with a stable hash that
 * matched nothing yet, keyed by content hash.  Like KSM's unstable tree
 * it holds no reference to memory and is rebuilt on every full scan, so a
 * stale entry costs one wasted comparison, never a wrong merge.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sp.h"

#define UT_TOMB (-1)

int ut_init(struct unstable *u, uint64_t cap)
{
	u->cap = cap;
	u->n = 0;
	u->tombs = 0;
	u->v = calloc(cap, sizeof(*u->v));
	return u->v ? 0 : -ENOMEM;
}

static struct ut_entry *slot_for(struct unstable *u, uint64_t hash,
				 bool insert)
{
	uint64_t mask = u->cap - 1, i = hash & mask;
	struct ut_entry *tomb = NULL;

	for (;; i = (i + 1) & mask) {
		struct ut_entry *e = &u->v[i];

		if (e->client == 0)
			return insert ? (tomb ? tomb : e) : NULL;
		if (e->client == UT_TOMB) {
			if (!tomb)
				tomb = e;
			continue;
		}
		if (e->hash == hash)
			return e;
	}
}

struct ut_entry *ut_find(struct unstable *u, uint64_t hash)
{
	return slot_for(u, hash, false);
}

void ut_prefetch(const struct unstable *u, uint64_t hash)
{
	__builtin_prefetch(&u->v[hash & (u->cap - 1)]);
}

static void grow(struct unstable *u)
{
	struct unstable bigger;
	uint64_t cap = (u->n + 1) * 4 > u->cap ? u->cap * 2 : u->cap;

	if (ut_init(&bigger, cap) < 0)
		return;
	for (uint64_t i = 0; i < u->cap; i++)
		if (u->v[i].client > 0)
			ut_put(&bigger, u->v[i].hash, u->v[i].client,
			       u->v[i].addr);
	free(u->v);
	*u = bigger;
}

void ut_put(struct unstable *u, uint64_t hash, int client, uint64_t addr)
{
	struct ut_entry *e;

	if ((u->n + u->tombs + 1) * 2 > u->cap)
		grow(u);
	if ((u->n + 1) * 4 > u->cap * 3)
		return;		/* could not grow: just forget it */
	e = slot_for(u, hash, true);
	if (e->client == UT_TOMB)
		u->tombs--;
	if (e->client <= 0)
		u->n++;
	e->hash = hash;
	e->client = client;
	e->addr = addr;
}

void ut_del(struct unstable *u, struct ut_entry *e)
{
	SP_ASSERT(e->client > 0);
	e->client = UT_TOMB;
	u->n--;
	u->tombs++;
}

void ut_clear(struct unstable *u)
{
	memset(u->v, 0, u->cap * sizeof(*u->v));
	u->n = 0;
	u->tombs = 0;
}
