/*
 * guestload: the workload of the OS image guest (scripts/build_guest_image.sh), started by the
 * image's /sbin/init. It does three things at once and checks them:
 *
 *   memory   fills `mib` MiB with the pattern of pages.h and rewrites random pages at `rate` per
 *            second (as memwriter does), checking every page in a pass every `check_s` seconds;
 *   disk     keeps writing 4 KiB blocks to the raw data area `disk` (the image's third partition)
 *            with O_DIRECT and Linux AIO, `disk_rate` blocks per second, at most `disk_depth` in
 *            flight. Each block carries a header (magic, block index, global sequence number,
 *            run id, checksum of the whole block) and a payload derived from index and sequence.
 *            The sequence of the last *acknowledged* write of each block is kept in a table in
 *            memory (which migrates with the guest); a check reads each written block back and
 *            compares: an older sequence is a lost acknowledged write, a bad checksum or payload a
 *            torn one, a newer sequence a write the guest was never told of;
 *   network  a thread sends a UDP heartbeat every `hb_ms` ms to `hb_host`:`hb_port`:
 *            "MXHB1 <hb_id> <seq> <guest CLOCK_MONOTONIC ns>\n".
 *
 * Console lines (ttyS0):
 *   guestload: start mib=160 rate=1000 disk=/dev/vda3 blocks=4096 disk_rate=200 depth=4 hb=10.0.2.2:5000/10ms
 *   guestload: filled 160 MiB in 812 ms
 *   guestload: alive t=3 writes=3000 checks=1 disk_writes=600 disk_inflight=2 disk_errors=0 heartbeats=300
 *   guestload: check ok round=1 pages=40960 blocks=512         (each periodic pass)
 *   guestload: check FAIL round=2 mem_bad=1 first_page=7 disk_bad=0 lost=0 torn=0 unacked=0 first_block=-1
 *   guestload: selfcheck ok tag=T pages=40960 blocks=812 drained=2 drain_us=180
 *   guestload: selfcheck FAIL tag=T mem_bad=.. ... (as check FAIL)
 *
 * A self-check on demand: the host writes "selfcheck <tag>\n" to the command port `cmd` (the
 * second serial port); the guest stops submitting disk writes, waits for those in flight
 * (`drained` of them, in `drain_us`), checks all memory and every written block, prints the
 * result on the console, answers the same line on the command port, and carries on.
 * "ping\n" is answered "guestload: pong".
 *
 * Parameters: `key=value` lines, read from each file named on the command line in order (the
 * image's /etc/guestload.conf with defaults, then the agent's per-guest fw_cfg file), later
 * files overriding earlier ones.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "pages.h"

#define TICK_NS 10000000LL /* 10 ms */
#define BLOCK_BYTES 4096
#define BLOCK_WORDS (BLOCK_BYTES / 8)
#define BLOCK_MAGIC 0x44534b424c4f434bULL /* "DSKBLOCK" */
#define CHECK_CHUNK_BLOCKS 16            /* read back 64 KiB at a time */
#define MAX_DEPTH 64

struct config {
    long mib, rate, check_s;
    char disk[128];
    long disk_blocks, disk_rate, disk_depth;
    char hb_host[64];
    long hb_port, hb_ms;
    char hb_id[64];
    char cmd[128];
};

static struct config cfg = {
    .mib = 64, .rate = 1000, .check_s = 2,
    .disk = "", .disk_blocks = 0, .disk_rate = 200, .disk_depth = 4,
    .hb_host = "", .hb_port = 0, .hb_ms = 10, .hb_id = "guest",
    .cmd = "",
};

static void set_text(char *field, size_t size, const char *value) {
    snprintf(field, size, "%s", value);
}

static void read_config(const char *path) {
    FILE *file = fopen(path, "r");
    if (!file) return;
    char line[256];
    while (fgets(line, sizeof(line), file)) {
        line[strcspn(line, "\r\n")] = 0;
        char *eq = strchr(line, '=');
        if (!eq || line[0] == '#') continue;
        *eq = 0;
        const char *key = line, *value = eq + 1;
        long number = strtol(value, NULL, 10);
        if (!strcmp(key, "mib")) cfg.mib = number;
        else if (!strcmp(key, "rate")) cfg.rate = number;
        else if (!strcmp(key, "check_s")) cfg.check_s = number > 0 ? number : 1;
        else if (!strcmp(key, "disk")) set_text(cfg.disk, sizeof(cfg.disk), value);
        else if (!strcmp(key, "disk_blocks")) cfg.disk_blocks = number;
        else if (!strcmp(key, "disk_rate")) cfg.disk_rate = number;
        else if (!strcmp(key, "disk_depth")) cfg.disk_depth = number;
        else if (!strcmp(key, "hb_host")) set_text(cfg.hb_host, sizeof(cfg.hb_host), value);
        else if (!strcmp(key, "hb_port")) cfg.hb_port = number;
        else if (!strcmp(key, "hb_ms")) cfg.hb_ms = number;
        else if (!strcmp(key, "hb_id")) set_text(cfg.hb_id, sizeof(cfg.hb_id), value);
        else if (!strcmp(key, "cmd")) set_text(cfg.cmd, sizeof(cfg.cmd), value);
    }
    fclose(file);
}

/* ---- memory ------------------------------------------------------------------------- */

static uint64_t *memory, *page_seq;
static uint64_t npages;

struct mem_result {
    uint64_t bad, first;
};

static void check_page(uint64_t index, struct mem_result *result) {
    if (page_is_intact(memory + index * PAGE_WORDS, index, page_seq[index])) return;
    if (!result->bad) result->first = index;
    result->bad++;
}

/* ---- disk --------------------------------------------------------------------------- */

struct slot {
    struct iocb cb;
    uint64_t *buffer;
    uint64_t index, seq;
    int busy;
};

static int disk_fd = -1;
static aio_context_t aio;
static uint64_t nblocks, disk_seq, disk_writes, disk_errors, run_id;
static uint64_t *block_seq;      /* the sequence of each block's last acknowledged write, 0: none yet */
static unsigned char *in_flight; /* 1 while a write of that block is submitted and not yet completed */
static struct slot slots[MAX_DEPTH];
static long inflight;
static uint64_t *check_buffer;

struct disk_result {
    uint64_t bad, lost, torn, unacked;
    int64_t first;
};

static uint64_t block_checksum(const uint64_t *block) {
    uint64_t sum = 0x6a09e667f3bcc908ULL;
    for (uint64_t w = 0; w < BLOCK_WORDS; w++) sum = mix(sum ^ (w == 4 ? 0 : block[w]));
    return sum;
}

static void fill_block(uint64_t *block, uint64_t index, uint64_t seq) {
    uint64_t base = payload_base(index ^ run_id, seq);
    block[0] = BLOCK_MAGIC;
    block[1] = index;
    block[2] = seq;
    block[3] = run_id;
    block[4] = 0;
    for (uint64_t w = 5; w < BLOCK_WORDS; w++) block[w] = base + w * 0x9e3779b97f4a7c15ULL;
    block[4] = block_checksum(block);
}

static void check_block(const uint64_t *block, uint64_t index, struct disk_result *result) {
    uint64_t expected = block_seq[index];
    if (!expected || in_flight[index]) return; /* never written this run, or its write not yet answered */
    int bad = 0;
    if (block[0] != BLOCK_MAGIC || block[1] != index || block[3] != run_id || block[2] < expected) {
        result->lost++; /* an acknowledged write is not there: older content, another block's, or none */
        bad = 1;
    } else if (block[2] > expected) {
        result->unacked++; /* a write the guest was never told had completed */
        bad = 1;
    } else if (block_checksum(block) != block[4]) {
        result->torn++;
        bad = 1;
    } else {
        uint64_t base = payload_base(index ^ run_id, expected);
        for (uint64_t w = 5; w < BLOCK_WORDS; w++)
            if (block[w] != base + w * 0x9e3779b97f4a7c15ULL) {
                result->torn++;
                bad = 1;
                break;
            }
    }
    if (bad) {
        if (!result->bad) result->first = (int64_t)index;
        result->bad++;
    }
}

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **cbs) { return syscall(SYS_io_submit, ctx, n, cbs); }
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *events, struct timespec *timeout) {
    return syscall(SYS_io_getevents, ctx, min, max, events, timeout);
}

static int open_disk(void) {
    if (!cfg.disk[0]) return 0;
    disk_fd = open(cfg.disk, O_RDWR | O_DIRECT);
    if (disk_fd < 0) {
        printf("guestload: cannot open disk %s: %s\n", cfg.disk, strerror(errno));
        return -1;
    }
    uint64_t bytes = 0;
    if (ioctl(disk_fd, BLKGETSIZE64, &bytes) < 0) bytes = 0;
    nblocks = bytes / BLOCK_BYTES;
    if (cfg.disk_blocks > 0 && (uint64_t)cfg.disk_blocks < nblocks) nblocks = (uint64_t)cfg.disk_blocks;
    if (cfg.disk_depth < 1) cfg.disk_depth = 1;
    if (cfg.disk_depth > MAX_DEPTH) cfg.disk_depth = MAX_DEPTH;
    if (!nblocks || sys_io_setup((unsigned)cfg.disk_depth, &aio) < 0) {
        printf("guestload: cannot use disk %s (blocks=%llu): %s\n", cfg.disk, (unsigned long long)nblocks,
               strerror(errno));
        close(disk_fd);
        disk_fd = -1;
        return -1;
    }
    block_seq = calloc(nblocks, sizeof(uint64_t));
    in_flight = calloc(nblocks, 1);
    for (long i = 0; i < cfg.disk_depth; i++)
        if (posix_memalign((void **)&slots[i].buffer, BLOCK_BYTES, BLOCK_BYTES)) return -1;
    if (posix_memalign((void **)&check_buffer, BLOCK_BYTES, BLOCK_BYTES * CHECK_CHUNK_BLOCKS)) return -1;
    return block_seq && in_flight ? 0 : -1;
}

/* Take the answers of completed writes; wait for at least `min` of them. */
static void reap(long min) {
    struct io_event events[MAX_DEPTH];
    while (inflight > 0) {
        struct timespec zero = {0, 0};
        long got = sys_io_getevents(aio, min, MAX_DEPTH, events, min ? NULL : &zero);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return;
        for (long e = 0; e < got; e++) {
            struct slot *slot = &slots[events[e].data];
            if (events[e].res == BLOCK_BYTES) {
                block_seq[slot->index] = slot->seq; /* acknowledged: from now on it must be on the disk */
                disk_writes++;
            } else {
                disk_errors++;
                printf("guestload: disk write error block=%llu res=%lld\n", (unsigned long long)slot->index,
                       (long long)events[e].res);
            }
            in_flight[slot->index] = 0;
            slot->busy = 0;
            inflight--;
        }
        min = min > got ? min - got : 0;
        if (!min) return;
    }
}

static void submit_one(uint64_t *rng) {
    long free_slot = -1;
    for (long i = 0; i < cfg.disk_depth; i++)
        if (!slots[i].busy) {
            free_slot = i;
            break;
        }
    if (free_slot < 0) return;
    uint64_t index;
    do {
        *rng = mix(*rng);
        index = *rng % nblocks;
    } while (in_flight[index]);
    struct slot *slot = &slots[free_slot];
    slot->index = index;
    slot->seq = ++disk_seq;
    fill_block(slot->buffer, index, slot->seq);
    memset(&slot->cb, 0, sizeof(slot->cb));
    slot->cb.aio_data = (uint64_t)free_slot;
    slot->cb.aio_lio_opcode = IOCB_CMD_PWRITE;
    slot->cb.aio_fildes = (uint32_t)disk_fd;
    slot->cb.aio_buf = (uint64_t)(uintptr_t)slot->buffer;
    slot->cb.aio_nbytes = BLOCK_BYTES;
    slot->cb.aio_offset = (int64_t)(index * BLOCK_BYTES);
    struct iocb *list[1] = {&slot->cb};
    if (sys_io_submit(aio, 1, list) != 1) {
        disk_errors++;
        return;
    }
    slot->busy = 1;
    in_flight[index] = 1;
    inflight++;
}

/* Read blocks [first, first + count) back and check them. */
static void check_blocks(uint64_t first, uint64_t count, struct disk_result *result) {
    for (uint64_t at = first; at < first + count; at += CHECK_CHUNK_BLOCKS) {
        uint64_t n = first + count - at < CHECK_CHUNK_BLOCKS ? first + count - at : CHECK_CHUNK_BLOCKS;
        int wanted = 0;
        for (uint64_t i = 0; i < n; i++) wanted |= block_seq[at + i] && !in_flight[at + i];
        if (!wanted) continue;
        ssize_t got = pread(disk_fd, check_buffer, n * BLOCK_BYTES, (off_t)(at * BLOCK_BYTES));
        if (got != (ssize_t)(n * BLOCK_BYTES)) {
            disk_errors++;
            printf("guestload: disk read error block=%llu: %s\n", (unsigned long long)at, strerror(errno));
            continue;
        }
        for (uint64_t i = 0; i < n; i++) check_block(check_buffer + i * BLOCK_WORDS, at + i, result);
    }
}

static uint64_t blocks_written(void) {
    uint64_t written = 0;
    for (uint64_t i = 0; i < nblocks; i++) written += block_seq[i] != 0;
    return written;
}

/* ---- network ------------------------------------------------------------------------ */

static volatile uint64_t heartbeats_sent, heartbeat_errors;

static void *heartbeat_loop(void *unused) {
    (void)unused;
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.hb_port)};
    if (sock < 0 || inet_pton(AF_INET, cfg.hb_host, &to.sin_addr) != 1) {
        printf("guestload: no heartbeat: bad address %s\n", cfg.hb_host);
        return NULL;
    }
    long long period = cfg.hb_ms * 1000000LL;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t seq = 1;; seq++) {
        char message[160];
        int length = snprintf(message, sizeof(message), "MXHB1 %s %llu %lld\n", cfg.hb_id, (unsigned long long)seq,
                              now_ns());
        if (sendto(sock, message, (size_t)length, 0, (struct sockaddr *)&to, sizeof(to)) == length)
            heartbeats_sent++;
        else
            heartbeat_errors++;
        long long at = (long long)next.tv_sec * 1000000000LL + next.tv_nsec + period;
        if (now_ns() - at > 1000000000LL) at = now_ns(); /* stood still (paused): no burst to catch up */
        next.tv_sec = at / 1000000000LL;
        next.tv_nsec = at % 1000000000LL;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
        }
    }
    return NULL;
}

/* ---- checks and the command port ------------------------------------------------------ */

static int print_failure(const char *what, const char *label, const struct mem_result *mem,
                         const struct disk_result *disk) {
    return printf("guestload: %s FAIL %s mem_bad=%llu first_page=%lld disk_bad=%llu lost=%llu torn=%llu "
                  "unacked=%llu first_block=%lld\n",
                  what, label, (unsigned long long)mem->bad, mem->bad ? (long long)mem->first : -1LL,
                  (unsigned long long)disk->bad, (unsigned long long)disk->lost, (unsigned long long)disk->torn,
                  (unsigned long long)disk->unacked, (long long)disk->first);
}

static int cmd_fd = -1;

static void answer(const char *line) {
    fputs(line, stdout);
    if (cmd_fd >= 0) {
        ssize_t ignored = write(cmd_fd, line, strlen(line));
        (void)ignored;
    }
}

static void selfcheck(const char *tag) {
    long long started = now_ns();
    long drained = inflight;
    if (disk_fd >= 0) reap(inflight);
    long long drain_us = (now_ns() - started) / 1000;
    struct mem_result mem = {0, 0};
    struct disk_result disk = {0, 0, 0, 0, -1};
    for (uint64_t i = 0; i < npages; i++) check_page(i, &mem);
    if (disk_fd >= 0) check_blocks(0, nblocks, &disk);
    char line[512];
    if (mem.bad || disk.bad)
        snprintf(line, sizeof(line),
                 "guestload: selfcheck FAIL tag=%s mem_bad=%llu first_page=%lld disk_bad=%llu lost=%llu torn=%llu "
                 "unacked=%llu first_block=%lld\n",
                 tag, (unsigned long long)mem.bad, mem.bad ? (long long)mem.first : -1LL,
                 (unsigned long long)disk.bad, (unsigned long long)disk.lost, (unsigned long long)disk.torn,
                 (unsigned long long)disk.unacked, (long long)disk.first);
    else
        snprintf(line, sizeof(line), "guestload: selfcheck ok tag=%s pages=%llu blocks=%llu drained=%ld drain_us=%lld\n",
                 tag, (unsigned long long)npages, (unsigned long long)(disk_fd >= 0 ? blocks_written() : 0), drained,
                 drain_us);
    answer(line);
}

static void open_command_port(void) {
    if (!cfg.cmd[0]) return;
    cmd_fd = open(cfg.cmd, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (cmd_fd < 0) {
        printf("guestload: no command port %s: %s\n", cfg.cmd, strerror(errno));
        return;
    }
    struct termios tty;
    if (tcgetattr(cmd_fd, &tty) == 0) {
        cfmakeraw(&tty);
        cfsetspeed(&tty, B115200);
        tcsetattr(cmd_fd, TCSANOW, &tty);
    }
}

static void poll_commands(void) {
    static char pending[128];
    static size_t used;
    if (cmd_fd < 0) return;
    char chunk[64];
    ssize_t got;
    while ((got = read(cmd_fd, chunk, sizeof(chunk))) > 0) {
        for (ssize_t i = 0; i < got; i++) {
            if (chunk[i] != '\n' && chunk[i] != '\r') {
                if (used < sizeof(pending) - 1) pending[used++] = chunk[i];
                continue;
            }
            pending[used] = 0;
            used = 0;
            if (!strncmp(pending, "selfcheck", 9)) {
                const char *tag = pending[9] == ' ' ? pending + 10 : "-";
                selfcheck(tag[0] ? tag : "-");
            } else if (!strcmp(pending, "ping")) {
                answer("guestload: pong\n");
            } else if (pending[0]) {
                answer("guestload: unknown command\n");
            }
        }
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) read_config(argv[i]);
    if (cfg.mib < 1) cfg.mib = 1;
    npages = (uint64_t)cfg.mib * 1024 * 1024 / PAGE_BYTES;
    memory = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    page_seq = calloc(npages, sizeof(uint64_t));
    if (memory == MAP_FAILED || !page_seq) {
        printf("guestload: cannot allocate %ld MiB\n", cfg.mib);
        return 1;
    }
    run_id = mix((uint64_t)now_ns() ^ ((uint64_t)getpid() << 32));
    if (open_disk() < 0) printf("guestload: running without a disk\n");
    open_command_port();
    printf("guestload: start mib=%ld rate=%ld disk=%s blocks=%llu disk_rate=%ld depth=%ld hb=%s:%ld/%ldms cmd=%s\n",
           cfg.mib, cfg.rate, disk_fd >= 0 ? cfg.disk : "none", (unsigned long long)nblocks, cfg.disk_rate,
           cfg.disk_depth, cfg.hb_host[0] ? cfg.hb_host : "none", cfg.hb_port, cfg.hb_ms,
           cmd_fd >= 0 ? cfg.cmd : "none");

    long long started = now_ns();
    for (uint64_t i = 0; i < npages; i++) write_page(memory + i * PAGE_WORDS, i, 0);
    printf("guestload: filled %ld MiB in %lld ms\n", cfg.mib, (now_ns() - started) / 1000000);

    pthread_t heartbeat;
    if (cfg.hb_host[0] && cfg.hb_port > 0 && cfg.hb_ms > 0) pthread_create(&heartbeat, NULL, heartbeat_loop, NULL);

    uint64_t rng = mix((uint64_t)now_ns()), disk_rng = mix(rng ^ run_id);
    uint64_t writes = 0, page_cursor = 0, block_cursor = 0, rounds = 0;
    struct mem_result mem = {0, 0};
    struct disk_result disk = {0, 0, 0, 0, -1};
    double write_credit = 0, check_credit = 0, disk_credit = 0, block_check_credit = 0;
    double writes_per_tick = (double)cfg.rate * TICK_NS / 1e9;
    double checks_per_tick = (double)npages * TICK_NS / 1e9 / (double)cfg.check_s;
    double disk_per_tick = (double)cfg.disk_rate * TICK_NS / 1e9;
    double block_checks_per_tick = (double)nblocks * TICK_NS / 1e9 / (double)cfg.check_s;
    long long next_tick = now_ns(), next_alive = next_tick + 1000000000LL, t0 = next_tick;

    for (;;) {
        poll_commands();
        for (write_credit += writes_per_tick; write_credit >= 1; write_credit--) {
            rng = mix(rng);
            uint64_t index = rng % npages;
            page_seq[index]++;
            write_page(memory + index * PAGE_WORDS, index, page_seq[index]);
            writes++;
        }
        if (disk_fd >= 0) {
            reap(0);
            for (disk_credit += disk_per_tick; disk_credit >= 1 && inflight < cfg.disk_depth; disk_credit--)
                submit_one(&disk_rng);
            if (disk_credit > cfg.disk_depth) disk_credit = cfg.disk_depth; /* a slow disk: do not pile up */
        }
        /* The periodic pass: memory and disk advance together, one line when both are through. */
        for (check_credit += checks_per_tick; check_credit >= 1 && page_cursor < npages; check_credit--)
            check_page(page_cursor++, &mem);
        block_check_credit += block_checks_per_tick;
        if (disk_fd >= 0 && block_cursor < nblocks && block_check_credit >= CHECK_CHUNK_BLOCKS) {
            uint64_t n = (uint64_t)block_check_credit;
            if (n > nblocks - block_cursor) n = nblocks - block_cursor;
            check_blocks(block_cursor, n, &disk);
            block_cursor += n;
            block_check_credit -= (double)n;
        }
        if (page_cursor >= npages && (disk_fd < 0 || block_cursor >= nblocks)) {
            rounds++;
            char label[32];
            snprintf(label, sizeof(label), "round=%llu", (unsigned long long)rounds);
            if (mem.bad || disk.bad)
                print_failure("check", label, &mem, &disk);
            else
                printf("guestload: check ok %s pages=%llu blocks=%llu\n", label, (unsigned long long)npages,
                       (unsigned long long)(disk_fd >= 0 ? blocks_written() : 0));
            page_cursor = block_cursor = 0;
            check_credit = block_check_credit = 0;
            memset(&mem, 0, sizeof(mem));
            memset(&disk, 0, sizeof(disk));
            disk.first = -1;
        }
        long long now = now_ns();
        if (now >= next_alive) {
            printf("guestload: alive t=%lld writes=%llu checks=%llu disk_writes=%llu disk_inflight=%ld "
                   "disk_errors=%llu heartbeats=%llu\n",
                   (now - t0) / 1000000000LL, (unsigned long long)writes, (unsigned long long)rounds,
                   (unsigned long long)disk_writes, inflight, (unsigned long long)disk_errors,
                   (unsigned long long)heartbeats_sent);
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
