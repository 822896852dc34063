/* blip2d: the BLIP-2 gRPC server. `mpirun -np N blip2d --model DIR` loads a tensor-parallel shard
 * on every rank; rank 0 also serves gRPC (launcher/server.c) and runs the engine loop on its main
 * thread (the MPI thread); ranks 1..N-1 follow rank 0's steps. SIGTERM/SIGINT: stop accepting,
 * finish what is in flight within --grace-ms, then every rank exits 0. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../parallel/comm.h"
#include "../runtime/engine.h"
#include "../runtime/inputs.h"
#include "../runtime/device.h"
#include "../runtime/model.h"
#include "server.h"

typedef struct {
    const char *model, *listen, *port_file, *tls_cert, *tls_key, *device, *dtype;
    int max_batch, max_queue, max_new_limit, log_level, grace_ms, workers, hold_ms, hold_share, step_tokens;
    size_t max_message_bytes, kv_bytes, image_cache_bytes;
} args_t;

static int g_log_level = BLIP2_LOG_INFO;

/* Progress lines (info); errors are printed whatever the level. */
static void info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void info(const char *fmt, ...) {
    if (g_log_level < BLIP2_LOG_INFO) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "blip2d: %s\n", buf);
}

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: blip2d --model DIR [--listen HOST:PORT] [--port-file FILE] [--max-batch N] [--max-queue N]\n"
            "              [--max-message-bytes N] [--max-new-tokens-limit N] [--kv-bytes N] [--image-cache-bytes N]\n"
            "              [--grace-ms N] [--workers N] [--log-level error|warn|info|debug]\n"
            "              [--tls-cert FILE.pem --tls-key FILE.pem] [--device cpu|cuda] [--dtype f32|f16|bf16]\n"
            "              [--batch-invariant] [--hold-for-images MS [--hold-share PCT]] [--max-step-tokens N]\n"
            "  --device            where the model runs (default cpu; cuda: GPU local-rank mod GPUs, NCCL under mpirun)\n"
            "  --dtype             weight matrices on the device (default f32 on the CPU, f16 on CUDA)\n"
            "  --listen            default 127.0.0.1:50051 (port 0: any free port, printed and written to --port-file)\n"
            "  --port-file FILE    write the bound port there once listening\n"
            "  --max-batch N       sequences per engine step (default 64)\n"
            "  --max-step-tokens N tokens per engine step (default 512, at least --max-batch): longer prefills\n"
            "                      are chunked; more makes prefill faster and the steps beside it longer\n"
            "  --max-queue N       waiting requests before RESOURCE_EXHAUSTED (default 1024)\n"
            "  --max-message-bytes receive limit per message (default 32M)\n"
            "  --max-new-tokens-limit  largest max_new_tokens a request may ask for (default 1024)\n"
            "  --kv-bytes N        KV cache memory per rank (default 2G)\n"
            "  --image-cache-bytes cache of image embeddings for repeated images (default 256M, 0: off)\n"
            "  --grace-ms N        on SIGTERM/SIGINT, time in-flight requests get to finish (default 10000)\n"
            "  --tls-cert/--tls-key  serve TLS with this certificate chain and private key (PEM); default plaintext\n"
            "  --batch-invariant   a request's seeded samples do not depend on the other requests in its steps\n"
            "                      (CUDA: no GEMV, no split-K; slower at small batches; the CPU always is)\n"
            "  --hold-for-images MS  while more requests wait for their images than sequences are decoding, steps\n"
            "                      wait for the image encoder (at most MS at a time): a burst is encoded at full\n"
            "                      speed and decoded in one batch, running sequences pause meanwhile (default 0: off)\n"
            "  --hold-share PCT    hold while the requests waiting for images are more than PCT %% of the ready\n"
            "                      sequences (default 100; 0: while any waits, a burst encoded whole first, for\n"
            "                      offline jobs: with requests arriving all the time steps run once per hold)\n"
            "Sizes take K, M or G suffixes (powers of 1024). Run under mpirun -np N for tensor parallelism.\n");
}

static int parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_size(const char *s, size_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *s == '-') return -1;
    unsigned long long mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1ull << 10, end++;
    else if (*end == 'M' || *end == 'm') mul = 1ull << 20, end++;
    else if (*end == 'G' || *end == 'g') mul = 1ull << 30, end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || v > (1ull << 50) / mul) return -1;
    *out = (size_t)(v * mul);
    return 0;
}

static int fail_usage(const char *fmt, const char *arg) {
    fprintf(stderr, "blip2d: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see --help)\n");
    return 2;
}

static int parse_args(int argc, char **argv, args_t *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},        {"listen", required_argument, 0, 'l'},
        {"port-file", required_argument, 0, 'p'},    {"max-batch", required_argument, 0, 'b'},
        {"max-queue", required_argument, 0, 'q'},    {"max-message-bytes", required_argument, 0, 'M'},
        {"max-new-tokens-limit", required_argument, 0, 'n'}, {"kv-bytes", required_argument, 0, 'k'},
        {"image-cache-bytes", required_argument, 0, 'c'}, {"log-level", required_argument, 0, 'L'},
        {"tls-cert", required_argument, 0, 'C'},     {"tls-key", required_argument, 0, 'K'},
        {"grace-ms", required_argument, 0, 'g'},     {"workers", required_argument, 0, 'w'},
        {"device", required_argument, 0, 'D'},       {"dtype", required_argument, 0, 'T'},
        {"batch-invariant", no_argument, 0, 'I'},    {"help", no_argument, 0, 'h'},
        {"hold-for-images", required_argument, 0, 'H'}, {"hold-share", required_argument, 0, 'P'}, {"max-step-tokens", required_argument, 0, 'S'},
        {0, 0, 0, 0},
    };
    blip2_engine_opts d = blip2_engine_opts_default();
    memset(a, 0, sizeof *a);
    a->listen = "127.0.0.1:50051";
    a->max_batch = d.max_batch;
    a->max_queue = d.max_queue;
    a->max_new_limit = d.max_new_tokens_limit;
    a->kv_bytes = d.kv_bytes;
    a->image_cache_bytes = d.image_cache_bytes;
    a->hold_share = d.hold_share_pct;
    a->max_message_bytes = (size_t)32 << 20;
    a->log_level = BLIP2_LOG_INFO;
    a->grace_ms = 10000;
    a->workers = 4;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case 'D': a->device = optarg; break;
        case 'T': a->dtype = optarg; break;
        case 'I': setenv("BLIP2_BATCH_INVARIANT", "1", 1); break; /* read once, when the device first computes */
        case 'l': a->listen = optarg; break;
        case 'p': a->port_file = optarg; break;
        case 'b':
            if (parse_long(optarg, 1, 1024, &v)) return fail_usage("--max-batch '%s': expected 1..1024", optarg);
            a->max_batch = (int)v;
            break;
        case 'q':
            if (parse_long(optarg, 1, 1 << 20, &v)) return fail_usage("--max-queue '%s': expected 1..1048576", optarg);
            a->max_queue = (int)v;
            break;
        case 'n':
            if (parse_long(optarg, 1, 1 << 20, &v)) return fail_usage("--max-new-tokens-limit '%s': expected 1..1048576", optarg);
            a->max_new_limit = (int)v;
            break;
        case 'M':
            if (parse_size(optarg, &a->max_message_bytes) || a->max_message_bytes < 1024 ||
                a->max_message_bytes > (size_t)2047 << 20)
                return fail_usage("--max-message-bytes '%s': expected 1K..2047M", optarg);
            break;
        case 'k':
            if (parse_size(optarg, &a->kv_bytes) || a->kv_bytes == 0) return fail_usage("--kv-bytes '%s': expected a size", optarg);
            break;
        case 'c':
            if (parse_size(optarg, &a->image_cache_bytes)) return fail_usage("--image-cache-bytes '%s': expected a size", optarg);
            break;
        case 'L':
            if (!strcmp(optarg, "error")) a->log_level = BLIP2_LOG_ERROR;
            else if (!strcmp(optarg, "warn")) a->log_level = BLIP2_LOG_WARN;
            else if (!strcmp(optarg, "info")) a->log_level = BLIP2_LOG_INFO;
            else if (!strcmp(optarg, "debug")) a->log_level = BLIP2_LOG_DEBUG;
            else return fail_usage("--log-level '%s': expected error, warn, info or debug", optarg);
            break;
        case 'g':
            if (parse_long(optarg, 0, 3600000, &v)) return fail_usage("--grace-ms '%s': expected 0..3600000", optarg);
            a->grace_ms = (int)v;
            break;
        case 'w':
            if (parse_long(optarg, 1, 64, &v)) return fail_usage("--workers '%s': expected 1..64", optarg);
            a->workers = (int)v;
            break;
        case 'H':
            if (parse_long(optarg, 0, 60000, &v)) return fail_usage("--hold-for-images '%s': expected 0..60000 ms", optarg);
            a->hold_ms = (int)v;
            break;
        case 'P':
            if (parse_long(optarg, 0, 100, &v)) return fail_usage("--hold-share '%s': expected 0..100 %%", optarg);
            a->hold_share = (int)v;
            break;
        case 'S':
            if (parse_long(optarg, 1, 1 << 16, &v)) return fail_usage("--max-step-tokens '%s': expected 1..65536", optarg);
            a->step_tokens = (int)v;
            break;
        case 'C': a->tls_cert = optarg; break;
        case 'K': a->tls_key = optarg; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) return fail_usage("unexpected argument '%s'", argv[optind]);
    if (!a->model) return fail_usage("%s", "--model DIR is required");
    if (!a->tls_cert != !a->tls_key) return fail_usage("%s", "--tls-cert and --tls-key go together");
    if (!a->device) a->device = "cpu";
    if (strcmp(a->device, "cpu") && strcmp(a->device, "cuda")) return fail_usage("--device '%s': cpu or cuda", a->device);
    if (!a->dtype) a->dtype = strcmp(a->device, "cuda") == 0 ? "f16" : "f32";
    if (blip2_wdtype_parse(a->dtype) < 0) return fail_usage("--dtype '%s': f32, f16 or bf16", a->dtype);
    return 0;
}

/* ---------------------------------------------------------------- signals (rank 0) */

/* A self-pipe: the handler (any thread may run it: OpenBLAS starts its threads before main, so
 * blocking signals in main cannot cover every thread) writes the signal number; a dedicated thread
 * reads it and does the real work outside signal context. A 0 byte tells that thread to exit. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    if (write(sig_pipe[1], &b, 1) < 0) { /* nothing to do in a handler */
    }
    errno = saved;
}

static int install_signals(void) {
    if (pipe2(sig_pipe, O_CLOEXEC) != 0) return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) || sigaction(SIGTERM, &sa, NULL)) return -1;
    return 0;
}

typedef struct {
    pthread_mutex_t mu;
    blip2_engine *engine;
    blip2_server *server;
    int stop_requested, grace_ms;
} sig_state;

static void *signal_main(void *arg) {
    sig_state *S = arg;
    for (;;) {
        unsigned char b;
        ssize_t got = read(sig_pipe[0], &b, 1);
        if (got < 0 && errno == EINTR) continue;
        if (got != 1 || b == 0) break;
        int sig = b;
        pthread_mutex_lock(&S->mu);
        int first = !S->stop_requested;
        S->stop_requested = 1;
        if (!first) {
            fprintf(stderr, "blip2d: %s again: already stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        } else {
            info("%s: no new requests; in-flight ones get %d ms to finish", sig == SIGINT ? "SIGINT" : "SIGTERM",
                 S->grace_ms);
            /* both calls are quick and non-blocking; under the lock so main cannot free them meanwhile */
            if (S->server) blip2_server_begin_shutdown(S->server);
            if (S->engine) blip2_engine_stop(S->engine, S->grace_ms);
        }
        pthread_mutex_unlock(&S->mu);
    }
    return NULL;
}

/* ---------------------------------------------------------------- loading */


static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static blip2_code load_rank(const args_t *a, const blip2_tp *tp, const blip2_device *dev, blip2_model *m,
                            blip2_status *st) {
    info("rank %d/%d: loading %s onto %s", tp->rank, tp->world, a->model, dev->name);
    double t0 = now_s();
    blip2_code rc = blip2_model_load_shard(a->model, tp->rank, tp->world, m, st);
    size_t mapped = 0;
    int tensors = 0, nfiles = rc ? 0 : m->ckpt.nfiles; /* the checkpoint is closed once on a device */
    for (int i = 0; !rc && i < m->ckpt.nfiles; i++) {
        mapped += m->ckpt.files[i].size;
        tensors += m->ckpt.files[i].n;
    }
    if (!rc) rc = blip2_model_to_backend(m, dev->ops, blip2_wdtype_parse(a->dtype), dev->ops->device, st);
    if (rc) {
        if (m->ops) blip2_model_free(m);
        memset(m, 0, sizeof *m);
        fprintf(stderr, "blip2d: rank %d/%d: loading failed: %s\n", tp->rank, tp->world, st->msg);
        return rc;
    }
    info("rank %d/%d: loaded in %.2f s: checkpoint %d file(s), %d tensors, %.1f MiB mapped; this rank's OPT shard "
         "%.1f MiB (heads %d, ffn %d, vocab [%d, %d))%s; resident %.1f MiB; %.1f MiB of %s weights on %s",
         tp->rank, tp->world, now_s() - t0, nfiles, tensors, mapped / 1048576.0, m->opt_bytes / 1048576.0,
         m->shard.NH, m->shard.ffn, m->shard.v0, m->shard.v0 + m->shard.V, tp->rank == 0 ? " + vision, Q-Former" : "",
         blip2_rss_mib(), m->dev_bytes / 1048576.0, blip2_wdtype_name(m->wdtype), m->ops->name);
    return BLIP2_OK;
}

static int write_port_file(const char *path, int port) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *fp = fopen(tmp, "w");
    if (!fp) return -1;
    fprintf(fp, "%d\n", port);
    if (fclose(fp) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* "host:0" → "host:<port>" for the log. */
static void bound_addr(const char *listen, int port, char *out, size_t n) {
    const char *colon = strrchr(listen, ':');
    int host_len = colon ? (int)(colon - listen) : (int)strlen(listen);
    snprintf(out, n, "%.*s:%d", host_len, listen, port);
}

int main(int argc, char **argv) {
    args_t a;
    int bad = parse_args(argc, argv, &a);
    if (bad) return bad;
    g_log_level = a.log_level;

    /* Before MPI starts: rank 0 turns SIGINT/SIGTERM into a graceful stop; the followers ignore
     * them (rank 0's STOP broadcast ends them once the in-flight requests are done). */
    if (install_signals()) {
        fprintf(stderr, "blip2d: cannot install the signal handlers: %s\n", strerror(errno));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    blip2_status st = {0};
    blip2_comm *world = blip2_comm_world(&st);
    if (!world) {
        fprintf(stderr, "blip2d: %s\n", st.msg);
        return 1;
    }
    blip2_tp tp = blip2_tp_from_comm(world);
    int rank0 = tp.rank == 0;
    if (!rank0) {
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_IGN);
    }

    sig_state S;
    memset(&S, 0, sizeof S);
    pthread_mutex_init(&S.mu, NULL);
    S.grace_ms = a.grace_ms;
    pthread_t sig_thread;
    int sig_started = 0;
    blip2_server *srv = NULL;
    blip2_code rc = BLIP2_OK;

    /* rank 0 serves at once: Health NOT_SERVING, Generate UNAVAILABLE while the model loads. */
    char listen_all[300];
    if (rank0) {
        if (a.listen[0] == ':') { /* ":PORT": every interface, as asked */
            snprintf(listen_all, sizeof listen_all, "0.0.0.0%s", a.listen);
            a.listen = listen_all;
            fprintf(stderr, "blip2d: warning: --listen %s accepts connections on every interface\n", a.listen + 7);
        }
        blip2_server_opts so = {.listen = a.listen,
                                .model_dir = a.model,
                                .max_message_bytes = a.max_message_bytes,
                                .max_new_tokens_limit = a.max_new_limit,
                                .workers = a.workers,
                                .log_level = a.log_level};
        uint8_t *cert = NULL, *key = NULL;
        size_t n_cert = 0, n_key = 0;
        if (a.tls_cert) { /* PEM text: NUL-terminated copies for gRPC */
            rc = blip2_read_file(a.tls_cert, 1 << 20, &cert, &n_cert, &st);
            if (!rc) rc = blip2_read_file(a.tls_key, 1 << 20, &key, &n_key, &st);
            if (!rc && (!(cert = realloc(cert, n_cert + 1)) || !(key = realloc(key, n_key + 1))))
                rc = blip2_fail(&st, BLIP2_ENOMEM, "out of memory");
            if (!rc) cert[n_cert] = 0, key[n_key] = 0;
            so.tls_cert_pem = (const char *)cert;
            so.tls_key_pem = (const char *)key;
        }
        int port = 0;
        if (!rc) rc = blip2_server_start(&so, &srv, &port, &st);
        free(cert);
        free(key);
        if (!rc) {
            char addr[512];
            bound_addr(a.listen, port, addr, sizeof addr);
            info("listening on %s (model loading on %d rank(s))", addr, tp.world);
            if (a.port_file && write_port_file(a.port_file, port))
                rc = blip2_fail(&st, BLIP2_EIO, "--port-file %s: cannot write: %s", a.port_file, strerror(errno));
        }
        S.server = srv;
        if (pthread_create(&sig_thread, NULL, signal_main, &S) == 0) sig_started = 1;
    }
    rc = blip2_tp_agree(&tp, rc, &st);

    blip2_model m;
    memset(&m, 0, sizeof m);
    int have_model = 0;
    blip2_inputs in;
    memset(&in, 0, sizeof in);
    int have_inputs = 0;
    blip2_device dev = {0};
    blip2_comm *nccl = NULL;
    if (!rc) rc = blip2_tp_agree(&tp, blip2_device_open_tp(a.device, &tp, &dev, &nccl, &st), &st);
    if (!rc) {
        rc = load_rank(&a, &tp, &dev, &m, &st);
        have_model = rc == BLIP2_OK;
        if (!rc && rank0) {
            rc = blip2_inputs_load(a.model, &m.cfg, &in, &st);
            have_inputs = rc == BLIP2_OK;
        }
        rc = blip2_tp_agree(&tp, rc, &st);
    }

    blip2_engine_opts eo = blip2_engine_opts_default();
    eo.max_batch = a.max_batch;
    if (a.step_tokens) eo.max_step_tokens = a.step_tokens;
    if (eo.max_step_tokens < eo.max_batch) eo.max_step_tokens = eo.max_batch; /* a decode row per sequence */
    eo.max_queue = a.max_queue;
    eo.kv_bytes = a.kv_bytes;
    eo.max_new_tokens_limit = a.max_new_limit;
    eo.image_cache_bytes = a.image_cache_bytes;
    eo.hold_for_images_ms = a.hold_ms;
    eo.hold_share_pct = a.hold_share;
    blip2_engine *e = NULL;
    if (!rc) {
        if (rank0) rc = blip2_engine_create(&m, &tp, &in, &eo, &e, &st);
        rc = blip2_tp_agree(&tp, rc, &st);
    }

    if (!rc && rank0) {
        blip2_server_set_engine(srv, e, &m, tp.world, &eo);
        pthread_mutex_lock(&S.mu);
        S.engine = e;
        int stop = S.stop_requested;
        pthread_mutex_unlock(&S.mu);
        blip2_engine_stats es;
        blip2_engine_get_stats(e, &es);
        int invariant = !m.ops->batch_invariant || m.ops->batch_invariant();
        info("serving (tensor parallel over %d rank(s), %d KV blocks of %d positions; seeded sampling %s)", tp.world,
             es.blocks_total, eo.block_size, invariant ? "batch-invariant" : "may vary with the batch");
        if (stop) blip2_engine_stop(e, a.grace_ms);
        rc = blip2_engine_run(e, &st); /* until stopped and drained; then the followers are told to stop */
        if (rc) fprintf(stderr, "blip2d: the engine failed: %s\n", st.msg);
    } else if (!rc) {
        rc = blip2_engine_follow(&m, &tp, &eo, &st);
        if (rc) fprintf(stderr, "blip2d: rank %d: %s\n", tp.rank, st.msg);
    } else if (rank0) {
        fprintf(stderr, "blip2d: %s\n", st.msg);
    }

    if (rank0) {
        if (sig_started) {
            pthread_mutex_lock(&S.mu);
            S.engine = NULL;
            S.server = NULL;
            pthread_mutex_unlock(&S.mu);
            unsigned char zero = 0;
            while (write(sig_pipe[1], &zero, 1) < 0 && errno == EINTR) {
            }
            pthread_join(sig_thread, NULL);
        }
        if (srv) blip2_server_destroy(srv, a.grace_ms);
        blip2_engine_destroy(e);
        if (have_inputs) blip2_inputs_free(&in);
    }
    if (have_model) blip2_model_free(&m);
    blip2_device_close_tp(&dev, nccl, &tp);
    pthread_mutex_destroy(&S.mu);
    if (rank0 && !rc) info("stopped");
    fflush(stderr);
    blip2_comm_world_finalize();
    return rc ? 1 : 0;
}
