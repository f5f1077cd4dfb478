/*
 * hash.h - the content hash: xxh3 from libxxhash.
 *
 * Debian builds the library's plain XXH3_64bits for baseline x86-64
 * (SSE2).  Its x86 dispatcher, in the same library, picks AVX2 or
 * AVX-512 at run time: 0.075 against 0.265 us a page on this machine,
 * for the same values.  Including its header makes XXH3_64bits the
 * dispatcher.
 */
#ifndef SP_HASH_H
#define SP_HASH_H

#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xxh_x86dispatch.h>
#endif

#endif
