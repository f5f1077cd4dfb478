/*
 * sp_proto.h - the wire protocol between samepaged, the agent and the CLI.
 *
 * AF_UNIX SOCK_SEQPACKET: one message per packet.  Every message starts
 * with struct sp_hdr; a reply to the CLI ends with SP_END or SP_ERROR.
 * Both ends are on one machine, so structs travel in host byte order.
 * sp_decode() is a pure bytes-to-struct function (fuzzed by make fuzz).
 */
#ifndef SP_PROTO_H
#define SP_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SP_PROTO_VERSION 4
#define SP_MSG_MAX 65536
#define SP_ITEM_PAGES 512		/* pages in one merge item at most */
#define SP_ITEM_WORDS (SP_ITEM_PAGES / 64)
#define SP_BATCH_ITEMS 64		/* items in one merge message at most */

enum sp_type {
	SP_HELLO = 1,	     /* agent -> daemon: who I am */
	SP_WELCOME,	     /* daemon -> agent: pool fd attached */
	SP_REG,		     /* agent -> daemon: range became mergeable */
	SP_UNREG,	     /* agent -> daemon: range left (unmapped, ...) */
	SP_MERGE,	     /* daemon -> agent: merge these items */
	SP_MERGE_DONE,	     /* agent -> daemon: what was merged */
	SP_UNMERGE,	     /* daemon -> agent: unmerge everything */
	SP_UNMERGE_DONE,     /* agent -> daemon */
	SP_STATUS_REQ,	     /* cli -> daemon */
	SP_STATUS,	     /* daemon -> cli: global figures */
	SP_CLIENT,	     /* daemon -> cli: one per client */
	SP_SET,		     /* cli -> daemon: knob=value */
	SP_END,		     /* daemon -> cli: reply complete */
	SP_ERROR,	     /* daemon -> cli: reply failed */
	SP_TYPE_MAX
};

struct sp_hdr {
	uint16_t version;
	uint16_t type;
	uint32_t len;	/* payload bytes after this header */
};

/* How an agent keeps writes out while it compares and replaces a page. */
#define SP_SAFETY_MOVE 1	/* UFFDIO_MOVE: the page is moved out; pinned
				 * pages are refused */
#define SP_SAFETY_WP 2		/* userfaultfd write-protection: pinned
				 * pages are not detected (opted in) */

struct sp_hello {
	int32_t pid;
	uint32_t safety;	/* SP_SAFETY_*: how merges are made safe */
	char comm[16];
};

struct sp_welcome {
	uint64_t pool_bytes;
	int32_t daemon_pid;
	uint32_t pad;
};

struct sp_range {
	uint64_t start;
	uint64_t len;
};

enum sp_item_kind { SP_ITEM_POOL = 1, SP_ITEM_ZERO = 2 };

struct sp_item {
	uint64_t addr;
	uint64_t pgoff;		/* first pool page, SP_ITEM_POOL only */
	uint32_t npages;	/* 1 .. SP_ITEM_PAGES */
	uint32_t kind;
};

struct sp_merge {
	uint32_t batch;
	uint32_t nitems;
	/* struct sp_item items[nitems] follow */
};

/* Figures an agent reports with every reply. */
struct sp_figs {
	uint64_t pinned_skipped;
	uint64_t changed_skipped;
	uint64_t mappings;
	uint64_t map_budget;
	uint64_t budget_refusals;
};

struct sp_item_result {
	uint64_t merged[SP_ITEM_WORDS];	/* bit i: page i is merged now */
	/* bit i: page i sits in a file-backed mapping (a pool mapping
	 * whose copy-on-write was broken, or unmerged): UFFDIO_MOVE cannot
	 * take it, and the agent could not make it anonymous again
	 * (merge.c, agent_merge_again). */
	uint64_t immovable[SP_ITEM_WORDS];
	/* bit i: page i is pinned for I/O (UFFDIO_MOVE refused it twice),
	 * may be (merge.c, agent_merge_again), or was held back for a
	 * reason that may pass: worth trying again only some passes later */
	uint64_t pinned[SP_ITEM_WORDS];
};

/* Bit i of a result's bitmap (merged, immovable or pinned). */
static inline bool sp_bit(const uint64_t *w, size_t i)
{
	return w[i / 64] >> (i % 64) & 1;
}

static inline void sp_bit_set(uint64_t *w, size_t i)
{
	w[i / 64] |= 1ULL << (i % 64);
}

struct sp_merge_done {
	uint32_t batch;
	uint32_t nitems;
	struct sp_figs figs;
	/* struct sp_item_result results[nitems] follow */
};

struct sp_status {
	/* kernel KSM names and meanings */
	uint64_t pages_shared, pages_sharing, pages_unshared, pages_volatile;
	uint64_t pages_scanned, full_scans, ksm_zero_pages;
	int64_t general_profit;
	/* knobs */
	uint64_t pages_to_scan, sleep_millisecs, run, use_zero_pages;
	/* samepage's own */
	uint64_t clients, mappings, map_budget, pinned_skipped;
	uint64_t budget_refusals, pool_pages, metadata_bytes;
	uint64_t safety_move;	/* clients with the full (MOVE) safety net */
	uint64_t safety_wp;	/* clients merging by write-protection */
	uint64_t daemon_pid;
};

struct sp_client_info {
	int32_t pid;
	uint32_t safety;
	char comm[16];
	uint64_t merging_pages, zero_pages, registered_pages;
	uint64_t mappings, map_budget, pinned_skipped;
	int64_t profit;
};

struct sp_set {
	char name[32];
	int64_t value;
};

struct sp_error {
	int32_t err;		/* positive errno */
	char msg[124];
};

/* A decoded message; pointers point into the buffer that was decoded. */
struct sp_msg {
	int type;
	union {
		const struct sp_hello *hello;
		const struct sp_welcome *welcome;
		const struct sp_range *range;
		const struct sp_status *status;
		const struct sp_client_info *client;
		const struct sp_set *set;
		const struct sp_error *error;
		const struct sp_figs *figs;
	} u;
	const struct sp_merge *merge;
	const struct sp_item *items;
	const struct sp_merge_done *done;
	const struct sp_item_result *results;
};

/* A full batch and its answer each fit in one packet. */
_Static_assert(sizeof(struct sp_hdr) + sizeof(struct sp_merge) +
		       SP_BATCH_ITEMS * sizeof(struct sp_item) <= SP_MSG_MAX,
	       "a MERGE batch must fit in SP_MSG_MAX");
_Static_assert(sizeof(struct sp_hdr) + sizeof(struct sp_merge_done) +
		       SP_BATCH_ITEMS * sizeof(struct sp_item_result) <=
		       SP_MSG_MAX,
	       "a MERGE_DONE must fit in SP_MSG_MAX");

/* 0 and *out filled, or -EBADMSG / -EPROTO (version). */
int sp_decode(const void *buf, size_t n, struct sp_msg *out);
/* The header of a packet of type with plen payload bytes; -EMSGSIZE if
 * it would not fit in SP_MSG_MAX. */
int sp_header(struct sp_hdr *h, int type, size_t plen);
/* Write header + payload into buf; returns total length or -EMSGSIZE. */
int sp_encode(void *buf, size_t cap, int type, const void *payload,
	      size_t plen);

#endif /* SP_PROTO_H */
