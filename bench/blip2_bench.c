/* blip2-bench: throughput and latency of one or several running blip2d servers, over gRPC.
 *
 * Closed loop (--concurrency N clients, each sending its next request when the last one ended) or
 * open loop (--rate R: Poisson arrivals from a seeded generator, served by a bounded pool of
 * threads), for a number of requests (--requests) or a time (--duration), optionally for several
 * concurrencies in turn (--sweep). Requests go round-robin over the --server replicas. Reports
 * requests/s, generated tokens/s, time to first token and time per output token (--stream),
 * end-to-end latency percentiles and errors by status code: a table on stdout, every request in
 * --json-out, and a PNG (--plot, drawn by gnuplot) of throughput vs p99 latency and the TTFT
 * distribution. See bench/README.md ("blip2-bench"). */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../launcher/grpc_util.h"
#include "blip2.pb-c.h"

#define METHOD_GENERATE "/blip2.v1.Blip2/Generate"
#define METHOD_STREAM "/blip2.v1.Blip2/GenerateStream"
#define METHOD_INFO "/blip2.v1.Blip2/ModelInfo"

#define DEFAULT_SERVER "127.0.0.1:50051"
#define DEFAULT_PROMPT "Question: what is in the picture? Answer:"
#define DEFAULT_REQUESTS 100
#define DEFAULT_POOL 64       /* open loop: threads (requests in flight at most) without --concurrency */
#define MAX_CONCURRENCY 4096
#define MAX_IMAGE_BYTES (256u << 20)
#define INFO_TIMEOUT_MS 10000
#define PLOT_CDF_POINTS 2000  /* a CDF curve is thinned to at most this many points */

/* Status slots: the 17 gRPC codes, then the client's own failures. */
#define N_GRPC_CODES 17
#define CODE_CALL_FAILED (-1) /* the call could not even be started */
#define CODE_BAD_REPLY 100    /* undecodable reply, or a stream without its final message */
#define N_SLOTS (N_GRPC_CODES + 3)

static volatile sig_atomic_t g_stop; /* SIGINT/SIGTERM: send nothing new, finish what is in flight */

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                                */

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "blip2-bench: out of memory\n");
        exit(2);
    }
    return p;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "blip2-bench: out of memory\n");
        exit(2);
    }
    return q;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = xmalloc(n);
    memcpy(d, s, n);
    return d;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Sleeps until the monotonic time t (seconds), in slices, so that a stop request is seen. */
static void sleep_until(double t) {
    for (;;) {
        if (g_stop) return;
        double left = t - now_s();
        if (left <= 0) return;
        if (left > 0.1) left = 0.1;
        struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static const char *code_name(int code) {
    if (code == CODE_CALL_FAILED) return "CALL_FAILED";
    if (code == CODE_BAD_REPLY) return "BAD_REPLY";
    if (code < 0 || code >= N_GRPC_CODES) return "UNKNOWN_CODE";
    return blip2_rpc_code_name(code);
}

static int code_slot(int code) {
    if (code >= 0 && code < N_GRPC_CODES) return code;
    if (code == CODE_CALL_FAILED) return N_GRPC_CODES;
    if (code == CODE_BAD_REPLY) return N_GRPC_CODES + 1;
    return N_GRPC_CODES + 2;
}

static int slot_code(int slot) {
    if (slot < N_GRPC_CODES) return slot;
    if (slot == N_GRPC_CODES) return CODE_CALL_FAILED;
    if (slot == N_GRPC_CODES + 1) return CODE_BAD_REPLY;
    return 1000;
}

static const char *finish_name(int f) {
    switch (f) {
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_EOS: return "eos";
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_LENGTH: return "length";
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_STOP: return "stop";
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_CANCELLED: return "cancelled";
    default: return NULL;
    }
}

/* Reads a whole file; NULL (errno set) on failure. */
static uint8_t *read_file(const char *path, size_t *len, size_t limit) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = xmalloc(cap);
    for (;;) {
        if (n == cap) {
            if (cap >= limit) {
                free(buf);
                fclose(f);
                errno = EFBIG;
                return NULL;
            }
            cap *= 2;
            buf = xrealloc(buf, cap);
        }
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (k == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        errno = EIO;
        return NULL;
    }
    if (n > limit) {
        free(buf);
        errno = EFBIG;
        return NULL;
    }
    *len = n;
    return buf;
}

/* Splits text into lines (strips "\r"); a final newline does not start another line. */
static char **split_lines(const char *text, size_t len, int *n_out) {
    int cap = 16, n = 0;
    char **v = xmalloc(sizeof(char *) * (size_t)cap);
    size_t i = 0;
    while (i < len) {
        size_t j = i;
        while (j < len && text[j] != '\n') j++;
        size_t e = j;
        if (e > i && text[e - 1] == '\r') e--;
        if (n == cap) {
            cap *= 2;
            v = xrealloc(v, sizeof(char *) * (size_t)cap);
        }
        char *s = xmalloc(e - i + 1);
        memcpy(s, text + i, e - i);
        s[e - i] = '\0';
        v[n++] = s;
        i = j + 1;
    }
    *n_out = n;
    return v;
}

static void free_strv(char **v, int n) {
    for (int i = 0; i < n; i++) free(v[i]);
    free(v);
}

static char *trim(char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

/* ------------------------------------------------------------------------------------------ */
/* statistics                                                                                  */

typedef struct {
    int n;
    double mean, min, p50, p90, p99, max;
} dist;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile (0..100) of sorted values, interpolating linearly between the closest
 * ranks (numpy's default); NAN when there are none. */
static double percentile_sorted(const double *v, int n, double p) {
    if (n <= 0) return NAN;
    if (n == 1) return v[0];
    double pos = p / 100.0 * (double)(n - 1);
    int lo = (int)floor(pos);
    if (lo < 0) lo = 0;
    if (lo >= n - 1) return v[n - 1];
    double frac = pos - (double)lo;
    return v[lo] + (v[lo + 1] - v[lo]) * frac;
}

/* Sorts v in place and fills d (all NAN when n == 0). */
static void dist_compute(double *v, int n, dist *d) {
    d->n = n;
    if (n == 0) {
        d->mean = d->min = d->p50 = d->p90 = d->p99 = d->max = NAN;
        return;
    }
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    d->mean = sum / n;
    d->min = v[0];
    d->max = v[n - 1];
    d->p50 = percentile_sorted(v, n, 50);
    d->p90 = percentile_sorted(v, n, 90);
    d->p99 = percentile_sorted(v, n, 99);
}

/* Exponential gaps for Poisson arrivals: splitmix64, seeded. */
typedef struct {
    uint64_t s;
} rng64;

static uint64_t rng_next(rng64 *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static double rng_uniform(rng64 *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

/* A gap of a Poisson process with `rate` events per second (seconds, mean 1/rate). */
static double exp_gap(rng64 *r, double rate) { return -log1p(-rng_uniform(r)) / rate; }

/* ------------------------------------------------------------------------------------------ */
/* options                                                                                      */

typedef struct {
    char **servers;
    int n_servers;
    int concurrency;
    bool concurrency_set;
    double rate;     /* requests/s; 0: closed loop */
    long requests;   /* 0: no count limit */
    double duration; /* seconds; 0: no time limit */
    const char *images_dir, *image_list, *prompts_file, *prompt;
    uint32_t max_new_tokens, min_new_tokens, num_beams, top_k;
    bool do_sample, has_seed, has_decoding;
    float temperature, top_p;
    uint64_t seed;
    long warmup;
    int repeat_images; /* 0: off; else the size of the cycled set */
    bool unique_images, stream, progress;
    int64_t timeout_ms;
    int *sweep;
    int n_sweep;
    const char *json_out, *plot;
    uint64_t arrival_seed;
    double wait_ready; /* seconds to wait for every server to answer ModelInfo; 0: no wait */
} bench_opts;

static void usage(FILE *f) {
    fprintf(f,
            "usage: blip2-bench [--server ADDR[,ADDR...]] (--images DIR | --image-list FILE) [options]\n"
            "\n"
            "load:\n"
            "  --server ADDR[,ADDR...]  blip2d replicas (host:port), requests round-robin (default " DEFAULT_SERVER ")\n"
            "  --concurrency N          closed loop: N clients, each sends when its last request ended (default 1);\n"
            "                           with --rate: the most requests in flight (default %d)\n"
            "  --rate R                 open loop: Poisson arrivals at R requests/s\n"
            "  --arrival-seed N         seed of the arrival times (default 1)\n"
            "  --requests N             measured requests per run (default %d when --duration is not given)\n"
            "  --duration SECONDS       send for this long per run (with --requests: whichever ends first)\n"
            "  --sweep N1,N2,...        one closed-loop run per concurrency\n"
            "  --warmup N               requests sent first and left out of every statistic (default 0)\n"
            "  --timeout-ms N           deadline of each request (default 60000; 0: none)\n"
            "  --wait-ready SECONDS     first wait until every server answers ModelInfo (its model is loaded)\n"
            "  --stream                 GenerateStream: time to first token and time per output token\n"
            "inputs:\n"
            "  --images DIR             every .jpg/.jpeg/.png in DIR, sorted by name, cycled\n"
            "  --image-list FILE        image paths, one per line ('#' comments)\n"
            "  --repeat-images[=K]      cycle only the first K images (default 2): image-embedding cache hits\n"
            "  --unique-images          make every request's image bytes unique (no cache hits)\n"
            "  --prompts FILE           prompts, one per line, cycled; an empty line = caption\n"
            "  --prompt TEXT            one prompt (default \"" DEFAULT_PROMPT "\")\n"
            "  --max-new-tokens N       (default 0: the server's default)\n"
            "  --min-new-tokens N       suppress eos until N tokens (fixed-length answers)\n"
            "  --num-beams N  --do-sample  --temperature F  --top-k N  --top-p F  --seed N\n"
            "output:\n"
            "  --json-out FILE          summary and every request's timings as JSON\n"
            "  --plot FILE.png          throughput vs p99 latency and the TTFT distribution (gnuplot)\n"
            "  --no-progress            no progress line (it is shown only on a terminal anyway)\n",
            DEFAULT_POOL, DEFAULT_REQUESTS);
}

static int bad_arg(const char *opt, const char *val, const char *want) {
    fprintf(stderr, "blip2-bench: %s '%s': expected %s\n", opt, val, want);
    return -1;
}

static int parse_long(const char *opt, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        char want[96];
        snprintf(want, sizeof want, "an integer in [%ld, %ld]", lo, hi);
        return bad_arg(opt, s, want);
    }
    *out = v;
    return 0;
}

static int parse_double(const char *opt, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        char want[96];
        snprintf(want, sizeof want, "a number in [%g, %g]", lo, hi);
        return bad_arg(opt, s, want);
    }
    *out = v;
    return 0;
}

static int parse_u64(const char *opt, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    if (*s == '-') return bad_arg(opt, s, "an unsigned integer");
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return bad_arg(opt, s, "an unsigned integer");
    *out = v;
    return 0;
}

/* "a,b,c" into a list of non-empty trimmed strings. */
static int parse_servers(const char *s, bench_opts *o) {
    char *copy = xstrdup(s), *save = NULL;
    int cap = 4;
    free_strv(o->servers, o->n_servers);
    o->servers = xmalloc(sizeof(char *) * (size_t)cap);
    o->n_servers = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *t = trim(tok);
        if (!*t) continue;
        if (o->n_servers == cap) {
            cap *= 2;
            o->servers = xrealloc(o->servers, sizeof(char *) * (size_t)cap);
        }
        o->servers[o->n_servers++] = xstrdup(t);
    }
    free(copy);
    if (o->n_servers == 0) return bad_arg("--server", s, "host:port[,host:port...]");
    return 0;
}

static int parse_sweep(const char *s, bench_opts *o) {
    char *copy = xstrdup(s), *save = NULL;
    int cap = 8, rc = 0;
    free(o->sweep);
    o->sweep = xmalloc(sizeof(int) * (size_t)cap);
    o->n_sweep = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        long v;
        if (parse_long("--sweep", trim(tok), 1, MAX_CONCURRENCY, &v)) {
            rc = -1;
            break;
        }
        if (o->n_sweep == cap) {
            cap *= 2;
            o->sweep = xrealloc(o->sweep, sizeof(int) * (size_t)cap);
        }
        o->sweep[o->n_sweep++] = (int)v;
    }
    free(copy);
    if (rc == 0 && o->n_sweep == 0) rc = bad_arg("--sweep", s, "concurrencies like 1,4,16,64");
    return rc;
}

enum {
    OPT_SERVER = 256, OPT_CONCURRENCY, OPT_RATE, OPT_ARRIVAL_SEED, OPT_REQUESTS, OPT_DURATION, OPT_SWEEP,
    OPT_WARMUP, OPT_TIMEOUT, OPT_STREAM, OPT_IMAGES, OPT_IMAGE_LIST, OPT_REPEAT, OPT_UNIQUE, OPT_PROMPTS,
    OPT_PROMPT, OPT_MAX_NEW, OPT_MIN_NEW, OPT_BEAMS, OPT_SAMPLE, OPT_TEMP, OPT_TOPK, OPT_TOPP, OPT_SEED,
    OPT_JSON, OPT_PLOT, OPT_NO_PROGRESS, OPT_WAIT_READY, OPT_HELP
};

/* 0: run; 1: --help was printed; -1: bad arguments (message printed). */
static int parse_args(int argc, char **argv, bench_opts *o) {
    static const struct option longopts[] = {
        {"server", required_argument, NULL, OPT_SERVER},
        {"concurrency", required_argument, NULL, OPT_CONCURRENCY},
        {"rate", required_argument, NULL, OPT_RATE},
        {"arrival-seed", required_argument, NULL, OPT_ARRIVAL_SEED},
        {"requests", required_argument, NULL, OPT_REQUESTS},
        {"duration", required_argument, NULL, OPT_DURATION},
        {"sweep", required_argument, NULL, OPT_SWEEP},
        {"warmup", required_argument, NULL, OPT_WARMUP},
        {"timeout-ms", required_argument, NULL, OPT_TIMEOUT},
        {"stream", no_argument, NULL, OPT_STREAM},
        {"images", required_argument, NULL, OPT_IMAGES},
        {"image-list", required_argument, NULL, OPT_IMAGE_LIST},
        {"repeat-images", optional_argument, NULL, OPT_REPEAT},
        {"unique-images", no_argument, NULL, OPT_UNIQUE},
        {"prompts", required_argument, NULL, OPT_PROMPTS},
        {"prompt", required_argument, NULL, OPT_PROMPT},
        {"max-new-tokens", required_argument, NULL, OPT_MAX_NEW},
        {"min-new-tokens", required_argument, NULL, OPT_MIN_NEW},
        {"num-beams", required_argument, NULL, OPT_BEAMS},
        {"do-sample", no_argument, NULL, OPT_SAMPLE},
        {"temperature", required_argument, NULL, OPT_TEMP},
        {"top-k", required_argument, NULL, OPT_TOPK},
        {"top-p", required_argument, NULL, OPT_TOPP},
        {"seed", required_argument, NULL, OPT_SEED},
        {"json-out", required_argument, NULL, OPT_JSON},
        {"plot", required_argument, NULL, OPT_PLOT},
        {"no-progress", no_argument, NULL, OPT_NO_PROGRESS},
        {"wait-ready", required_argument, NULL, OPT_WAIT_READY},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    o->concurrency = 1;
    o->timeout_ms = 60000;
    o->progress = true;
    o->arrival_seed = 1;
    if (parse_servers(DEFAULT_SERVER, o)) return -1;
    opterr = 0;
    optind = 1;
    int c;
    long l;
    double d;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        const char *a = optarg;
        switch (c) {
        case OPT_SERVER:
            if (parse_servers(a, o)) return -1;
            break;
        case OPT_CONCURRENCY:
            if (parse_long("--concurrency", a, 1, MAX_CONCURRENCY, &l)) return -1;
            o->concurrency = (int)l;
            o->concurrency_set = true;
            break;
        case OPT_RATE:
            if (parse_double("--rate", a, 1e-6, 1e6, &o->rate)) return -1;
            break;
        case OPT_ARRIVAL_SEED:
            if (parse_u64("--arrival-seed", a, &o->arrival_seed)) return -1;
            break;
        case OPT_REQUESTS:
            if (parse_long("--requests", a, 1, 1000000000L, &o->requests)) return -1;
            break;
        case OPT_DURATION:
            if (parse_double("--duration", a, 0.001, 7 * 86400.0, &o->duration)) return -1;
            break;
        case OPT_SWEEP:
            if (parse_sweep(a, o)) return -1;
            break;
        case OPT_WARMUP:
            if (parse_long("--warmup", a, 0, 1000000000L, &o->warmup)) return -1;
            break;
        case OPT_TIMEOUT:
            if (parse_long("--timeout-ms", a, 0, 7L * 86400 * 1000, &l)) return -1;
            o->timeout_ms = l;
            break;
        case OPT_STREAM: o->stream = true; break;
        case OPT_IMAGES: o->images_dir = a; break;
        case OPT_IMAGE_LIST: o->image_list = a; break;
        case OPT_REPEAT:
            o->repeat_images = 2;
            if (!a && optind < argc && argv[optind][0] && strspn(argv[optind], "0123456789") == strlen(argv[optind]))
                a = argv[optind++]; /* "--repeat-images 3" as well as "--repeat-images=3" */
            if (a) {
                if (parse_long("--repeat-images", a, 1, INT_MAX, &l)) return -1;
                o->repeat_images = (int)l;
            }
            break;
        case OPT_UNIQUE: o->unique_images = true; break;
        case OPT_PROMPTS: o->prompts_file = a; break;
        case OPT_PROMPT: o->prompt = a; break;
        case OPT_MAX_NEW:
            if (parse_long("--max-new-tokens", a, 0, 1000000, &l)) return -1;
            o->max_new_tokens = (uint32_t)l;
            break;
        case OPT_MIN_NEW:
            if (parse_long("--min-new-tokens", a, 0, 1000000, &l)) return -1;
            o->min_new_tokens = (uint32_t)l;
            o->has_decoding = true;
            break;
        case OPT_BEAMS:
            if (parse_long("--num-beams", a, 1, 1000, &l)) return -1;
            o->num_beams = (uint32_t)l;
            o->has_decoding = true;
            break;
        case OPT_SAMPLE:
            o->do_sample = true;
            o->has_decoding = true;
            break;
        case OPT_TEMP:
            if (parse_double("--temperature", a, 1e-6, 1000, &d)) return -1;
            o->temperature = (float)d;
            o->has_decoding = true;
            break;
        case OPT_TOPK:
            if (parse_long("--top-k", a, 0, 10000000, &l)) return -1;
            o->top_k = (uint32_t)l;
            o->has_decoding = true;
            break;
        case OPT_TOPP:
            if (parse_double("--top-p", a, 1e-6, 1, &d)) return -1;
            o->top_p = (float)d;
            o->has_decoding = true;
            break;
        case OPT_SEED:
            if (parse_u64("--seed", a, &o->seed)) return -1;
            o->has_seed = true;
            o->has_decoding = true;
            break;
        case OPT_JSON: o->json_out = a; break;
        case OPT_PLOT: o->plot = a; break;
        case OPT_NO_PROGRESS: o->progress = false; break;
        case OPT_WAIT_READY:
            if (parse_double("--wait-ready", a, 0, 86400, &o->wait_ready)) return -1;
            break;
        case OPT_HELP:
        case 'h': usage(stdout); return 1;
        default:
            if (optopt >= OPT_SERVER)
                fprintf(stderr, "blip2-bench: option '%s' needs a value\n", argv[optind - 1]);
            else
                fprintf(stderr, "blip2-bench: unknown option '%s'\n", argv[optind - 1]);
            fprintf(stderr, "run blip2-bench --help for the options\n");
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "blip2-bench: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!o->images_dir && !o->image_list) {
        fprintf(stderr, "blip2-bench: give the images: --images DIR or --image-list FILE\n");
        return -1;
    }
    if (o->images_dir && o->image_list) {
        fprintf(stderr, "blip2-bench: --images and --image-list: give one of them\n");
        return -1;
    }
    if (o->prompts_file && o->prompt) {
        fprintf(stderr, "blip2-bench: --prompts and --prompt: give one of them\n");
        return -1;
    }
    if (o->repeat_images && o->unique_images) {
        fprintf(stderr, "blip2-bench: --repeat-images and --unique-images contradict each other\n");
        return -1;
    }
    if (o->n_sweep && o->rate > 0) {
        fprintf(stderr, "blip2-bench: --sweep runs closed-loop concurrencies; it does not combine with --rate\n");
        return -1;
    }
    if (o->requests == 0 && o->duration == 0) o->requests = DEFAULT_REQUESTS;
    return 0;
}

static void opts_free(bench_opts *o) {
    free_strv(o->servers, o->n_servers);
    free(o->sweep);
}

/* ------------------------------------------------------------------------------------------ */
/* inputs                                                                                       */

typedef struct {
    char *path;
    const char *name; /* the file name within path */
    uint8_t *data;
    size_t len;
} bench_image;

static int has_image_ext(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot) return 0;
    return strcasecmp(dot, ".jpg") == 0 || strcasecmp(dot, ".jpeg") == 0 || strcasecmp(dot, ".png") == 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Paths of the images to send, in order. */
static char **list_images(const bench_opts *o, int *n_out) {
    int n = 0, cap = 16;
    char **v = xmalloc(sizeof(char *) * (size_t)cap);
    if (o->images_dir) {
        DIR *d = opendir(o->images_dir);
        if (!d) {
            fprintf(stderr, "blip2-bench: --images %s: %s\n", o->images_dir, strerror(errno));
            free(v);
            return NULL;
        }
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.' || !has_image_ext(e->d_name)) continue;
            if (n == cap) {
                cap *= 2;
                v = xrealloc(v, sizeof(char *) * (size_t)cap);
            }
            v[n++] = xstrdup(e->d_name);
        }
        closedir(d);
        qsort(v, (size_t)n, sizeof(char *), cmp_str);
        for (int i = 0; i < n; i++) {
            size_t len = strlen(o->images_dir) + strlen(v[i]) + 2;
            char *p = xmalloc(len);
            snprintf(p, len, "%s/%s", o->images_dir, v[i]);
            free(v[i]);
            v[i] = p;
        }
        if (n == 0) fprintf(stderr, "blip2-bench: --images %s: no .jpg, .jpeg or .png file in it\n", o->images_dir);
    } else {
        size_t len;
        uint8_t *text = read_file(o->image_list, &len, 64u << 20);
        if (!text) {
            fprintf(stderr, "blip2-bench: --image-list %s: %s\n", o->image_list, strerror(errno));
            free(v);
            return NULL;
        }
        int nl;
        char **lines = split_lines((const char *)text, len, &nl);
        free(text);
        for (int i = 0; i < nl; i++) {
            char *t = trim(lines[i]);
            if (!*t || *t == '#') continue;
            if (n == cap) {
                cap *= 2;
                v = xrealloc(v, sizeof(char *) * (size_t)cap);
            }
            v[n++] = xstrdup(t);
        }
        free_strv(lines, nl);
        if (n == 0) fprintf(stderr, "blip2-bench: --image-list %s: no paths in it\n", o->image_list);
    }
    if (n == 0) {
        free(v);
        return NULL;
    }
    *n_out = n;
    return v;
}

static bench_image *load_images(const bench_opts *o, int *n_out) {
    int n;
    char **paths = list_images(o, &n);
    if (!paths) return NULL;
    bench_image *im = calloc((size_t)n, sizeof *im);
    if (!im) exit(2);
    for (int i = 0; i < n; i++) {
        im[i].path = paths[i];
        const char *slash = strrchr(paths[i], '/');
        im[i].name = slash ? slash + 1 : paths[i];
        im[i].data = read_file(paths[i], &im[i].len, MAX_IMAGE_BYTES);
        if (!im[i].data) {
            fprintf(stderr, "blip2-bench: image %s: %s\n", paths[i], strerror(errno));
            for (int j = 0; j < n; j++) {
                free(im[j].data);
                free(paths[j]);
            }
            free(im);
            free(paths);
            return NULL;
        }
    }
    free(paths);
    *n_out = n;
    return im;
}

static void free_images(bench_image *im, int n) {
    if (!im) return;
    for (int i = 0; i < n; i++) {
        free(im[i].data);
        free(im[i].path);
    }
    free(im);
}

static char **load_prompts(const bench_opts *o, int *n_out) {
    if (!o->prompts_file) {
        char **v = xmalloc(sizeof(char *));
        v[0] = xstrdup(o->prompt ? o->prompt : DEFAULT_PROMPT);
        *n_out = 1;
        return v;
    }
    size_t len;
    uint8_t *text = read_file(o->prompts_file, &len, 64u << 20);
    if (!text) {
        fprintf(stderr, "blip2-bench: --prompts %s: %s\n", o->prompts_file, strerror(errno));
        return NULL;
    }
    int n;
    char **v = split_lines((const char *)text, len, &n);
    free(text);
    if (n == 0) {
        fprintf(stderr, "blip2-bench: --prompts %s is empty (an empty line asks for a caption)\n", o->prompts_file);
        free(v);
        return NULL;
    }
    *n_out = n;
    return v;
}

/* ------------------------------------------------------------------------------------------ */
/* the servers: ModelInfo                                                                       */

typedef struct {
    bool ok;
    char *model_dir, *dtype, *device, *error;
    uint32_t tp_degree, max_batch, max_queue, default_max_new_tokens, max_new_tokens_limit;
    uint64_t cache_hits, cache_misses, completed, failed;
} server_info;

static void server_info_free(server_info *s) {
    free(s->model_dir);
    free(s->dtype);
    free(s->device);
    free(s->error);
    memset(s, 0, sizeof *s);
}

static void model_info(blip2_rpc_channel *ch, server_info *out) {
    static const uint8_t empty[1];
    uint8_t *reply = NULL;
    size_t reply_len = 0;
    blip2_rpc_status st = {0, NULL};
    memset(out, 0, sizeof *out);
    int code = blip2_rpc_unary(ch, METHOD_INFO, empty, 0, INFO_TIMEOUT_MS, &reply, &reply_len, &st);
    if (code != 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s%s%s", code_name(code), st.details ? ": " : "", st.details ? st.details : "");
        out->error = xstrdup(msg);
        blip2_rpc_status_free(&st);
        free(reply);
        return;
    }
    blip2_rpc_status_free(&st);
    Blip2__V1__ModelInfoReply *m = blip2__v1__model_info_reply__unpack(NULL, reply_len, reply);
    free(reply);
    if (!m) {
        out->error = xstrdup("undecodable ModelInfo reply");
        return;
    }
    out->ok = true;
    out->model_dir = xstrdup(m->model_dir ? m->model_dir : "");
    out->dtype = xstrdup(m->dtype ? m->dtype : "");
    out->device = xstrdup(m->device ? m->device : "");
    out->tp_degree = m->tp_degree;
    out->max_batch = m->max_batch;
    out->max_queue = m->max_queue;
    out->default_max_new_tokens = m->default_max_new_tokens;
    out->max_new_tokens_limit = m->max_new_tokens_limit;
    out->cache_hits = m->image_cache_hits;
    out->cache_misses = m->image_cache_misses;
    out->completed = m->requests_completed;
    out->failed = m->requests_failed;
    blip2__v1__model_info_reply__free_unpacked(m, NULL);
}

/* Server counters summed over the replicas; valid only when every replica answered. */
typedef struct {
    bool valid;
    uint64_t hits, misses, completed, failed;
} server_counters;

/* ------------------------------------------------------------------------------------------ */
/* one request                                                                                  */

typedef struct {
    long index;
    int server, image, prompt;
    double sched_ms, start_ms, e2e_ms, ttft_ms, tpot_ms; /* ms from the run's start / durations */
    uint32_t generated, prompt_tokens;
    int code;
    char *error;
    int finish; /* FinishReason; -1 unknown */
    bool has_timings, image_cached;
    double queue_ms, image_ms, prefill_ms, decode_ms, total_ms;
} req_rec;

typedef struct {
    const bench_opts *o;
    blip2_rpc_channel **ch; /* one per server */
    bench_image *images;
    int n_images;
    char **prompts;
    int n_prompts;
    Blip2__V1__DecodingParams decoding;
    atomic_ulong seq; /* every request ever sent: unique images and request ids */
    bool tty;
} bench_ctx;

static void take_timings(req_rec *rec, const Blip2__V1__Timings *t) {
    if (!t) return;
    rec->has_timings = true;
    rec->queue_ms = t->queue_ms;
    rec->image_ms = t->image_ms;
    rec->prefill_ms = t->prefill_ms;
    rec->decode_ms = t->decode_ms;
    rec->total_ms = t->total_ms;
    rec->image_cached = t->image_cached;
}

typedef struct {
    double t_start, ttft_s;
    uint32_t tokens;
    bool bad, final, has_usage;
    uint32_t generated, prompt_tokens;
    int finish;
    req_rec *rec;
} stream_state;

static int on_stream_message(void *ctx, const uint8_t *msg, size_t len) {
    stream_state *s = ctx;
    double t = now_s();
    Blip2__V1__GenerateStreamReply *m = blip2__v1__generate_stream_reply__unpack(NULL, len, msg);
    if (!m) {
        s->bad = true;
        return 1; /* cancel */
    }
    if (m->n_token_ids > 0 && s->ttft_s < 0) s->ttft_s = t - s->t_start;
    s->tokens += (uint32_t)m->n_token_ids;
    if (m->final) {
        s->final = true;
        s->finish = (int)m->finish_reason;
        if (m->usage) {
            s->has_usage = true;
            s->generated = m->usage->generated_tokens;
            s->prompt_tokens = m->usage->prompt_tokens;
        }
        take_timings(s->rec, m->timings);
    }
    blip2__v1__generate_stream_reply__free_unpacked(m, NULL);
    return 0;
}

/* Sends request i of a run (server, image and prompt chosen by i) and fills rec. t0: the run's
 * start; sched: the planned send time in seconds from t0, or < 0 in a closed loop (= sent). */
static void do_request(bench_ctx *c, long i, double t0, double sched, req_rec *rec) {
    const bench_opts *o = c->o;
    memset(rec, 0, sizeof *rec);
    rec->index = i;
    rec->ttft_ms = rec->tpot_ms = NAN;
    rec->finish = -1;
    rec->server = (int)(i % o->n_servers);
    int set = c->n_images;
    if (o->repeat_images > 0 && o->repeat_images < set) set = o->repeat_images;
    rec->image = (int)(i % set);
    rec->prompt = (int)((i + i / set) % c->n_prompts); /* shifted each time the images wrap: every pair comes up */

    const bench_image *im = &c->images[rec->image];
    unsigned long seq = atomic_fetch_add(&c->seq, 1);
    Blip2__V1__GenerateRequest req = BLIP2__V1__GENERATE_REQUEST__INIT;
    uint8_t *unique = NULL;
    if (o->unique_images) {
        /* Bytes after the image's end (PNG IEND, JPEG EOI) are not decoded, but they make the
         * bytes, the image cache's key, differ from every other request's. */
        unique = xmalloc(im->len + 64);
        memcpy(unique, im->data, im->len);
        int k = snprintf((char *)unique + im->len, 64, "blip2-bench unique %d %lu", (int)getpid(), seq);
        req.image.data = unique;
        req.image.len = im->len + (size_t)k;
    } else {
        req.image.data = im->data;
        req.image.len = im->len;
    }
    req.prompt = c->prompts[rec->prompt];
    req.max_new_tokens = o->max_new_tokens;
    Blip2__V1__DecodingParams dec = c->decoding;
    if (o->has_decoding) req.decoding = &dec;
    char rid[64];
    snprintf(rid, sizeof rid, "bench-%d-%lu", (int)getpid(), seq);
    req.request_id = rid;
    size_t n = blip2__v1__generate_request__get_packed_size(&req);
    uint8_t *buf = xmalloc(n);
    blip2__v1__generate_request__pack(&req, buf);
    free(unique);

    blip2_rpc_channel *ch = c->ch[rec->server];
    blip2_rpc_status st = {0, NULL};
    const char *local_error = NULL;
    double ts = now_s();
    rec->start_ms = (ts - t0) * 1e3;
    rec->sched_ms = sched < 0 ? rec->start_ms : sched * 1e3;
    int code;
    if (o->stream) {
        stream_state s = {.t_start = ts, .ttft_s = -1, .finish = -1, .rec = rec};
        code = blip2_rpc_stream(ch, METHOD_STREAM, buf, n, o->timeout_ms, on_stream_message, &s, &st);
        rec->e2e_ms = (now_s() - ts) * 1e3;
        if (s.bad) {
            code = CODE_BAD_REPLY;
            local_error = "undecodable GenerateStreamReply";
        } else if (code == 0 && !s.final) {
            code = CODE_BAD_REPLY;
            local_error = "the stream ended without its final message";
        }
        if (s.ttft_s >= 0) rec->ttft_ms = s.ttft_s * 1e3;
        rec->generated = s.has_usage ? s.generated : s.tokens;
        rec->prompt_tokens = s.prompt_tokens;
        rec->finish = s.final ? s.finish : -1;
    } else {
        uint8_t *reply = NULL;
        size_t reply_len = 0;
        code = blip2_rpc_unary(ch, METHOD_GENERATE, buf, n, o->timeout_ms, &reply, &reply_len, &st);
        rec->e2e_ms = (now_s() - ts) * 1e3;
        if (code == 0) {
            Blip2__V1__GenerateReply *m = blip2__v1__generate_reply__unpack(NULL, reply_len, reply);
            if (!m) {
                code = CODE_BAD_REPLY;
                local_error = "undecodable GenerateReply";
            } else {
                rec->generated = m->usage ? m->usage->generated_tokens : (uint32_t)m->n_token_ids;
                rec->prompt_tokens = m->usage ? m->usage->prompt_tokens : 0;
                rec->finish = (int)m->finish_reason;
                take_timings(rec, m->timings);
                blip2__v1__generate_reply__free_unpacked(m, NULL);
            }
        }
        free(reply);
    }
    free(buf);
    rec->code = code;
    if (code != 0) rec->error = xstrdup(local_error ? local_error : st.details ? st.details : "");
    else if (isfinite(rec->ttft_ms) && rec->generated > 1)
        rec->tpot_ms = (rec->e2e_ms - rec->ttft_ms) / (double)(rec->generated - 1);
    blip2_rpc_status_free(&st);
}

/* ------------------------------------------------------------------------------------------ */
/* one run: a closed loop of clients or Poisson arrivals, by count or time                      */

typedef struct {
    long sent, ok, failed;
    long errors[N_SLOTS];
    const char *first_error[N_SLOTS]; /* points into the run's records */
    double elapsed_s, rps, tps;
    uint64_t generated, prompt_tokens;
    dist e2e, ttft, tpot;
    double *e2e_v, *ttft_v; /* sorted, for the plot */
    int n_replies_timed;
    double queue_ms, image_ms, prefill_ms, decode_ms, total_ms; /* means over the timed replies */
    long image_cached;
    long *srv_ok, *srv_failed;
} run_summary;

typedef struct {
    long index;
    double sched;
} arrival;

typedef struct {
    bench_ctx *c;
    char label[64];
    bool open;       /* Poisson arrivals */
    int concurrency; /* closed loop: clients; open loop: threads of the pool */
    double rate;
    long max_requests; /* 0: none */
    double duration;   /* 0: none */
    bool progress;
    double t0, wall;
    atomic_long next, n_done, n_failed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    req_rec *recs;
    size_t n_recs, cap_recs;
    arrival *q;
    size_t q_head, q_len, q_cap;
    bool q_closed;
    long threads_failed;
    pthread_mutex_t pmu;
    pthread_cond_t pcv;
    bool pdone;
    server_counters before, after;
    run_summary s;
} bench_run;

static void run_record(bench_run *r, const req_rec *rec) {
    pthread_mutex_lock(&r->mu);
    if (r->n_recs == r->cap_recs) {
        r->cap_recs = r->cap_recs ? 2 * r->cap_recs : 256;
        r->recs = xrealloc(r->recs, sizeof(req_rec) * r->cap_recs);
    }
    r->recs[r->n_recs++] = *rec;
    pthread_mutex_unlock(&r->mu);
    if (rec->code) atomic_fetch_add(&r->n_failed, 1);
    atomic_fetch_add(&r->n_done, 1);
}

static void *closed_client(void *p) {
    bench_run *r = p;
    for (;;) {
        if (g_stop) break;
        if (r->duration > 0 && now_s() - r->t0 >= r->duration) break;
        long i = atomic_fetch_add(&r->next, 1);
        if (r->max_requests > 0 && i >= r->max_requests) break;
        req_rec rec;
        do_request(r->c, i, r->t0, -1, &rec);
        run_record(r, &rec);
    }
    return NULL;
}

static void *open_worker(void *p) {
    bench_run *r = p;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        while (r->q_len == 0 && !r->q_closed) pthread_cond_wait(&r->cv, &r->mu);
        if (r->q_len == 0) {
            pthread_mutex_unlock(&r->mu);
            break;
        }
        arrival a = r->q[r->q_head++];
        r->q_len--;
        pthread_mutex_unlock(&r->mu);
        if (g_stop) continue; /* interrupted: what has not been sent is dropped */
        req_rec rec;
        do_request(r->c, a.index, r->t0, a.sched, &rec);
        run_record(r, &rec);
    }
    return NULL;
}

static void queue_push(bench_run *r, long index, double sched) {
    pthread_mutex_lock(&r->mu);
    if (r->q_head + r->q_len == r->q_cap) {
        if (r->q_head > 0) {
            memmove(r->q, r->q + r->q_head, sizeof(arrival) * r->q_len);
            r->q_head = 0;
        } else {
            r->q_cap = r->q_cap ? 2 * r->q_cap : 256;
            r->q = xrealloc(r->q, sizeof(arrival) * r->q_cap);
        }
    }
    r->q[r->q_head + r->q_len++] = (arrival){index, sched};
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Poisson arrivals at r->rate per second, each handed to the pool at its planned time. */
static void schedule_arrivals(bench_run *r) {
    rng64 g = {r->c->o->arrival_seed};
    double t = 0;
    for (long i = 0;; i++) {
        if (g_stop || (r->max_requests > 0 && i >= r->max_requests)) break;
        t += exp_gap(&g, r->rate);
        if (r->duration > 0 && t >= r->duration) break;
        sleep_until(r->t0 + t);
        if (g_stop) break;
        queue_push(r, i, t);
    }
    pthread_mutex_lock(&r->mu);
    r->q_closed = true;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

#define PROGRESS_WINDOW 5 /* samples, 0.5 s apart: the current rate is over the last 2 s */

static void *progress_line(void *p) {
    bench_run *r = p;
    double ts[PROGRESS_WINDOW];
    long ds[PROGRESS_WINDOW];
    int k = 0, filled = 0;
    pthread_mutex_lock(&r->pmu);
    while (!r->pdone) {
        struct timespec dl;
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_nsec += 500000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&r->pcv, &r->pmu, &dl);
        if (r->pdone) break;
        double t = now_s();
        long done = atomic_load(&r->n_done), failed = atomic_load(&r->n_failed);
        int oldest = filled < PROGRESS_WINDOW ? 0 : k;
        double cur = 0;
        if (filled == 0) {
            cur = done / fmax(t - r->t0, 1e-9);
        } else {
            cur = (double)(done - ds[oldest]) / fmax(t - ts[oldest], 1e-9);
        }
        ts[k] = t;
        ds[k] = done;
        k = (k + 1) % PROGRESS_WINDOW;
        if (filled < PROGRESS_WINDOW) filled++;
        char limit[64];
        if (r->duration > 0)
            snprintf(limit, sizeof limit, "%.1f/%g s", t - r->t0, r->duration);
        else
            snprintf(limit, sizeof limit, "%.1f s, %ld/%ld", t - r->t0, done, r->max_requests);
        fprintf(stderr, "\r%s: %ld done, %ld failed, %.2f req/s now, %s\033[K", r->label, done, failed, cur, limit);
        fflush(stderr);
    }
    pthread_mutex_unlock(&r->pmu);
    fprintf(stderr, "\r\033[K");
    fflush(stderr);
    return NULL;
}

static void run_init(bench_run *r, bench_ctx *c) {
    memset(r, 0, sizeof *r);
    r->c = c;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    pthread_mutex_init(&r->pmu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->pcv, &ca);
    pthread_condattr_destroy(&ca);
}

static void run_free(bench_run *r) {
    for (size_t i = 0; i < r->n_recs; i++) free(r->recs[i].error);
    free(r->recs);
    free(r->q);
    free(r->s.e2e_v);
    free(r->s.ttft_v);
    free(r->s.srv_ok);
    free(r->s.srv_failed);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->pmu);
    pthread_cond_destroy(&r->pcv);
}

static void run_execute(bench_run *r) {
    int n = r->concurrency;
    pthread_t *th = xmalloc(sizeof(pthread_t) * (size_t)n);
    pthread_t prog;
    bool have_prog = false;
    r->t0 = now_s();
    if (r->progress) have_prog = pthread_create(&prog, NULL, progress_line, r) == 0;
    int started = 0;
    for (; started < n; started++) {
        int e = pthread_create(&th[started], NULL, r->open ? open_worker : closed_client, r);
        if (e) {
            fprintf(stderr, "blip2-bench: %s: could not start thread %d of %d: %s\n", r->label, started + 1, n, strerror(e));
            r->threads_failed = n - started;
            break;
        }
    }
    if (r->open) {
        if (started > 0) schedule_arrivals(r);
        pthread_mutex_lock(&r->mu);
        r->q_closed = true;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
    }
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    r->wall = now_s() - r->t0;
    if (have_prog) {
        pthread_mutex_lock(&r->pmu);
        r->pdone = true;
        pthread_cond_signal(&r->pcv);
        pthread_mutex_unlock(&r->pmu);
        pthread_join(prog, NULL);
    }
    free(th);
}

static int cmp_rec_index(const void *a, const void *b) {
    long x = ((const req_rec *)a)->index, y = ((const req_rec *)b)->index;
    return (x > y) - (x < y);
}

static void summarize(bench_run *r) {
    run_summary *s = &r->s;
    int ns = r->c->o->n_servers;
    qsort(r->recs, r->n_recs, sizeof(req_rec), cmp_rec_index);
    s->srv_ok = calloc((size_t)ns, sizeof(long));
    s->srv_failed = calloc((size_t)ns, sizeof(long));
    s->e2e_v = xmalloc(sizeof(double) * (r->n_recs + 1));
    s->ttft_v = xmalloc(sizeof(double) * (r->n_recs + 1));
    double *tpot_v = xmalloc(sizeof(double) * (r->n_recs + 1));
    if (!s->srv_ok || !s->srv_failed) exit(2);
    int ne = 0, nt = 0, np = 0;
    double last_end = 0;
    s->sent = (long)r->n_recs;
    for (size_t i = 0; i < r->n_recs; i++) {
        const req_rec *q = &r->recs[i];
        double end = q->start_ms + q->e2e_ms;
        if (end > last_end) last_end = end;
        if (q->code != 0) {
            int slot = code_slot(q->code);
            s->failed++;
            s->errors[slot]++;
            if (!s->first_error[slot]) s->first_error[slot] = q->error;
            s->srv_failed[q->server]++;
            continue;
        }
        s->ok++;
        s->srv_ok[q->server]++;
        s->generated += q->generated;
        s->prompt_tokens += q->prompt_tokens;
        s->e2e_v[ne++] = q->e2e_ms;
        if (isfinite(q->ttft_ms)) s->ttft_v[nt++] = q->ttft_ms;
        if (isfinite(q->tpot_ms)) tpot_v[np++] = q->tpot_ms;
        if (q->has_timings) {
            s->n_replies_timed++;
            s->queue_ms += q->queue_ms;
            s->image_ms += q->image_ms;
            s->prefill_ms += q->prefill_ms;
            s->decode_ms += q->decode_ms;
            s->total_ms += q->total_ms;
            if (q->image_cached) s->image_cached++;
        }
    }
    if (s->n_replies_timed > 0) {
        double k = s->n_replies_timed;
        s->queue_ms /= k;
        s->image_ms /= k;
        s->prefill_ms /= k;
        s->decode_ms /= k;
        s->total_ms /= k;
    }
    s->elapsed_s = last_end > 0 ? last_end / 1e3 : r->wall;
    if (s->elapsed_s <= 0) s->elapsed_s = 1e-9;
    s->rps = s->ok / s->elapsed_s;
    s->tps = (double)s->generated / s->elapsed_s;
    dist_compute(s->e2e_v, ne, &s->e2e);
    dist_compute(s->ttft_v, nt, &s->ttft);
    dist_compute(tpot_v, np, &s->tpot);
    free(tpot_v);
}

static void read_counters(bench_ctx *c, server_counters *sc) {
    memset(sc, 0, sizeof *sc);
    sc->valid = true;
    for (int i = 0; i < c->o->n_servers; i++) {
        server_info si;
        model_info(c->ch[i], &si);
        if (!si.ok) sc->valid = false;
        sc->hits += si.cache_hits;
        sc->misses += si.cache_misses;
        sc->completed += si.completed;
        sc->failed += si.failed;
        server_info_free(&si);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the human report                                                                             */

static void print_dist_row(const char *name, const dist *d) {
    if (d->n == 0) {
        printf("  %-12s %9s %9s %9s %9s %9s %9s\n", name, "-", "-", "-", "-", "-", "-");
        return;
    }
    printf("  %-12s %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f\n", name, d->mean, d->min, d->p50, d->p90, d->p99, d->max);
}

static void print_errors(const run_summary *s, FILE *f) {
    if (s->failed == 0) {
        fprintf(f, "none");
        return;
    }
    bool first = true;
    for (int k = 0; k < N_SLOTS; k++) {
        if (!s->errors[k]) continue;
        fprintf(f, "%s%s %ld", first ? "" : ", ", code_name(slot_code(k)), s->errors[k]);
        if (s->first_error[k] && *s->first_error[k]) fprintf(f, " (\"%.160s\")", s->first_error[k]);
        first = false;
    }
}

static void print_run(const bench_run *r) {
    const bench_opts *o = r->c->o;
    const run_summary *s = &r->s;
    if (r->open)
        printf("\n== %s: open loop, Poisson arrivals at %.4g requests/s (at most %d in flight), %s ==\n", r->label,
               r->rate, r->concurrency, o->stream ? "GenerateStream" : "Generate");
    else
        printf("\n== %s: closed loop, %d concurrent client%s, %s ==\n", r->label, r->concurrency,
               r->concurrency == 1 ? "" : "s", o->stream ? "GenerateStream" : "Generate");
    printf("requests     %ld sent, %ld ok, %ld failed in %.2f s%s\n", s->sent, s->ok, s->failed, s->elapsed_s,
           g_stop ? " (interrupted)" : "");
    printf("throughput   %.3f requests/s, %.2f generated tokens/s (%" PRIu64 " tokens, %.1f per request)\n", s->rps,
           s->tps, s->generated, s->ok ? (double)s->generated / s->ok : 0.0);
    printf("latency ms   %9s %9s %9s %9s %9s %9s\n", "mean", "min", "p50", "p90", "p99", "max");
    print_dist_row("end-to-end", &s->e2e);
    if (o->stream) {
        print_dist_row("TTFT", &s->ttft);
        print_dist_row("TPOT", &s->tpot);
    }
    if (s->n_replies_timed > 0)
        printf("server ms    mean over %d replies: queue %.2f, image %.2f, prefill %.2f, decode %.2f, total %.2f; "
               "image cached in %ld\n",
               s->n_replies_timed, s->queue_ms, s->image_ms, s->prefill_ms, s->decode_ms, s->total_ms, s->image_cached);
    if (r->before.valid && r->after.valid)
        printf("image cache  %+" PRId64 " hits, %+" PRId64 " misses during the run (ModelInfo, all servers; now %" PRIu64
               " hits, %" PRIu64 " misses)\n",
               (int64_t)(r->after.hits - r->before.hits), (int64_t)(r->after.misses - r->before.misses), r->after.hits,
               r->after.misses);
    else
        printf("image cache  unknown (ModelInfo did not answer on every server)\n");
    if (o->n_servers > 1) {
        printf("per server  ");
        for (int i = 0; i < o->n_servers; i++)
            printf(" %s: %ld ok, %ld failed%s", o->servers[i], s->srv_ok[i], s->srv_failed[i],
                   i + 1 < o->n_servers ? ";" : "");
        printf("\n");
    }
    printf("errors       ");
    print_errors(s, stdout);
    printf("\n");
    if (r->threads_failed) printf("warning      %ld threads could not be started\n", r->threads_failed);
    fflush(stdout);
}

static void print_sweep(const bench_run *runs, int n) {
    printf("\n== sweep ==\n");
    printf("%-10s %10s %10s %10s %10s %10s %10s %10s %8s\n", "run", "req/s", "tok/s", "e2e p50", "e2e p99", "ttft p50",
           "ttft p99", "tpot p50", "errors");
    for (int i = 0; i < n; i++) {
        const run_summary *s = &runs[i].s;
        printf("%-10s %10.3f %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f %8ld\n", runs[i].label, s->rps, s->tps, s->e2e.p50,
               s->e2e.p99, s->ttft.p50, s->ttft.p99, s->tpot.p50, s->failed);
    }
    fflush(stdout);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON                                                                                         */

/* Length of the valid UTF-8 sequence at s (0: invalid). */
static int utf8_len(const unsigned char *s) {
    unsigned char c = s[0];
    int n;
    uint32_t cp;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) n = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) n = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) n = 4, cp = c & 0x07;
    else return 0;
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

/* A JSON string; invalid UTF-8 becomes U+FFFD. */
static void jstr(FILE *f, const char *str) {
    if (!str) {
        fputs("null", f);
        return;
    }
    const unsigned char *s = (const unsigned char *)str;
    fputc('"', f);
    while (*s) {
        unsigned char c = *s;
        if (c == '"' || c == '\\') {
            fputc('\\', f);
            fputc(c, f);
            s++;
        } else if (c < 0x20) {
            switch (c) {
            case '\n': fputs("\\n", f); break;
            case '\r': fputs("\\r", f); break;
            case '\t': fputs("\\t", f); break;
            default: fprintf(f, "\\u%04x", c);
            }
            s++;
        } else if (c < 0x80) {
            fputc(c, f);
            s++;
        } else {
            int n = utf8_len(s);
            if (n == 0) {
                fputs("\\ufffd", f);
                s++;
            } else {
                fwrite(s, 1, (size_t)n, f);
                s += n;
            }
        }
    }
    fputc('"', f);
}

static void jnum(FILE *f, double x) {
    if (!isfinite(x)) fputs("null", f);
    else fprintf(f, "%.10g", x);
}

static void jdist(FILE *f, const dist *d) {
    if (d->n == 0) {
        fputs("null", f);
        return;
    }
    fprintf(f, "{\"n\": %d, \"mean\": ", d->n);
    jnum(f, d->mean);
    fputs(", \"min\": ", f);
    jnum(f, d->min);
    fputs(", \"p50\": ", f);
    jnum(f, d->p50);
    fputs(", \"p90\": ", f);
    jnum(f, d->p90);
    fputs(", \"p99\": ", f);
    jnum(f, d->p99);
    fputs(", \"max\": ", f);
    jnum(f, d->max);
    fputc('}', f);
}

static void json_summary(FILE *f, const bench_run *r, const char *indent) {
    const bench_opts *o = r->c->o;
    const run_summary *s = &r->s;
    fprintf(f, "{\n%s  \"label\": ", indent);
    jstr(f, r->label);
    fprintf(f, ",\n%s  \"mode\": \"%s\", \"concurrency\": %d, \"rate\": ", indent, r->open ? "open" : "closed",
            r->concurrency);
    jnum(f, r->open ? r->rate : NAN);
    fprintf(f, ", \"stream\": %s, \"requests_target\": ", o->stream ? "true" : "false");
    if (r->max_requests > 0) fprintf(f, "%ld", r->max_requests);
    else fputs("null", f);
    fputs(", \"duration_s\": ", f);
    jnum(f, r->duration > 0 ? r->duration : NAN);
    fprintf(f, ", \"interrupted\": %s,\n", g_stop ? "true" : "false");
    fprintf(f, "%s  \"elapsed_s\": ", indent);
    jnum(f, s->elapsed_s);
    fprintf(f, ", \"requests_sent\": %ld, \"requests_ok\": %ld, \"requests_failed\": %ld,\n", s->sent, s->ok, s->failed);
    fprintf(f, "%s  \"errors\": {", indent);
    bool first = true;
    for (int k = 0; k < N_SLOTS; k++) {
        if (!s->errors[k]) continue;
        fprintf(f, "%s\"%s\": %ld", first ? "" : ", ", code_name(slot_code(k)), s->errors[k]);
        first = false;
    }
    fprintf(f, "},\n%s  \"error_examples\": {", indent);
    first = true;
    for (int k = 0; k < N_SLOTS; k++) {
        if (!s->errors[k]) continue;
        fprintf(f, "%s\"%s\": ", first ? "" : ", ", code_name(slot_code(k)));
        jstr(f, s->first_error[k] ? s->first_error[k] : "");
        first = false;
    }
    fprintf(f, "},\n%s  \"requests_per_s\": ", indent);
    jnum(f, s->rps);
    fprintf(f, ", \"generated_tokens\": %" PRIu64 ", \"generated_tokens_per_s\": ", s->generated);
    jnum(f, s->tps);
    fprintf(f, ", \"prompt_tokens\": %" PRIu64 ",\n", s->prompt_tokens);
    fprintf(f, "%s  \"e2e_ms\": ", indent);
    jdist(f, &s->e2e);
    fprintf(f, ",\n%s  \"ttft_ms\": ", indent);
    jdist(f, &s->ttft);
    fprintf(f, ",\n%s  \"tpot_ms\": ", indent);
    jdist(f, &s->tpot);
    fprintf(f, ",\n%s  \"server_ms_mean\": ", indent);
    if (s->n_replies_timed == 0) {
        fputs("null", f);
    } else {
        fprintf(f, "{\"replies\": %d, \"queue\": ", s->n_replies_timed);
        jnum(f, s->queue_ms);
        fputs(", \"image\": ", f);
        jnum(f, s->image_ms);
        fputs(", \"prefill\": ", f);
        jnum(f, s->prefill_ms);
        fputs(", \"decode\": ", f);
        jnum(f, s->decode_ms);
        fputs(", \"total\": ", f);
        jnum(f, s->total_ms);
        fputc('}', f);
    }
    fprintf(f, ", \"image_cached\": %ld,\n%s  \"image_cache\": ", s->image_cached, indent);
    if (r->before.valid && r->after.valid)
        fprintf(f,
                "{\"hits\": %" PRId64 ", \"misses\": %" PRId64 ", \"hits_before\": %" PRIu64 ", \"misses_before\": %" PRIu64
                ", \"hits_after\": %" PRIu64 ", \"misses_after\": %" PRIu64 ", \"server_completed\": %" PRId64
                ", \"server_failed\": %" PRId64 "}",
                (int64_t)(r->after.hits - r->before.hits), (int64_t)(r->after.misses - r->before.misses), r->before.hits,
                r->before.misses, r->after.hits, r->after.misses, (int64_t)(r->after.completed - r->before.completed),
                (int64_t)(r->after.failed - r->before.failed));
    else
        fputs("null", f);
    fprintf(f, ",\n%s  \"per_server\": [", indent);
    for (int i = 0; i < o->n_servers; i++) {
        fprintf(f, "%s{\"server\": ", i ? ", " : "");
        jstr(f, o->servers[i]);
        fprintf(f, ", \"ok\": %ld, \"failed\": %ld}", s->srv_ok[i], s->srv_failed[i]);
    }
    fprintf(f, "]\n%s}", indent);
}

static void json_request(FILE *f, const bench_run *r, const req_rec *q) {
    const bench_ctx *c = r->c;
    fprintf(f, "{\"index\": %ld, \"server\": ", q->index);
    jstr(f, c->o->servers[q->server]);
    fputs(", \"image\": ", f);
    jstr(f, c->images[q->image].name);
    fprintf(f, ", \"prompt_index\": %d, \"sched_ms\": ", q->prompt);
    jnum(f, q->sched_ms);
    fputs(", \"start_ms\": ", f);
    jnum(f, q->start_ms);
    fputs(", \"e2e_ms\": ", f);
    jnum(f, q->e2e_ms);
    fputs(", \"ttft_ms\": ", f);
    jnum(f, q->ttft_ms);
    fputs(", \"tpot_ms\": ", f);
    jnum(f, q->tpot_ms);
    fprintf(f, ", \"generated_tokens\": %u, \"prompt_tokens\": %u, \"status\": \"%s\", \"finish_reason\": ", q->generated,
            q->prompt_tokens, code_name(q->code));
    jstr(f, finish_name(q->finish));
    if (q->has_timings) {
        fputs(", \"queue_ms\": ", f);
        jnum(f, q->queue_ms);
        fputs(", \"image_ms\": ", f);
        jnum(f, q->image_ms);
        fputs(", \"prefill_ms\": ", f);
        jnum(f, q->prefill_ms);
        fputs(", \"decode_ms\": ", f);
        jnum(f, q->decode_ms);
        fputs(", \"server_total_ms\": ", f);
        jnum(f, q->total_ms);
        fprintf(f, ", \"image_cached\": %s", q->image_cached ? "true" : "false");
    } else {
        fputs(", \"queue_ms\": null, \"image_ms\": null, \"prefill_ms\": null, \"decode_ms\": null, "
              "\"server_total_ms\": null, \"image_cached\": null",
              f);
    }
    if (q->code != 0) {
        fputs(", \"error\": ", f);
        jstr(f, q->error ? q->error : "");
    }
    fputc('}', f);
}

static int write_json(const char *path, bench_ctx *c, const server_info *info, const bench_run *runs, int n_runs,
                      long warm_sent, long warm_failed) {
    const bench_opts *o = c->o;
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "blip2-bench: --json-out %s: %s\n", path, strerror(errno));
        return -1;
    }
    fputs("{\n  \"tool\": \"blip2-bench\",\n  \"config\": {\n    \"servers\": [", f);
    for (int i = 0; i < o->n_servers; i++) {
        if (i) fputs(", ", f);
        jstr(f, o->servers[i]);
    }
    fprintf(f, "],\n    \"mode\": \"%s\", \"concurrency\": %d, \"rate\": ", o->rate > 0 ? "open" : "closed",
            o->concurrency);
    jnum(f, o->rate > 0 ? o->rate : NAN);
    fputs(", \"sweep\": ", f);
    if (o->n_sweep) {
        fputc('[', f);
        for (int i = 0; i < o->n_sweep; i++) fprintf(f, "%s%d", i ? ", " : "", o->sweep[i]);
        fputc(']', f);
    } else {
        fputs("null", f);
    }
    fputs(", \"requests\": ", f);
    if (o->requests > 0) fprintf(f, "%ld", o->requests);
    else fputs("null", f);
    fputs(", \"duration_s\": ", f);
    jnum(f, o->duration > 0 ? o->duration : NAN);
    fprintf(f, ", \"warmup\": %ld, \"stream\": %s, \"timeout_ms\": %" PRId64 ", \"arrival_seed\": %" PRIu64 ",\n",
            o->warmup, o->stream ? "true" : "false", o->timeout_ms, o->arrival_seed);
    fprintf(f, "    \"max_new_tokens\": %u, \"decoding\": ", o->max_new_tokens);
    if (o->has_decoding) {
        fprintf(f, "{\"do_sample\": %s, \"temperature\": ", o->do_sample ? "true" : "false");
        jnum(f, o->temperature);
        fprintf(f, ", \"top_k\": %u, \"top_p\": ", o->top_k);
        jnum(f, o->top_p);
        fprintf(f, ", \"num_beams\": %u, \"min_new_tokens\": %u, \"seed\": ", o->num_beams, o->min_new_tokens);
        if (o->has_seed) fprintf(f, "%" PRIu64, o->seed);
        else fputs("null", f);
        fputc('}', f);
    } else {
        fputs("null", f);
    }
    fprintf(f, ",\n    \"repeat_images\": %d, \"unique_images\": %s,\n    \"images\": [", o->repeat_images,
            o->unique_images ? "true" : "false");
    for (int i = 0; i < c->n_images; i++) {
        if (i) fputs(", ", f);
        jstr(f, c->images[i].path);
    }
    fputs("],\n    \"prompts\": [", f);
    for (int i = 0; i < c->n_prompts; i++) {
        if (i) fputs(", ", f);
        jstr(f, c->prompts[i]);
    }
    fputs("]\n  },\n  \"servers\": [", f);
    for (int i = 0; i < o->n_servers; i++) {
        const server_info *s = &info[i];
        fprintf(f, "%s\n    {\"server\": ", i ? "," : "");
        jstr(f, o->servers[i]);
        if (s->ok) {
            fputs(", \"model_dir\": ", f);
            jstr(f, s->model_dir);
            fputs(", \"dtype\": ", f);
            jstr(f, s->dtype);
            fputs(", \"device\": ", f);
            jstr(f, s->device);
            fprintf(f,
                    ", \"tp_degree\": %u, \"max_batch\": %u, \"max_queue\": %u, \"default_max_new_tokens\": %u, "
                    "\"max_new_tokens_limit\": %u}",
                    s->tp_degree, s->max_batch, s->max_queue, s->default_max_new_tokens, s->max_new_tokens_limit);
        } else {
            fputs(", \"error\": ", f);
            jstr(f, s->error ? s->error : "");
            fputc('}', f);
        }
    }
    fprintf(f, "\n  ],\n  \"warmup\": {\"requests\": %ld, \"failed\": %ld},\n", warm_sent, warm_failed);
    if (n_runs == 1) {
        fputs("  \"summary\": ", f);
        json_summary(f, &runs[0], "  ");
        fputs(",\n", f);
    }
    fputs("  \"runs\": [", f);
    for (int k = 0; k < n_runs; k++) {
        const bench_run *r = &runs[k];
        fprintf(f, "%s\n    {\n      \"summary\": ", k ? "," : "");
        json_summary(f, r, "      ");
        fputs(",\n      \"requests\": [", f);
        for (size_t i = 0; i < r->n_recs; i++) {
            fputs(i ? ",\n        " : "\n        ", f);
            json_request(f, r, &r->recs[i]);
        }
        fputs(r->n_recs ? "\n      ]\n    }" : "]\n    }", f);
    }
    fputs("\n  ]\n}\n", f);
    int err = ferror(f);
    if (fclose(f) != 0 || err) {
        fprintf(stderr, "blip2-bench: --json-out %s: write failed\n", path);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the plot (gnuplot)                                                                           */

/* A gnuplot single-quoted string (no escapes inside; a quote is doubled). */
static void gp_str(FILE *f, const char *s) {
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', f);
        if (*s == '\n' || *s == '\r') fputc(' ', f);
        else fputc(*s, f);
    }
    fputc('\'', f);
}

static int check_png(const char *path) {
    static const unsigned char magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    unsigned char head[8];
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t n = fread(head, 1, 8, f);
    fclose(f);
    return n == 8 && memcmp(head, magic, 8) == 0 ? 0 : -1;
}

static int write_plot(const char *path, bench_ctx *c, const server_info *info, const bench_run *runs, int n_runs) {
    const bench_opts *o = c->o;
    fflush(NULL);
    remove(path);
    FILE *f = popen("gnuplot", "w");
    if (!f) {
        fprintf(stderr, "blip2-bench: --plot: cannot run gnuplot: %s\n", strerror(errno));
        return -1;
    }
    fputs("if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
          "  set terminal pngcairo noenhanced size 1400,560 font ',10'\n"
          "} else {\n"
          "  set terminal png noenhanced size 1400,560\n"
          "}\n",
          f);
    fputs("set output ", f);
    gp_str(f, path);
    fputc('\n', f);
    char title[512];
    const char *model = info[0].ok && info[0].model_dir ? info[0].model_dir : "";
    const char *slash = strrchr(model, '/');
    if (slash && slash[1]) model = slash + 1;
    char mnt[32];
    if (o->max_new_tokens) snprintf(mnt, sizeof mnt, "%u", o->max_new_tokens);
    else snprintf(mnt, sizeof mnt, "server default");
    snprintf(title, sizeof title, "blip2-bench: %d server%s%s%s%s, %s, max_new_tokens %s%s", o->n_servers,
             o->n_servers == 1 ? "" : "s", *model ? " (" : "", model, *model ? ")" : "",
             o->stream ? "GenerateStream" : "Generate", mnt, o->rate > 0 ? ", open loop (Poisson)" : "");
    fputs("set multiplot layout 1,2 title ", f);
    gp_str(f, title);
    fputs("\nset grid\n", f);

    /* left: throughput vs p99 latency, one point per run */
    bool any_point = false;
    fputs("$runs << EOD\n", f);
    for (int k = 0; k < n_runs; k++) {
        const run_summary *s = &runs[k].s;
        if (s->e2e.n == 0) continue;
        fprintf(f, "%.6f %.6f \"%s\"\n", s->e2e.p99, s->rps, runs[k].label);
        any_point = true;
    }
    fputs("EOD\n", f);
    fputs("set title 'Throughput vs p99 end-to-end latency'\n"
          "set xlabel 'p99 end-to-end latency (ms)'\nset ylabel 'requests/s'\n"
          "set xrange [0:*]\nset yrange [0:*]\nset offsets 0, graph 0.15, graph 0.15, 0\nset key top left\n",
          f);
    if (any_point)
        fputs("plot $runs using 1:2 with linespoints pt 7 ps 1.5 lw 2 title 'one point per run', "
              "$runs using 1:2:3 with labels offset 0,1.2 notitle\n",
              f);
    else
        fputs("set xrange [0:1]\nset yrange [0:1]\nset label 1 'no successful requests' at graph 0.5,0.5 center\n"
              "plot 2 notitle\nunset label 1\n",
              f);

    /* right: the TTFT CDF (end-to-end latency without --stream) */
    bool ttft = o->stream;
    fputs("set offsets 0, 0, 0, 0\n", f);
    int n_curves = 0;
    for (int k = 0; k < n_runs; k++) {
        const run_summary *s = &runs[k].s;
        const double *v = ttft ? s->ttft_v : s->e2e_v;
        int n = ttft ? s->ttft.n : s->e2e.n;
        if (n == 0) continue;
        fprintf(f, "$cdf%d << EOD\n", k);
        fprintf(f, "0 0\n");
        int step = n > PLOT_CDF_POINTS ? (n + PLOT_CDF_POINTS - 1) / PLOT_CDF_POINTS : 1;
        for (int i = 0; i < n; i += step) fprintf(f, "%.6f %.6f\n", v[i], (double)(i + 1) / n);
        if ((n - 1) % step) fprintf(f, "%.6f 1\n", v[n - 1]);
        fputs("EOD\n", f);
        n_curves++;
    }
    if (ttft)
        fputs("set title 'Time to first token (CDF)'\nset xlabel 'TTFT (ms)'\n", f);
    else
        fputs("set title 'End-to-end latency (CDF; TTFT needs --stream)'\nset xlabel 'end-to-end latency (ms)'\n", f);
    fputs("set ylabel 'fraction of requests'\nset xrange [0:*]\nset yrange [0:1.05]\nset key bottom right\n", f);
    if (n_curves == 0) {
        fputs("set xrange [0:1]\nset label 1 'no data' at graph 0.5,0.5 center\nplot 2 notitle\n", f);
    } else {
        fputs("plot ", f);
        bool first = true;
        for (int k = 0; k < n_runs; k++) {
            int n = ttft ? runs[k].s.ttft.n : runs[k].s.e2e.n;
            if (n == 0) continue;
            fprintf(f, "%s$cdf%d using 1:2 with steps lw 2 title ", first ? "" : ", ", k);
            gp_str(f, runs[k].label);
            first = false;
        }
        fputc('\n', f);
    }
    fputs("unset multiplot\nset output\n", f);
    int st = pclose(f);
    if (st != 0) {
        fprintf(stderr, "blip2-bench: --plot %s: gnuplot failed (status %d)\n", path, st);
        return -1;
    }
    if (check_png(path) != 0) {
        fprintf(stderr, "blip2-bench: --plot %s: gnuplot did not write a PNG\n", path);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

int main(int argc, char **argv) {
    bench_opts o;
    memset(&o, 0, sizeof o);
    int pr = parse_args(argc, argv, &o);
    if (pr != 0) {
        opts_free(&o);
        return pr > 0 ? 0 : 2;
    }
    bench_ctx c;
    memset(&c, 0, sizeof c);
    c.o = &o;
    atomic_init(&c.seq, 0);
    c.images = load_images(&o, &c.n_images);
    c.prompts = c.images ? load_prompts(&o, &c.n_prompts) : NULL;
    if (!c.images || !c.prompts) {
        free_images(c.images, c.n_images);
        opts_free(&o);
        return 2;
    }
    Blip2__V1__DecodingParams dec = BLIP2__V1__DECODING_PARAMS__INIT;
    dec.do_sample = o.do_sample;
    dec.temperature = o.temperature;
    dec.top_k = o.top_k;
    dec.top_p = o.top_p;
    dec.seed = o.seed;
    dec.has_seed = o.has_seed;
    dec.min_new_tokens = o.min_new_tokens;
    dec.num_beams = o.num_beams;
    c.decoding = dec;
    c.tty = o.progress && isatty(STDERR_FILENO);

    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESETHAND; /* a second ^C ends the process */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    blip2_rpc_init();
    int rc = 0;
    c.ch = calloc((size_t)o.n_servers, sizeof *c.ch);
    server_info *info = calloc((size_t)o.n_servers, sizeof *info);
    if (!c.ch || !info) exit(2);
    for (int i = 0; i < o.n_servers; i++) {
        c.ch[i] = blip2_rpc_connect(o.servers[i], 0);
        if (!c.ch[i]) {
            fprintf(stderr, "blip2-bench: --server %s: not an address (host:port)\n", o.servers[i]);
            rc = 2;
        }
    }
    int n_runs = o.n_sweep ? o.n_sweep : 1, done_runs = 0;
    bench_run *runs = calloc((size_t)n_runs, sizeof *runs);
    if (!runs) exit(2);
    long warm_sent = 0, warm_failed = 0;
    if (rc != 0) goto out;

    printf("blip2-bench: %d image%s, %d prompt%s, %s, max_new_tokens %u%s\n", c.n_images, c.n_images == 1 ? "" : "s",
           c.n_prompts, c.n_prompts == 1 ? "" : "s", o.stream ? "GenerateStream" : "Generate", o.max_new_tokens,
           o.max_new_tokens ? "" : " (the server's default)");
    double ready_by = now_s() + o.wait_ready;
    for (int i = 0; i < o.n_servers; i++) {
        for (;;) { /* --wait-ready: poll ModelInfo (UNAVAILABLE while the model loads) */
            model_info(c.ch[i], &info[i]);
            if (info[i].ok || o.wait_ready <= 0) break;
            if (g_stop || now_s() >= ready_by) {
                fprintf(stderr, "blip2-bench: server %s is not ready after --wait-ready %g s: %s\n", o.servers[i],
                        o.wait_ready, info[i].error);
                rc = 1;
                goto out;
            }
            server_info_free(&info[i]);
            sleep_until(now_s() + 0.25);
        }
        if (info[i].ok)
            printf("server %s: %s (%s) on %s, tensor parallel %u, max batch %u, queue %u\n", o.servers[i],
                   info[i].model_dir, info[i].dtype, info[i].device, info[i].tp_degree, info[i].max_batch,
                   info[i].max_queue);
        else
            printf("server %s: ModelInfo failed: %s\n", o.servers[i], info[i].error);
    }
    fflush(stdout);

    int first_conc = o.n_sweep ? o.sweep[0] : o.rate > 0 ? (o.concurrency_set ? o.concurrency : DEFAULT_POOL) : o.concurrency;
    if (o.warmup > 0 && !g_stop) {
        bench_run w;
        run_init(&w, &c);
        snprintf(w.label, sizeof w.label, "warm-up");
        w.concurrency = (int)(o.warmup < first_conc ? o.warmup : first_conc);
        w.max_requests = o.warmup;
        w.progress = c.tty;
        run_execute(&w);
        warm_sent = (long)w.n_recs;
        warm_failed = atomic_load(&w.n_failed);
        printf("warm-up: %ld requests, %ld failed (left out of the statistics)\n", warm_sent, warm_failed);
        if (warm_failed) {
            for (size_t i = 0; i < w.n_recs; i++)
                if (w.recs[i].code) {
                    printf("warm-up: first failure: %s %s\n", code_name(w.recs[i].code), w.recs[i].error);
                    break;
                }
        }
        fflush(stdout);
        run_free(&w);
    }

    for (int k = 0; k < n_runs && !g_stop; k++) {
        bench_run *r = &runs[k];
        run_init(r, &c);
        r->open = o.rate > 0;
        r->rate = o.rate;
        r->concurrency = o.n_sweep ? o.sweep[k] : first_conc;
        r->max_requests = o.requests;
        r->duration = o.duration;
        r->progress = c.tty;
        if (r->open) snprintf(r->label, sizeof r->label, "rate=%g", o.rate);
        else snprintf(r->label, sizeof r->label, "c=%d", r->concurrency);
        read_counters(&c, &r->before);
        run_execute(r);
        read_counters(&c, &r->after);
        summarize(r);
        done_runs = k + 1;
        print_run(r);
        if (r->s.failed > 0 || r->s.ok == 0) rc = 1;
    }
    if (g_stop) rc = 130;
    if (o.n_sweep && done_runs > 1) print_sweep(runs, done_runs);
    if (done_runs > 0 && o.json_out) {
        if (write_json(o.json_out, &c, info, runs, done_runs, warm_sent, warm_failed) != 0) rc = 1;
        else printf("\nwrote %s\n", o.json_out);
    }
    if (done_runs > 0 && o.plot) {
        if (write_plot(o.plot, &c, info, runs, done_runs) != 0) rc = 1;
        else printf("wrote %s\n", o.plot);
    }

out:
    for (int k = 0; k < done_runs; k++) run_free(&runs[k]);
    free(runs);
    for (int i = 0; i < o.n_servers; i++) {
        if (c.ch[i]) blip2_rpc_close(c.ch[i]);
        server_info_free(&info[i]);
    }
    free(c.ch);
    free(info);
    blip2_rpc_shutdown();
    free_images(c.images, c.n_images);
    free_strv(c.prompts, c.n_prompts);
    opts_free(&o);
    return rc;
}
