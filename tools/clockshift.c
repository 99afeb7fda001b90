/* clockshift: moves one process's wall clock, and nothing else, for tools/soak.py's
 * `wall_clock_jump` fault.
 *
 * Setting the machine's real clock (CAP_SYS_TIME) would move it for the broker, the soak's own
 * ledger and everything else on the box, and a CI container may not be allowed to. So the
 * daemon under test is started with this library in LD_PRELOAD: it adds an offset to
 * CLOCK_REALTIME (clock_gettime, gettimeofday, time), read on every call from an 8-byte file
 * that the soak rewrites to jump the clock forward or back while the daemon runs. The
 * monotonic clocks, sleeps and timed waits are untouched, as they are when an NTP step or
 * `date -s` sets a real clock. (libfaketime 0.9.10 was tried first: it broke time.sleep
 * with EINVAL once the monotonic clock was left unfaked.)
 *
 *   cc -shared -fPIC -O2 -o clockshift.so tools/clockshift.c -ldl
 *   EDGED_CLOCKSHIFT_FILE=offset LD_PRELOAD=./clockshift.so python -m edged run ...
 *
 * The file holds a signed 64-bit count of nanoseconds in native byte order; no file, or a
 * short one, means no shift. It is mapped shared, so a write is seen by the next call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static const volatile int64_t *offset_ns;

__attribute__((constructor)) static void clockshift_init(void) {
    real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    const char *path = getenv("EDGED_CLOCKSHIFT_FILE");
    if (path == NULL) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(int64_t)) {
        void *map = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
        if (map != MAP_FAILED) offset_ns = (const volatile int64_t *)map;
    }
    close(fd); /* the mapping outlives the descriptor */
}

static int64_t shift(void) { return offset_ns != NULL ? *offset_ns : 0; }

static void add_ns(struct timespec *ts, int64_t ns) {
    int64_t total = (int64_t)ts->tv_nsec + ns % 1000000000LL;
    ts->tv_sec += (time_t)(ns / 1000000000LL);
    if (total < 0) {
        total += 1000000000LL;
        ts->tv_sec -= 1;
    } else if (total >= 1000000000LL) {
        total -= 1000000000LL;
        ts->tv_sec += 1;
    }
    ts->tv_nsec = (long)total;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    if (real_clock_gettime == NULL)
        real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(clock, ts);
    if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        add_ns(ts, shift());
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz; /* obsolete; glibc ignores it too */
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0) { /* tv: declared nonnull by glibc */
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (out != NULL) *out = ts.tv_sec;
    return ts.tv_sec;
}
