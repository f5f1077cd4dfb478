/*
 * estimate.c - `samepage estimate PID...`: what merging would save in
 * running programs, without merging anything and without a daemon.
 *
 * For each process it takes the mappings samepage would merge if the
 * program opted all of them in (PR_SET_MEMORY_MERGE; `run --all` leaves
 * out those under 1 MiB too): private anonymous, readable, not
 * executable, not the stack, not bigger than RAM (a reservation, such as
 * a sanitizer's shadow).  It reads their pagemap and skips pages that are not present (reading them would
 * allocate them where a read maps no zero page: pvm_no_zero_page), reads the rest
 * (sp_read_pages: without copying pages shared after fork) and hashes
 * them with xxh3.  A physical page is counted
 * once (by PFN, which pagemap shows to root): pages shared after fork or
 * merged by kernel KSM are not counted as duplicates of themselves.
 * Pages samepage has merged already are in pool mappings, not anonymous
 * ones, and are left out.
 *
 * Contents are told apart by their 64-bit hash and not compared byte for
 * byte: nothing is merged, so a collision (about one in 2^64 per pair)
 * would only misstate the estimate.  The figures use the kernel's names,
 * as with use_zero_pages=1: all-zero pages count in ksm_zero_pages,
 * every other content found n > 1 times in one pages_shared and n - 1
 * pages_sharing.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "hash.h"
#include "sp.h"

#define CHUNK 512

/* An open-addressing set of non-zero 64-bit keys, each with a count. */
struct tally {
	uint64_t *key;
	uint32_t *n;
	size_t cap, used;
};

static int tally_grow(struct tally *t)
{
	struct tally b = { .cap = t->cap ? t->cap * 2 : 1 << 16 };

	b.key = calloc(b.cap, sizeof(*b.key));
	b.n = calloc(b.cap, sizeof(*b.n));
	if (!b.key || !b.n) {
		free(b.key);
		free(b.n);
		return -ENOMEM;
	}
	for (size_t i = 0; i < t->cap; i++) {
		size_t j;

		if (!t->key[i])
			continue;
		for (j = t->key[i] & (b.cap - 1); b.key[j];
		     j = (j + 1) & (b.cap - 1))
			;
		b.key[j] = t->key[i];
		b.n[j] = t->n[i];
	}
	b.used = t->used;
	free(t->key);
	free(t->n);
	*t = b;
	return 0;
}

/* The count slot of key, added at 0 if new; NULL without memory. */
static uint32_t *tally_at(struct tally *t, uint64_t key, bool add)
{
	size_t j;

	if (add && (t->used + 1) * 2 > t->cap && tally_grow(t) < 0)
		return NULL;
	if (!t->cap)
		return NULL;
	for (j = key & (t->cap - 1); t->key[j]; j = (j + 1) & (t->cap - 1))
		if (t->key[j] == key)
			return &t->n[j];
	if (!add)
		return NULL;
	t->key[j] = key;
	t->used++;
	return &t->n[j];
}

struct proc_est {
	pid_t pid;
	char comm[17];
	uint64_t *hashes;	/* one per page read; 0 for an all-zero page */
	size_t nh, caph;
	uint64_t zero, merging;
};

static int add_hash(struct proc_est *p, uint64_t h)
{
	if (p->nh == p->caph) {
		size_t cap = p->caph ? p->caph * 2 : 4096;
		uint64_t *v = realloc(p->hashes, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		p->hashes = v;
		p->caph = cap;
	}
	p->hashes[p->nh++] = h;
	return 0;
}

/* Would samepage take this line of /proc/PID/maps? */
static bool candidate(const char *line, uintptr_t *s, uintptr_t *e)
{
	char perms[8], path[256] = "";
	unsigned long lo, hi, ino;

	if (sscanf(line, "%lx-%lx %7s %*s %*s %lu %255s", &lo, &hi, perms,
		   &ino, path) < 4)
		return false;
	*s = lo;
	*e = hi;
	if (ino || perms[0] != 'r' || perms[2] == 'x' || perms[3] != 'p')
		return false;
	/* [heap] and [anon:name] are anonymous; the stack and the vDSO's
	 * pages are not taken */
	return !path[0] || !strcmp(path, "[heap]") ||
	       !strncmp(path, "[anon:", 6);
}

static int scan_range(struct proc_est *p, int pm, int mem, uintptr_t s,
		      uintptr_t e, struct tally *pfns, uint8_t *buf,
		      uint64_t *scanned)
{
	static uint64_t v[CHUNK], rv[CHUNK];
	static uintptr_t at[CHUNK];
	static uint8_t ok[CHUNK];

	for (uintptr_t a = s; a < e; a += CHUNK * SP_PAGE) {
		size_t n = (e - a) / SP_PAGE < CHUNK ? (e - a) / SP_PAGE : CHUNK;
		size_t nr = 0;

		if (sp_pagemap_read(pm, a, n, v) < 0)
			return 0;	/* unmapped since: what is left */
		for (size_t i = 0; i < n; i++) {
			uint64_t pfn = PM_PFN(v[i]);

			if (!(v[i] & PM_PRESENT) || (v[i] & PM_FILE))
				continue;
			if (pfn) {	/* one physical page, counted once */
				uint32_t *c = tally_at(pfns, pfn, true);

				if (!c)
					return -ENOMEM;
				if ((*c)++)
					continue;
			}
			at[nr] = a + i * SP_PAGE;
			rv[nr] = v[i];
			nr++;
		}
		/* pages shared after fork through /proc/PID/mem: a
		 * process_vm_readv would give the target copies of them */
		if (!nr || !sp_read_pages(p->pid, mem, at, rv, nr, buf, ok))
			continue;
		for (size_t k = 0; k < nr; k++) {
			const uint8_t *pg = buf + k * SP_PAGE;
			uint64_t h = 0;

			if (!ok[k])
				continue;	/* unmapped since */
			if (!sp_page_is_zero(pg)) {
				h = XXH3_64bits(pg, SP_PAGE);
				h = h ? h : 1;
			}
			if (add_hash(p, h) < 0)
				return -ENOMEM;
			(*scanned)++;
		}
	}
	return 0;
}

static int scan_proc(struct proc_est *p, struct tally *pfns, uint8_t *buf,
		     uint64_t *scanned)
{
	char path[64], line[512];
	uint64_t ram_pages = (uint64_t)sysconf(_SC_PHYS_PAGES);
	FILE *comm, *maps;
	int pm, mem, r = 0;

	snprintf(path, sizeof(path), "/proc/%d/comm", (int)p->pid);
	comm = fopen(path, "re");
	if (comm) {
		if (fgets(p->comm, sizeof(p->comm), comm))
			p->comm[strcspn(p->comm, "\n")] = 0;
		for (char *c = p->comm; *c; c++)	/* printable in JSON */
			if (*c < 0x20 || *c == '"' || *c == '\\')
				*c = '?';
		fclose(comm);
	}
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)p->pid);
	pm = open(path, O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		return -errno;
	snprintf(path, sizeof(path), "/proc/%d/mem", (int)p->pid);
	mem = open(path, O_RDONLY | O_CLOEXEC);
	snprintf(path, sizeof(path), "/proc/%d/maps", (int)p->pid);
	maps = fopen(path, "re");
	if (!maps) {
		r = -errno;
		close(pm);
		if (mem >= 0)
			close(mem);
		return r;
	}
	while (r == 0 && fgets(line, sizeof(line), maps)) {
		uintptr_t s, e;

		/* A mapping bigger than RAM is a reservation (a sanitizer's
		 * shadow): its pagemap alone would take minutes to read. */
		if (candidate(line, &s, &e) && (e - s) / SP_PAGE <= ram_pages)
			r = scan_range(p, pm, mem, s, e, pfns, buf, scanned);
	}
	fclose(maps);
	close(pm);
	if (mem >= 0)
		close(mem);
	return r;
}

static void usage_estimate(void)
{
	fputs("usage: samepage estimate [--json] pid ...\n", stderr);
	exit(2);
}

int cmd_estimate(int argc, char **argv)
{
	struct tally pfns = { 0 }, contents = { 0 };
	struct proc_est *ps;
	uint64_t scanned = 0, zero = 0, shared = 0, sharing = 0;
	bool json = false;
	uint8_t *buf;
	int np = 0, first = 1;

	if (argc > 1 && !strcmp(argv[1], "--json")) {
		json = true;
		first = 2;
	}
	if (argc <= first)
		usage_estimate();
	ps = calloc((size_t)(argc - first), sizeof(*ps));
	buf = malloc(CHUNK * SP_PAGE);
	if (!ps || !buf) {
		fprintf(stderr, "samepage: out of memory\n");
		return 1;
	}
	for (int i = first; i < argc; i++) {
		char *end;
		long pid = strtol(argv[i], &end, 10);
		int r;

		if (*end || pid <= 0 || pid > INT32_MAX)
			usage_estimate();
		ps[np].pid = (pid_t)pid;
		r = scan_proc(&ps[np], &pfns, buf, &scanned);
		if (r == -ENOENT || r == -ESRCH) {
			fprintf(stderr, "samepage: no process %ld\n", pid);
			return 1;
		}
		if (r < 0) {
			fprintf(stderr, "samepage: cannot read process %ld: %s%s\n",
				pid, strerror(-r),
				r == -EACCES || r == -EPERM
					? " (run as root, or as its owner)" : "");
			return 1;
		}
		np++;
	}
	/* count each content over all processes */
	for (int i = 0; i < np; i++)
		for (size_t k = 0; k < ps[i].nh; k++) {
			uint32_t *c;

			if (!ps[i].hashes[k]) {
				zero++;
				ps[i].zero++;
				continue;
			}
			c = tally_at(&contents, ps[i].hashes[k], true);
			if (!c) {
				fprintf(stderr, "samepage: out of memory\n");
				return 1;
			}
			if (++*c == 2)
				shared++;
			if (*c >= 2)
				sharing++;
		}
	for (int i = 0; i < np; i++)
		for (size_t k = 0; k < ps[i].nh; k++) {
			uint32_t *c = ps[i].hashes[k]
					      ? tally_at(&contents,
							 ps[i].hashes[k], false)
					      : NULL;

			if (c && *c >= 2)
				ps[i].merging++;
		}
	if (json) {
		printf("{\"pages_scanned\": %" PRIu64 ", \"pages_shared\": %" PRIu64
		       ", \"pages_sharing\": %" PRIu64
		       ", \"ksm_zero_pages\": %" PRIu64
		       ", \"bytes_saved\": %" PRIu64 ", \"processes\": [",
		       scanned, shared, sharing, zero,
		       (sharing + zero) * SP_PAGE);
		for (int i = 0; i < np; i++)
			printf("%s{\"pid\": %d, \"comm\": \"%s\", \"pages\": %zu, "
			       "\"merging_pages\": %" PRIu64
			       ", \"zero_pages\": %" PRIu64 "}",
			       i ? ", " : "", (int)ps[i].pid, ps[i].comm,
			       ps[i].nh, ps[i].merging, ps[i].zero);
		printf("]}\n");
	} else {
		printf("pages_scanned      %" PRIu64 "\n", scanned);
		printf("pages_shared       %" PRIu64 "\n", shared);
		printf("pages_sharing      %" PRIu64 "\n", sharing);
		printf("ksm_zero_pages     %" PRIu64 "\n", zero);
		printf("bytes_saved        %" PRIu64 " (%.1f MiB, %.1f%% of "
		       "the pages scanned)\n",
		       (sharing + zero) * SP_PAGE,
		       (double)((sharing + zero) * SP_PAGE) / (1 << 20),
		       scanned ? 100.0 * (double)(sharing + zero) /
					 (double)scanned
			       : 0.0);
		printf("\n%7s %-16s %10s %10s %10s\n", "PID", "COMMAND",
		       "PAGES", "MERGING", "ZERO");
		for (int i = 0; i < np; i++)
			printf("%7d %-16s %10zu %10" PRIu64 " %10" PRIu64 "\n",
			       (int)ps[i].pid, ps[i].comm, ps[i].nh,
			       ps[i].merging, ps[i].zero);
	}
	for (int i = 0; i < np; i++)
		free(ps[i].hashes);
	free(ps);
	free(buf);
	free(pfns.key);
	free(pfns.n);
	free(contents.key);
	free(contents.n);
	return 0;
}
