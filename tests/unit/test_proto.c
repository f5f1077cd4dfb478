/* test_proto.c - the protocol decoder accepts what the encoder writes and
 * refuses every malformed packet. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "sp_proto.h"

/* The packet buffer, viewable as its header without breaking aliasing. */
static union {
	uint64_t align;
	struct sp_hdr h;
	unsigned char b[SP_MSG_MAX];
} pkt;
#define buf pkt.b

static void roundtrip_range(void **state)
{
	struct sp_range r = { 0x7f0000000000, 8192 };
	struct sp_msg m;
	int n = sp_encode(buf, sizeof(buf), SP_REG, &r, sizeof(r));

	(void)state;
	assert_int_equal(n, sizeof(struct sp_hdr) + sizeof(r));
	assert_int_equal(sp_decode(buf, (size_t)n, &m), 0);
	assert_int_equal(m.type, SP_REG);
	assert_int_equal(m.u.range->start, r.start);
	assert_int_equal(m.u.range->len, r.len);
}

static int encode_merge(uint32_t nitems, uint32_t npages, uint32_t kind,
			uint64_t addr)
{
	struct {
		struct sp_merge h;
		struct sp_item it[SP_BATCH_ITEMS];
	} m = { { 7, nitems }, { { 0 } } };

	for (uint32_t i = 0; i < nitems && i < SP_BATCH_ITEMS; i++)
		m.it[i] = (struct sp_item){ addr, 3, npages, kind };
	return sp_encode(buf, sizeof(buf), SP_MERGE, &m,
			 sizeof(m.h) + nitems * sizeof(struct sp_item));
}

static void merge_valid(void **state)
{
	struct sp_msg m;
	int n = encode_merge(3, SP_ITEM_PAGES, SP_ITEM_POOL, 0x1000);

	(void)state;
	assert_int_equal(sp_decode(buf, (size_t)n, &m), 0);
	assert_int_equal(m.merge->nitems, 3);
	assert_int_equal(m.items[2].npages, SP_ITEM_PAGES);
}

static void merge_invalid(void **state)
{
	struct sp_msg m;
	int n;

	(void)state;
	n = encode_merge(1, 0, SP_ITEM_POOL, 0x1000);	/* empty item */
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
	n = encode_merge(1, SP_ITEM_PAGES + 1, SP_ITEM_POOL, 0x1000);
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
	n = encode_merge(1, 1, 9, 0x1000);		/* unknown kind */
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
	n = encode_merge(1, 1, SP_ITEM_ZERO, 0x1001);	/* unaligned */
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
	n = encode_merge(2, 1, SP_ITEM_ZERO, 0x1000);
	/* nitems says 2, packet cut to 1 item */
	pkt.h.len -= sizeof(struct sp_item);
	assert_int_equal(sp_decode(buf, (size_t)n - sizeof(struct sp_item), &m),
			 -EBADMSG);
}

static void header_checks(void **state)
{
	struct sp_msg m;
	struct sp_range r = { 0, 0 };
	int n = sp_encode(buf, sizeof(buf), SP_REG, &r, sizeof(r));

	(void)state;
	assert_int_equal(sp_decode(buf, 3, &m), -EBADMSG);	/* short */
	assert_int_equal(sp_decode(buf, (size_t)n - 1, &m), -EBADMSG);
	pkt.h.version = 99;
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EPROTO);
	pkt.h.version = SP_PROTO_VERSION;
	pkt.h.type = SP_TYPE_MAX;
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
	pkt.h.type = 0;
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
}

static void set_needs_nul(void **state)
{
	struct sp_set s;
	struct sp_msg m;
	int n;

	(void)state;
	memset(&s, 'a', sizeof(s));
	n = sp_encode(buf, sizeof(buf), SP_SET, &s, sizeof(s));
	assert_int_equal(sp_decode(buf, (size_t)n, &m), -EBADMSG);
	strcpy(s.name, "run");
	n = sp_encode(buf, sizeof(buf), SP_SET, &s, sizeof(s));
	assert_int_equal(sp_decode(buf, (size_t)n, &m), 0);
	assert_string_equal(m.u.set->name, "run");
}

static void encode_too_big(void **state)
{
	(void)state;
	assert_int_equal(sp_encode(buf, 16, SP_REG, buf, 64), -EMSGSIZE);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(roundtrip_range),
		cmocka_unit_test(merge_valid),
		cmocka_unit_test(merge_invalid),
		cmocka_unit_test(header_checks),
		cmocka_unit_test(set_needs_nul),
		cmocka_unit_test(encode_too_big),
	};

	return cmocka_run_group_tests_name("proto", tests, NULL, NULL);
}
