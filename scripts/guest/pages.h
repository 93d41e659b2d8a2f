/*
 * The memory pattern both guest workloads (memwriter, guestload) write and check.
 *
 * Every page holds its own index and a sequence number in its first words and a payload
 * derived from both; the caller keeps, elsewhere in memory, the sequence each page must have.
 * A page whose contents no longer match its header, or whose header is older than that table
 * (a write lost by a migration), fails the check.
 */
#ifndef GUEST_PAGES_H
#define GUEST_PAGES_H

#include <stdint.h>
#include <time.h>

#define PAGE_BYTES 4096
#define PAGE_WORDS (PAGE_BYTES / 8)
#define MAGIC 0x4d454d5752495445ULL /* "MEMWRITE" */

/* splitmix64's finaliser: a cheap, well-mixed 64-bit hash. */
static inline uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t payload_base(uint64_t index, uint64_t seq) { return mix(index * 0x100000001b3ULL ^ mix(seq)); }

static inline void write_page(uint64_t *page, uint64_t index, uint64_t seq) {
    uint64_t base = payload_base(index, seq);
    page[0] = MAGIC;
    page[1] = index;
    page[2] = seq;
    for (uint64_t w = 3; w < PAGE_WORDS; w++) page[w] = base + w * 0x9e3779b97f4a7c15ULL;
}

static inline int page_is_intact(const uint64_t *page, uint64_t index, uint64_t expected_seq) {
    if (page[0] != MAGIC || page[1] != index || page[2] != expected_seq) return 0;
    uint64_t base = payload_base(index, expected_seq);
    for (uint64_t w = 3; w < PAGE_WORDS; w++)
        if (page[w] != base + w * 0x9e3779b97f4a7c15ULL) return 0;
    return 1;
}

static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
