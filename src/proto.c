/*
 * proto.c - encode and decode samepage protocol messages.
 *
 * The decoder is a pure function of its bytes: it checks the version, the
 * type and every length before anything reads a field, so a hostile or
 * truncated packet is refused rather than read past its end.
 */
#include <errno.h>
#include <string.h>

#include "sp_proto.h"

/* Fixed payload size of each type, or 0 for variable/empty. */
static const size_t fixed_len[SP_TYPE_MAX] = {
	[SP_HELLO] = sizeof(struct sp_hello),
	[SP_WELCOME] = sizeof(struct sp_welcome),
	[SP_REG] = sizeof(struct sp_range),
	[SP_UNREG] = sizeof(struct sp_range),
	[SP_UNMERGE_DONE] = sizeof(struct sp_figs),
	[SP_STATUS] = sizeof(struct sp_status),
	[SP_CLIENT] = sizeof(struct sp_client_info),
	[SP_SET] = sizeof(struct sp_set),
	[SP_ERROR] = sizeof(struct sp_error),
};

static int decode_merge(const char *p, size_t len, struct sp_msg *m)
{
	const struct sp_merge *h = (const void *)p;
	size_t i;

	if (len < sizeof(*h) || h->nitems > SP_BATCH_ITEMS)
		return -EBADMSG;
	if (len != sizeof(*h) + h->nitems * sizeof(struct sp_item))
		return -EBADMSG;
	m->merge = h;
	m->items = (const void *)(p + sizeof(*h));
	for (i = 0; i < h->nitems; i++) {
		const struct sp_item *it = &m->items[i];

		if (it->npages == 0 || it->npages > SP_ITEM_PAGES)
			return -EBADMSG;
		if (it->kind != SP_ITEM_POOL && it->kind != SP_ITEM_ZERO)
			return -EBADMSG;
		if (it->addr & 4095)
			return -EBADMSG;
	}
	return 0;
}

static int decode_done(const char *p, size_t len, struct sp_msg *m)
{
	const struct sp_merge_done *h = (const void *)p;

	if (len < sizeof(*h) || h->nitems > SP_BATCH_ITEMS)
		return -EBADMSG;
	if (len != sizeof(*h) + h->nitems * sizeof(struct sp_item_result))
		return -EBADMSG;
	m->done = h;
	m->results = (const void *)(p + sizeof(*h));
	return 0;
}

int sp_decode(const void *buf, size_t n, struct sp_msg *m)
{
	const struct sp_hdr *h = buf;
	const char *p = (const char *)buf + sizeof(*h);
	size_t len;

	memset(m, 0, sizeof(*m));
	if (n < sizeof(*h))
		return -EBADMSG;
	if (h->version != SP_PROTO_VERSION)
		return -EPROTO;
	if (h->type == 0 || h->type >= SP_TYPE_MAX)
		return -EBADMSG;
	len = n - sizeof(*h);
	if (h->len != len)
		return -EBADMSG;
	m->type = h->type;
	if (h->type == SP_MERGE)
		return decode_merge(p, len, m);
	if (h->type == SP_MERGE_DONE)
		return decode_done(p, len, m);
	if (len != fixed_len[h->type])
		return -EBADMSG;
	m->u.hello = (const void *)p;	/* every union member aliases p */
	if (h->type == SP_SET && !memchr(m->u.set->name, 0, 32))
		return -EBADMSG;
	return 0;
}

int sp_header(struct sp_hdr *h, int type, size_t plen)
{
	if (plen > SP_MSG_MAX - sizeof(*h))
		return -EMSGSIZE;
	*h = (struct sp_hdr){ SP_PROTO_VERSION, (uint16_t)type,
			      (uint32_t)plen };
	return 0;
}

int sp_encode(void *buf, size_t cap, int type, const void *payload,
	      size_t plen)
{
	struct sp_hdr h;

	if (sp_header(&h, type, plen) < 0 || sizeof(h) + plen > cap)
		return -EMSGSIZE;
	memcpy(buf, &h, sizeof(h));
	if (plen)
		memcpy((char *)buf + sizeof(h), payload, plen);
	return (int)(sizeof(h) + plen);
}
