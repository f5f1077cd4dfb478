/* fuzz_decode.c - libFuzzer target: sp_decode() must accept or refuse
 * any bytes without reading past them. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sp_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct sp_msg m;
	uint64_t *buf = malloc(size ? size : 1);	/* exact size: ASan
							 * sees overreads */
	if (!buf)
		return 0;
	memcpy(buf, data, size);
	if (sp_decode(buf, size, &m) == 0 && m.type == SP_MERGE) {
		volatile uint64_t sum = 0;

		for (uint32_t i = 0; i < m.merge->nitems; i++)
			sum += m.items[i].addr;
	}
	free(buf);
	return 0;
}
