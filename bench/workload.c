/*
 * workload.c - one process of a benchmark workload.  It maps memory,
 * fills it after a pattern, opts in with madvise(MADV_MERGEABLE) as any
 * program would (kernel KSM or samepage alike), says "ready", then obeys
 * commands on stdin:
 *
 *   cow      write one byte in every page, timing each write; answers
 *            "ok P50_NS P99_NS"
 *   quit
 *
 * usage: workload KIND MIB ID
 *   KIND cloned     60% duplicates in runs of 256 pages, 20% zero,
 *                   20% unique
 *        scattered  60% duplicates at random single pages (contents
 *                   shuffled per process), 40% unique
 *        volatile   like cloned, and a thread rewrites 30% of the pages
 *                   over and over (a pass, then 100 ms of rest)
 *        unique     nothing can merge
 *        cowstorm   every page a duplicate (the cow command then breaks
 *                   every merge)
 *        pattern    every page one and the same content, as memory a
 *                   program filled with a pattern
 *   ID   the process's number: unique pages differ between processes
 *
 * usage: workload membound MIB SECONDS
 *   a memory-bound program that does not opt in: random 8-byte
 *   read-modify-writes over MIB of its own memory for SECONDS; prints
 *   "rate OPS_PER_SECOND".  bench/run times it with and without a merger
 *   scanning alongside.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <pthread.h>
#include <time.h>

#define PG 4096UL

static uint8_t *mem;
static size_t npages;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x94D049BB133111EBULL;
	x ^= x >> 29;
	return x;
}

/* Page contents are a function of one 64-bit key; key 0 is zeros. */
static void fill_page(uint8_t *p, uint64_t key)
{
	uint64_t *w = (uint64_t *)p;

	if (!key) {
		memset(p, 0, PG);
		return;
	}
	for (size_t i = 0; i < PG / 8; i++)
		w[i] = mix(key * 0x9E3779B97F4A7C15ULL + i);
}

static uint64_t unique_key(unsigned id, size_t p)
{
	return ((uint64_t)(id + 1) << 40) | (p + 1);
}

static uint64_t dup_key(size_t k)
{
	return (1ULL << 63) | (k + 1);
}

static void fill(const char *kind, unsigned id)
{
	uint64_t rng = mix(id + 12345);

	for (size_t p = 0; p < npages; p++) {
		uint64_t key;
		unsigned block = (unsigned)(p / 256) % 5;

		if (!strcmp(kind, "cloned") || !strcmp(kind, "volatile"))
			key = block < 3 ? dup_key(p)
			      : block == 3 ? 0 : unique_key(id, p);
		else if (!strcmp(kind, "scattered")) {
			rng = mix(rng + p);
			key = rng % 10 < 6 ? dup_key(rng % npages)
					   : unique_key(id, p);
		} else if (!strcmp(kind, "pattern"))
			key = dup_key(0);
		else if (!strcmp(kind, "cowstorm"))
			key = dup_key(p);
		else
			key = unique_key(id, p);
		fill_page(mem + p * PG, key);
	}
}

static void *rewriter(void *arg)
{
	unsigned id = (unsigned)(uintptr_t)arg;
	uint64_t gen = 1;

	/* 30% of the pages (the first 3 of every 10) change forever */
	for (;;) {
		for (size_t p = 0; p < npages; p++)
			if (p % 10 < 3)
				fill_page(mem + p * PG,
					  unique_key(id, p) ^ (gen << 50));
		gen++;
		nanosleep(&(struct timespec){ 0, 100000000 }, NULL);
	}
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void cow(void)
{
	uint64_t *lat = malloc(npages * sizeof(*lat));

	if (!lat) {
		printf("err\n");
		return;
	}
	for (size_t p = 0; p < npages; p++) {
		uint64_t t0 = now_ns();

		((volatile uint8_t *)mem)[p * PG + 17] ^= 1;
		lat[p] = now_ns() - t0;
	}
	qsort(lat, npages, sizeof(*lat), cmp_u64);
	printf("ok %llu %llu\n", (unsigned long long)lat[npages / 2],
	       (unsigned long long)lat[npages * 99 / 100]);
	free(lat);
}

static int membound(size_t mib, double seconds)
{
	size_t words = mib * (1 << 20) / 8, ops = 0;
	uint64_t *w = malloc(words * 8), x = 1, t0, t1;

	if (!w) {
		perror("malloc");
		return 1;
	}
	for (size_t i = 0; i < words; i++)
		w[i] = i;
	t0 = now_ns();
	do {
		for (int i = 0; i < 65536; i++) {
			x = mix(x + w[x % words]);
			w[x % words] += x;
		}
		ops += 65536;
		t1 = now_ns();
	} while (t1 - t0 < (uint64_t)(seconds * 1e9));
	printf("rate %.0f\n", (double)ops * 1e9 / (double)(t1 - t0));
	free(w);
	return 0;
}

int main(int argc, char **argv)
{
	char line[64];
	pthread_t t;

	if (argc == 4 && !strcmp(argv[1], "membound"))
		return membound(strtoul(argv[2], NULL, 10), atof(argv[3]));
	if (argc != 4) {
		fprintf(stderr, "usage: workload KIND MIB ID | "
			"workload membound MIB SECONDS\n");
		return 2;
	}
	npages = strtoul(argv[2], NULL, 10) * (1 << 20) / PG;
	mem = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	fill(argv[1], (unsigned)atoi(argv[3]));
	if (madvise(mem, npages * PG, MADV_MERGEABLE) < 0) {
		perror("madvise");
		return 1;
	}
	if (!strcmp(argv[1], "volatile"))
		pthread_create(&t, NULL, rewriter,
			       (void *)(uintptr_t)atoi(argv[3]));
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "cow", 3))
			cow();
		else if (!strncmp(line, "quit", 4))
			break;
	}
	return 0;
}
