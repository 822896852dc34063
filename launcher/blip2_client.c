/* blip2-client: one question about one image, asked of a blip2d server.
 *
 *   blip2-client --server ADDR --image FILE --question TEXT [--stream] [--max-new-tokens N] [--json]
 *                [--timeout-ms N] [--num-beams N] [--num-return-sequences N]
 *                [--do-sample --temperature T --top-k K --top-p P --seed S] [--request-id ID]
 *
 * Prints the answer (as it is generated with --stream); --question "" asks for a caption. --json
 * prints one object: text, token_ids, finish_reason, usage, timings, request_id (and answers when
 * there are several). A non-OK status: "<STATUS_NAME>: <message>" on stderr, exit 1.
 *
 *   blip2-client [--server ADDR] --health [--wait-ready MS]
 *
 * prints the server's health (SERVING, NOT_SERVING) and exits 0 only when SERVING; --wait-ready MS
 * (also before a question) polls Health until SERVING for at most MS milliseconds. */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <time.h>
#include <unistd.h>

#include "blip2.pb-c.h"
#include "grpc_util.h"
#include "health.pb-c.h"

typedef struct {
    const char *server, *image, *question, *request_id, *tls_ca, *tls_name;
    char *ca_pem; /* --tls-ca contents */
    int stream, json, max_new, num_beams, num_return, do_sample, top_k, has_seed, health;
    long long timeout_ms, wait_ready_ms;
    float temperature, top_p;
    unsigned long long seed;
} client_args;

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: blip2-client [--server HOST:PORT] [--wait-ready MS] --image FILE --question TEXT [--stream] [--json]\n"
            "                    [--max-new-tokens N] [--timeout-ms N] [--num-beams N] [--num-return-sequences N]\n"
            "                    [--do-sample] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--request-id ID]\n"
            "  --server       default 127.0.0.1:50051\n"
            "  --question     the prompt as the model sees it, e.g. \"Question: what is this? Answer:\"; \"\" for a caption\n"
            "  --stream       print the answer as it is generated (GenerateStream)\n"
            "  --json         print {text, token_ids, finish_reason, usage, timings, request_id}\n"
            "  --timeout-ms   the call's deadline (default: none)\n"
            "  --wait-ready MS  first wait (at most MS ms) until the server's Health says SERVING\n"
            "       blip2-client [--server HOST:PORT] --health [--wait-ready MS]\n"
            "  --health       print the server's health; exit 0 only when SERVING\n"
            "  --tls-ca FILE  connect with TLS, trusting this CA certificate (PEM)\n"
            "  --tls-server-name NAME  the name the server's certificate must carry (default: the host)\n");
}

static int bad_arg(const char *flag, const char *v) {
    fprintf(stderr, "blip2-client: %s: bad value '%s'\n", flag, v);
    return 2;
}

static int parse_ll(const char *s, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_float(const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, client_args *a) {
    static const struct option opts[] = {
        {"server", required_argument, 0, 's'},       {"image", required_argument, 0, 'i'},
        {"question", required_argument, 0, 'q'},     {"prompt", required_argument, 0, 'q'},
        {"stream", no_argument, 0, 'S'},             {"json", no_argument, 0, 'j'},
        {"max-new-tokens", required_argument, 0, 'n'}, {"timeout-ms", required_argument, 0, 't'},
        {"num-beams", required_argument, 0, 'b'},    {"num-return-sequences", required_argument, 0, 'r'},
        {"do-sample", no_argument, 0, 'd'},          {"temperature", required_argument, 0, 'T'},
        {"top-k", required_argument, 0, 'k'},        {"top-p", required_argument, 0, 'p'},
        {"seed", required_argument, 0, 'e'},         {"request-id", required_argument, 0, 'R'},
        {"health", no_argument, 0, 'H'},             {"wait-ready", required_argument, 0, 'W'},
        {"tls-ca", required_argument, 0, 'A'},       {"tls-server-name", required_argument, 0, 'N'},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0},
    };
    memset(a, 0, sizeof *a);
    a->server = "127.0.0.1:50051";
    int c;
    long long v;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 's': a->server = optarg; break;
        case 'i': a->image = optarg; break;
        case 'q': a->question = optarg; break;
        case 'S': a->stream = 1; break;
        case 'j': a->json = 1; break;
        case 'n':
            if (parse_ll(optarg, 0, 4294967295LL, &v)) return bad_arg("--max-new-tokens", optarg);
            a->max_new = (int)(unsigned)v;
            break;
        case 't':
            if (parse_ll(optarg, 1, 1LL << 40, &v)) return bad_arg("--timeout-ms", optarg);
            a->timeout_ms = v;
            break;
        case 'b':
            if (parse_ll(optarg, 0, 1 << 20, &v)) return bad_arg("--num-beams", optarg);
            a->num_beams = (int)v;
            break;
        case 'r':
            if (parse_ll(optarg, 0, 1 << 20, &v)) return bad_arg("--num-return-sequences", optarg);
            a->num_return = (int)v;
            break;
        case 'd': a->do_sample = 1; break;
        case 'T':
            if (parse_float(optarg, &a->temperature)) return bad_arg("--temperature", optarg);
            break;
        case 'k':
            if (parse_ll(optarg, 0, 1 << 30, &v)) return bad_arg("--top-k", optarg);
            a->top_k = (int)v;
            break;
        case 'p':
            if (parse_float(optarg, &a->top_p)) return bad_arg("--top-p", optarg);
            break;
        case 'e': {
            char *end;
            errno = 0;
            a->seed = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end) return bad_arg("--seed", optarg);
            a->has_seed = 1;
            break;
        }
        case 'R': a->request_id = optarg; break;
        case 'H': a->health = 1; break;
        case 'W':
            if (parse_ll(optarg, 0, 1LL << 40, &v)) return bad_arg("--wait-ready", optarg);
            a->wait_ready_ms = v;
            break;
        case 'A': a->tls_ca = optarg; break;
        case 'N': a->tls_name = optarg; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "blip2-client: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!a->image && !a->health) {
        fprintf(stderr, "blip2-client: --image FILE is required\n");
        return 2;
    }
    if (!a->question) a->question = "";
    return 0;
}

static int read_file(const char *path, uint8_t **data, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, fp);
        len += got;
        if (len < cap) break;
        if (cap >= (size_t)1 << 31) { /* 2 GiB: more than any server accepts */
            free(buf);
            buf = NULL;
            break;
        }
        uint8_t *nb = realloc(buf, cap * 2);
        if (!nb) {
            free(buf);
            buf = NULL;
        }
        buf = nb;
        cap *= 2;
    }
    int err = ferror(fp);
    fclose(fp);
    if (!buf || err) {
        free(buf);
        return -1;
    }
    *data = buf;
    *n = len;
    return 0;
}

static void json_str(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", stdout); break;
        case '\\': fputs("\\\\", stdout); break;
        case '\n': fputs("\\n", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        default:
            if (*p < 0x20) printf("\\u%04x", *p);
            else putchar(*p);
        }
    }
    putchar('"');
}

static void json_ids(const uint32_t *ids, size_t n) {
    putchar('[');
    for (size_t i = 0; i < n; i++) printf("%s%u", i ? ", " : "", ids[i]);
    putchar(']');
}

static const char *finish_name(Blip2__V1__FinishReason f) {
    switch (f) {
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_EOS: return "eos";
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_LENGTH: return "length";
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_STOP: return "stop";
    case BLIP2__V1__FINISH_REASON__FINISH_REASON_CANCELLED: return "cancelled";
    default: return "unspecified";
    }
}

static void json_usage_timings(const Blip2__V1__Usage *u, const Blip2__V1__Timings *t) {
    printf(", \"usage\": {\"prompt_tokens\": %u, \"generated_tokens\": %u}", u ? u->prompt_tokens : 0,
           u ? u->generated_tokens : 0);
    if (t)
        printf(", \"timings\": {\"queue_ms\": %.3f, \"image_ms\": %.3f, \"prefill_ms\": %.3f, \"decode_ms\": %.3f, "
               "\"total_ms\": %.3f, \"image_cached\": %s}",
               t->queue_ms, t->image_ms, t->prefill_ms, t->decode_ms, t->total_ms, t->image_cached ? "true" : "false");
}

static void print_reply_json(const Blip2__V1__GenerateReply *r) {
    printf("{\"text\": ");
    json_str(r->text);
    printf(", \"token_ids\": ");
    json_ids(r->token_ids, r->n_token_ids);
    printf(", \"finish_reason\": \"%s\"", finish_name(r->finish_reason));
    json_usage_timings(r->usage, r->timings);
    printf(", \"request_id\": ");
    json_str(r->request_id);
    if (r->n_answers) {
        printf(", \"answers\": [");
        for (size_t i = 0; i < r->n_answers; i++) {
            const Blip2__V1__Answer *x = r->answers[i];
            printf("%s{\"text\": ", i ? ", " : "");
            json_str(x->text);
            printf(", \"token_ids\": ");
            json_ids(x->token_ids, x->n_token_ids);
            printf(", \"finish_reason\": \"%s\", \"score\": %g}", finish_name(x->finish_reason), x->score);
        }
        printf("]");
    }
    printf("}\n");
}

/* ---------------------------------------------------------------- streaming */

typedef struct {
    int json, started, bad;
    uint32_t *ids;
    size_t n_ids, cap;
    Blip2__V1__GenerateStreamReply *final;
} stream_state;

static int on_stream_message(void *ctx, const uint8_t *msg, size_t len) {
    stream_state *s = ctx;
    Blip2__V1__GenerateStreamReply *m = blip2__v1__generate_stream_reply__unpack(NULL, len, msg);
    if (!m) {
        s->bad = 1;
        return 1;
    }
    if (s->n_ids + m->n_token_ids > s->cap) {
        size_t cap = (s->n_ids + m->n_token_ids) * 2 + 16;
        uint32_t *n = realloc(s->ids, cap * sizeof *n);
        if (!n) {
            blip2__v1__generate_stream_reply__free_unpacked(m, NULL);
            s->bad = 1;
            return 1;
        }
        s->ids = n;
        s->cap = cap;
    }
    if (m->n_token_ids) memcpy(s->ids + s->n_ids, m->token_ids, m->n_token_ids * sizeof *m->token_ids);
    s->n_ids += m->n_token_ids;
    if (!s->json && m->text && !m->final) { /* as generated; leading whitespace skipped as in the full text */
        const char *t = m->text;
        if (!s->started)
            while (*t && isspace((unsigned char)*t)) t++;
        if (*t) s->started = 1;
        fputs(t, stdout);
        fflush(stdout);
    } else if (!s->json && m->final && !s->started && m->full_text) { /* nothing streamed (beam search) */
        fputs(m->full_text, stdout);
    }
    if (m->final) {
        if (s->final) blip2__v1__generate_stream_reply__free_unpacked(s->final, NULL);
        s->final = m;
    } else {
        blip2__v1__generate_stream_reply__free_unpacked(m, NULL);
    }
    return 0;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* One Health/Check: 1 SERVING, 0 anything else; *what says which (or the call's status). */
static int health_once(blip2_rpc_channel *ch, char *what, size_t n) {
    Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    uint8_t buf[16];
    size_t len = grpc__health__v1__health_check_request__pack(&q, buf);
    uint8_t *reply = NULL;
    size_t reply_len = 0;
    blip2_rpc_status st = {0};
    int serving = 0;
    if (blip2_rpc_unary(ch, "/grpc.health.v1.Health/Check", buf, len, 2000, &reply, &reply_len, &st) == 0) {
        Grpc__Health__V1__HealthCheckResponse *r = grpc__health__v1__health_check_response__unpack(NULL, reply_len, reply);
        int s = r ? (int)r->status : -1;
        serving = s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
        snprintf(what, n, "%s", serving ? "SERVING" : s == 2 ? "NOT_SERVING" : s < 0 ? "bad reply" : "UNKNOWN");
        if (r) grpc__health__v1__health_check_response__free_unpacked(r, NULL);
    } else {
        snprintf(what, n, "%s: %s", blip2_rpc_code_name(st.code), st.details ? st.details : "");
    }
    free(reply);
    blip2_rpc_status_free(&st);
    return serving;
}

/* Polls Health until SERVING or wait_ms passed. */
static int wait_ready(blip2_rpc_channel *ch, long long wait_ms, char *what, size_t n) {
    double end = now_ms() + (double)wait_ms;
    for (;;) {
        if (health_once(ch, what, n)) return 1;
        if (now_ms() >= end) return 0;
        usleep(100000);
    }
}

/* Plaintext, or TLS with --tls-ca. */
static blip2_rpc_channel *open_channel(client_args *a) {
    if (a->tls_ca && !a->ca_pem) {
        FILE *fp = fopen(a->tls_ca, "rb");
        size_t n = 0, cap = 0;
        char *buf = NULL;
        for (int ch; fp && (ch = fgetc(fp)) != EOF && n < (1u << 20);) {
            if (n + 1 >= cap && !(buf = realloc(buf, cap = cap ? 2 * cap : 4096))) break;
            buf[n++] = (char)ch;
        }
        if (fp) fclose(fp);
        if (!buf) {
            fprintf(stderr, "blip2-client: --tls-ca %s: cannot read it\n", a->tls_ca);
            return NULL;
        }
        buf[n] = 0;
        a->ca_pem = buf;
    }
    return blip2_rpc_connect_tls(a->server, 0, a->ca_pem, a->tls_name);
}

int main(int argc, char **argv) {
    client_args a;
    int bad = parse_args(argc, argv, &a);
    if (bad) return bad;
    if (a.health || a.wait_ready_ms > 0) {
        blip2_rpc_init();
        blip2_rpc_channel *hch = open_channel(&a);
        if (!hch) {
            fprintf(stderr, "blip2-client: --server '%s': expected HOST:PORT\n", a.server);
            return 2;
        }
        char what[512];
        int serving = wait_ready(hch, a.wait_ready_ms, what, sizeof what);
        blip2_rpc_close(hch);
        if (a.health) {
            printf("%s\n", what);
            blip2_rpc_shutdown();
            return serving ? 0 : 1;
        }
        if (!serving) {
            fprintf(stderr, "blip2-client: the server is not ready after %lld ms: %s\n", a.wait_ready_ms, what);
            blip2_rpc_shutdown();
            return 1;
        }
    }
    uint8_t *image = NULL;
    size_t image_len = 0;
    if (read_file(a.image, &image, &image_len)) {
        fprintf(stderr, "blip2-client: cannot read %s: %s\n", a.image, strerror(errno));
        return 1;
    }
    Blip2__V1__GenerateRequest req = BLIP2__V1__GENERATE_REQUEST__INIT;
    Blip2__V1__DecodingParams dec = BLIP2__V1__DECODING_PARAMS__INIT;
    req.image.data = image;
    req.image.len = image_len;
    req.prompt = (char *)a.question;
    req.max_new_tokens = (uint32_t)a.max_new;
    req.request_id = (char *)(a.request_id ? a.request_id : "");
    dec.do_sample = a.do_sample;
    dec.temperature = a.temperature;
    dec.top_k = (uint32_t)a.top_k;
    dec.top_p = a.top_p;
    dec.seed = a.seed;
    dec.has_seed = a.has_seed;
    dec.num_beams = (uint32_t)a.num_beams;
    dec.num_return_sequences = (uint32_t)a.num_return;
    req.decoding = &dec;
    size_t n = blip2__v1__generate_request__get_packed_size(&req);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        free(image);
        fprintf(stderr, "blip2-client: out of memory\n");
        return 1;
    }
    blip2__v1__generate_request__pack(&req, buf);
    free(image);

    blip2_rpc_init();
    blip2_rpc_channel *ch = open_channel(&a);
    if (!ch) {
        free(buf);
        fprintf(stderr, "blip2-client: --server '%s': expected HOST:PORT\n", a.server);
        return 2;
    }
    blip2_rpc_status status = {0};
    int rc = 0;
    if (a.stream) {
        stream_state s = {.json = a.json};
        blip2_rpc_stream(ch, "/blip2.v1.Blip2/GenerateStream", buf, n, a.timeout_ms, on_stream_message, &s, &status);
        if (status.code == 0 && (s.bad || !s.final)) {
            status.code = 13;
            free(status.details);
            status.details = strdup(s.bad ? "client: could not parse a stream message" : "client: the stream ended without a final message");
        }
        if (status.code == 0) {
            Blip2__V1__GenerateStreamReply *f = s.final;
            if (a.json) {
                printf("{\"text\": ");
                json_str(f->full_text);
                printf(", \"token_ids\": ");
                json_ids(s.ids, s.n_ids);
                printf(", \"finish_reason\": \"%s\"", finish_name(f->finish_reason));
                json_usage_timings(f->usage, f->timings);
                printf(", \"request_id\": ");
                json_str(f->request_id);
                printf("}\n");
            } else {
                printf("\n");
            }
        } else if (!a.json && s.started) {
            printf("\n");
        }
        if (s.final) blip2__v1__generate_stream_reply__free_unpacked(s.final, NULL);
        free(s.ids);
    } else {
        uint8_t *reply = NULL;
        size_t reply_len = 0;
        blip2_rpc_unary(ch, "/blip2.v1.Blip2/Generate", buf, n, a.timeout_ms, &reply, &reply_len, &status);
        if (status.code == 0) {
            Blip2__V1__GenerateReply *r = blip2__v1__generate_reply__unpack(NULL, reply_len, reply);
            if (!r) {
                status.code = 13;
                free(status.details);
                status.details = strdup("client: could not parse the reply");
            } else {
                if (a.json) {
                    print_reply_json(r);
                } else if (r->n_answers > 1) {
                    for (size_t i = 0; i < r->n_answers; i++) printf("%s\n", r->answers[i]->text);
                } else {
                    printf("%s\n", r->text);
                }
                blip2__v1__generate_reply__free_unpacked(r, NULL);
            }
        }
        free(reply);
    }
    if (status.code != 0) {
        fprintf(stderr, "blip2-client: %s: %s\n", blip2_rpc_code_name(status.code),
                status.details ? status.details : "(no message)");
        rc = 1;
    }
    fflush(stdout);
    blip2_rpc_status_free(&status);
    blip2_rpc_close(ch);
    blip2_rpc_shutdown();
    free(buf);
    return rc;
}
