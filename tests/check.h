/* Minimal test harness: CHECK records failures and goes on; main returns
 * check_summary(), which prints "N passed, M failed" (read by CI). */
#ifndef BLIP2_TEST_CHECK_H
#define BLIP2_TEST_CHECK_H

#include <math.h>
#include <stdio.h>
#include <string.h>

static int check_pass_count, check_fail_count;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (cond) {                                                        \
            check_pass_count++;                                            \
        } else {                                                           \
            check_fail_count++;                                            \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

/* Checks that `msg` contains every one of the given substrings. */
#define CHECK_MSG_HAS(msg, sub) CHECK(strstr((msg), (sub)) != NULL, "message '%s' lacks '%s'", (msg), (sub))

static inline int check_summary(void) {
    printf("%d passed, %d failed\n", check_pass_count, check_fail_count);
    return check_fail_count ? 1 : 0;
}

/* ||a-b|| / ||b|| in double. */
static inline double check_rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
        if (isnan(a[i])) return INFINITY;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

#ifndef BLIP2_SHARED_DIR
#define BLIP2_SHARED_DIR "../shared"
#endif

#endif
