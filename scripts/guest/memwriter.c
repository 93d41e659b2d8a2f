/*
 * memwriter: the test guest's workload, run by the initramfs's init.
 *
 * It fills N MiB with a known pattern, then keeps rewriting random pages at a set rate
 * while walking over all pages to check them, and reports on the serial console:
 *
 *   memwriter: start mib=64 rate=2000 check_s=2
 *   memwriter: filled 64 MiB in 812 ms
 *   memwriter: alive t=3 writes=6000 checks=1          (every second)
 *   memwriter: selfcheck ok round=1 pages=16384        (after each full pass)
 *   memwriter: selfcheck FAIL round=2 bad=3 first=517  (a page lost or corrupted)
 *
 * The pattern and its check are in pages.h (shared with guestload, the OS image's workload).
 *
 * Parameters come from the kernel command line: memwriter.mib=, memwriter.rate= (pages
 * written per second), memwriter.check_s= (seconds per full check pass).
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pages.h"

#define TICK_NS 10000000LL /* 10 ms */

struct params {
    long mib;
    long rate;
    long check_s;
};

static long cmdline_value(const char *cmdline, const char *key, long fallback) {
    const char *found = strstr(cmdline, key);
    if (!found) return fallback;
    long value = strtol(found + strlen(key), NULL, 10);
    return value > 0 ? value : fallback;
}

static struct params read_params(void) {
    char cmdline[4096] = {0};
    mkdir("/proc", 0555);
    mount("proc", "/proc", "proc", 0, NULL);
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t got = read(fd, cmdline, sizeof(cmdline) - 1);
        (void)got;
        close(fd);
    }
    struct params p = {
        .mib = cmdline_value(cmdline, "memwriter.mib=", 64),
        .rate = cmdline_value(cmdline, "memwriter.rate=", 1000),
        .check_s = cmdline_value(cmdline, "memwriter.check_s=", 2),
    };
    return p;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct params p = read_params();
    uint64_t npages = (uint64_t)p.mib * 1024 * 1024 / PAGE_BYTES;
    printf("memwriter: start mib=%ld rate=%ld check_s=%ld\n", p.mib, p.rate, p.check_s);

    uint64_t *memory = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *seq_table = calloc(npages, sizeof(uint64_t));
    if (memory == MAP_FAILED || !seq_table) {
        printf("memwriter: cannot allocate %ld MiB\n", p.mib);
        return 1;
    }
    long long started = now_ns();
    for (uint64_t i = 0; i < npages; i++) write_page(memory + i * PAGE_WORDS, i, 0);
    printf("memwriter: filled %ld MiB in %lld ms\n", p.mib, (now_ns() - started) / 1000000);

    uint64_t rng = mix((uint64_t)now_ns());
    uint64_t writes = 0, check_cursor = 0, check_rounds = 0, bad_in_round = 0, first_bad = 0;
    double write_credit = 0, check_credit = 0;
    double writes_per_tick = (double)p.rate * TICK_NS / 1e9;
    double checks_per_tick = (double)npages * TICK_NS / 1e9 / (double)p.check_s;
    long long next_tick = now_ns(), next_alive = next_tick + 1000000000LL, t0 = next_tick;

    for (;;) {
        for (write_credit += writes_per_tick; write_credit >= 1; write_credit--) {
            rng = mix(rng);
            uint64_t index = rng % npages;
            seq_table[index]++;
            write_page(memory + index * PAGE_WORDS, index, seq_table[index]);
            writes++;
        }
        for (check_credit += checks_per_tick; check_credit >= 1; check_credit--) {
            if (!page_is_intact(memory + check_cursor * PAGE_WORDS, check_cursor, seq_table[check_cursor])) {
                if (!bad_in_round) first_bad = check_cursor;
                bad_in_round++;
            }
            if (++check_cursor < npages) continue;
            check_rounds++;
            if (bad_in_round)
                printf("memwriter: selfcheck FAIL round=%llu bad=%llu first=%llu\n",
                       (unsigned long long)check_rounds, (unsigned long long)bad_in_round,
                       (unsigned long long)first_bad);
            else
                printf("memwriter: selfcheck ok round=%llu pages=%llu\n", (unsigned long long)check_rounds,
                       (unsigned long long)npages);
            check_cursor = 0;
            bad_in_round = 0;
        }
        long long now = now_ns();
        if (now >= next_alive) {
            printf("memwriter: alive t=%lld writes=%llu checks=%llu\n", (now - t0) / 1000000000LL,
                   (unsigned long long)writes, (unsigned long long)check_rounds);
            next_alive += 1000000000LL;
            if (next_alive < now) next_alive = now + 1000000000LL;
        }
        next_tick += TICK_NS;
        if (next_tick > now) {
            struct timespec pause = {0, next_tick - now};
            nanosleep(&pause, NULL);
        } else if (now - next_tick > 1000000000LL) {
            next_tick = now; /* fell far behind (e.g. the VM was paused): do not burst to catch up */
        }
    }
}
