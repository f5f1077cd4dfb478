/* test_region.c - the agent's interval set: splits, merges, coverage. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include "sp.h"

#define P(n) ((uintptr_t)(n) * SP_PAGE)

/* Stubs: region.c uses nothing else, but sp.h declares these. */
void sp_fatal(const char *file, int line, const char *what)
{
	(void)file; (void)line; (void)what;
	abort();
}

static void check_invariants(const struct sp_regions *rs)
{
	for (size_t i = 0; i < rs->n; i++) {
		assert_true(rs->v[i].start < rs->v[i].end);
		if (i)
			assert_true(rs->v[i - 1].end <= rs->v[i].start);
	}
}

static void add_and_remove(void **state)
{
	struct sp_regions rs = { 0 };

	(void)state;
	assert_int_equal(rg_add(&rs, P(10), P(20), 3, 0), 0);
	assert_int_equal(rg_add(&rs, P(30), P(40), 3, 0), 0);
	assert_int_equal(rs.n, 2);
	rg_remove(&rs, P(15), P(35));	/* cuts both */
	check_invariants(&rs);
	assert_int_equal(rs.n, 2);
	assert_int_equal(rs.v[0].end, P(15));
	assert_int_equal(rs.v[1].start, P(35));
	rg_remove(&rs, P(12), P(13));	/* splits the first */
	check_invariants(&rs);
	assert_int_equal(rs.n, 3);
	rg_remove(&rs, 0, P(100));
	assert_int_equal(rs.n, 0);
	rg_free(&rs);
}

static void add_replaces_overlap_and_coalesces(void **state)
{
	struct sp_regions rs = { 0 };

	(void)state;
	rg_add(&rs, P(0), P(10), 3, RG_MERGEABLE);
	rg_add(&rs, P(10), P(20), 3, RG_MERGEABLE);	/* joins */
	assert_int_equal(rs.n, 1);
	rg_add(&rs, P(5), P(15), 1, 0);			/* MAP_FIXED over */
	check_invariants(&rs);
	assert_int_equal(rs.n, 3);
	assert_int_equal(rs.v[1].prot, 1);
	assert_false(rg_covered(&rs, P(0), P(20), RG_MERGEABLE));
	assert_true(rg_covered(&rs, P(0), P(5), RG_MERGEABLE));
	assert_true(rg_any(&rs, P(4), P(6), RG_MERGEABLE));
	assert_false(rg_any(&rs, P(5), P(15), RG_MERGEABLE));
	assert_false(rg_any(&rs, P(20), P(30), 0));	/* nothing there */
	rg_free(&rs);
}

static void update_splits_and_rejoins(void **state)
{
	struct sp_regions rs = { 0 };

	(void)state;
	rg_add(&rs, P(0), P(100), 3, 0);
	rg_update(&rs, P(10), P(20), RG_MERGEABLE, 0, -1);
	assert_int_equal(rs.n, 3);
	assert_true(rg_covered(&rs, P(10), P(20), RG_MERGEABLE));
	assert_false(rg_covered(&rs, P(9), P(20), RG_MERGEABLE));
	rg_update(&rs, P(0), P(100), 0, RG_MERGEABLE, -1);
	assert_int_equal(rs.n, 1);	/* equal neighbours join again */
	rg_update(&rs, P(50), P(200), 0, 0, 1);	/* only known parts */
	check_invariants(&rs);
	assert_int_equal(rs.v[rs.n - 1].end, P(100));
	rg_free(&rs);
}

static void covered_needs_no_gaps(void **state)
{
	struct sp_regions rs = { 0 };

	(void)state;
	rg_add(&rs, P(0), P(10), 3, RG_MERGEABLE);
	rg_add(&rs, P(11), P(20), 3, RG_MERGEABLE);
	assert_false(rg_covered(&rs, P(0), P(20), RG_MERGEABLE));
	assert_true(rg_covered(&rs, P(11), P(20), RG_MERGEABLE));
	assert_false(rg_covered(&rs, P(19), P(21), 0));
	rg_free(&rs);
}

static void many_random_ops(void **state)
{
	struct sp_regions rs = { 0 };
	unsigned x = 12345;

	(void)state;
	for (int i = 0; i < 20000; i++) {
		uintptr_t a, b;

		x = x * 1103515245 + 12345;
		a = P((x >> 8) % 1000);
		b = a + P(1 + (x >> 20) % 50);
		switch ((x >> 4) % 3) {
		case 0: rg_add(&rs, a, b, (int)(x % 4), x % 2); break;
		case 1: rg_remove(&rs, a, b); break;
		default: rg_update(&rs, a, b, RG_MERGED, 0, -1);
		}
		check_invariants(&rs);
	}
	rg_free(&rs);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(add_and_remove),
		cmocka_unit_test(add_replaces_overlap_and_coalesces),
		cmocka_unit_test(update_splits_and_rejoins),
		cmocka_unit_test(covered_needs_no_gaps),
		cmocka_unit_test(many_random_ops),
	};

	return cmocka_run_group_tests_name("region", tests, NULL, NULL);
}
