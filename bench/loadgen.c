/*
 * loadgen: the benchmark's load generator. One new TCP (and TLS) connection per
 * request, as booting hosts make them; the same code drives our server, nginx and tangd.
 *
 *   loadgen steady HOST PORT CONCURRENCY WARMUP_S DURATION_S REQUEST_FILE [CERT KEY PIN]
 *   loadgen storm  HOST PORT[,PORT...] HOSTS_FILE CONNECT_TIMEOUT_S READ_TIMEOUT_S DEADLINE_S PIN
 *
 *   CERT, KEY: the client certificate and key (TLS); PIN: hex SHA-256 of the server's
 *   SubjectPublicKeyInfo, checked after the handshake as the agent does. Without them
 *   steady speaks plain HTTP (tangd).
 *
 * steady: CONCURRENCY threads, each in a closed loop (connect, handshake, request,
 * read to EOF, close) for WARMUP_S then DURATION_S; only the second span is counted.
 * storm: one thread per line of HOSTS_FILE ("CERT KEY REQUEST_FILE D1,D2,..."), all
 * released at once. A host retries after a failed attempt (no connection, timeout, TLS
 * failure, HTTP 429 or 5xx) waiting max(Dk, Retry-After), and gives up when that wait
 * would pass DEADLINE_S: the retry loop of the agent's KeyClient.call, with the delays
 * Dk drawn by the Python side from the agent's own policy. A host answered after
 * DEADLINE_S is counted as failed ("late"): its boot has fallen back to a prompt.
 * With several PORTs (several key-server nodes), each round of a host tries every node
 * in turn, the next one at once after a failure, as the agent walks its [[server]]
 * list; host number i lists them starting at node i mod N, so that a fleet's hosts
 * spread over the nodes, and the pause comes after a round in which every node failed.
 * Both print one JSON object on stdout. Exit status 0 unless the tool itself failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

enum outcome { OK = 0, E_CONNECT, E_TIMEOUT, E_TLS, E_PIN, E_IO, E_STATUS_RETRY, E_STATUS_OTHER, N_OUTCOMES };
static const char *outcome_names[N_OUTCOMES] = {
    "ok", "connect", "timeout", "tls", "pin", "io", "status_retryable", "status_other"};

#define MAX_TARGETS 16
static struct sockaddr_in targets[MAX_TARGETS];
static int n_targets;
static unsigned char pin[32];
static int use_pin;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    ERR_print_errors_fp(stderr);
    exit(2);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(size + 1);
    if (!buf || fread(buf, 1, size, f) != (size_t)size) die(path);
    fclose(f);
    buf[size] = 0;
    *len = size;
    return buf;
}

static SSL_CTX *client_context(const char *cert, const char *key) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* Trust comes from the pin, as in the agent; no session reuse: every boot is a full handshake. */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) die(cert);
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) die(key);
    return ctx;
}

static int pin_matches(SSL *ssl) {
    X509 *peer = SSL_get1_peer_certificate(ssl);
    if (!peer) return 0;
    unsigned char *der = NULL;
    int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(peer), &der);
    unsigned char digest[32];
    unsigned int dlen = 0;
    int ok = len > 0 && EVP_Digest(der, len, digest, &dlen, EVP_sha256(), NULL) == 1 &&
             dlen == 32 && memcmp(digest, pin, 32) == 0;
    OPENSSL_free(der);
    X509_free(peer);
    return ok;
}

static int connect_with_timeout(const struct sockaddr_in *target, double timeout) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (const struct sockaddr *)target, sizeof *target) < 0) {
        if (errno != EINPROGRESS) { close(fd); return -1; }
        struct pollfd p = {fd, POLLOUT, 0};
        int r = poll(&p, 1, (int)(timeout * 1000));
        int err = 0;
        socklen_t elen = sizeof err;
        if (r <= 0) { close(fd); errno = ETIMEDOUT; return -1; }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen);
        if (err) { close(fd); errno = err; return -1; }
    }
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    return fd;
}

static void set_io_timeout(int fd, double timeout) {
    struct timeval tv = {(time_t)timeout, (suseconds_t)((timeout - (time_t)timeout) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* One exchange on a new connection. Sets *status and *retry_after from the answer. */
static enum outcome exchange(const struct sockaddr_in *target, SSL_CTX *ctx, const char *request,
                             size_t request_len, double connect_timeout, double io_timeout, int *status,
                             double *retry_after) {
    char buf[16384];
    size_t got = 0;
    *status = 0;
    *retry_after = 0;
    int fd = connect_with_timeout(target, connect_timeout);
    if (fd < 0) return errno == ETIMEDOUT ? E_TIMEOUT : E_CONNECT;
    SSL *ssl = NULL;
    enum outcome result = E_IO;
    if (ctx) {
        /* As the agent does (transport.py): once TCP is connected, the handshake waits
           under the read timeout, however long the server's listen queue is. */
        set_io_timeout(fd, io_timeout);
        ssl = SSL_new(ctx);
        SSL_set_fd(ssl, fd);
        if (SSL_connect(ssl) != 1) {
            result = (errno == EAGAIN || errno == EWOULDBLOCK) ? E_TIMEOUT : E_TLS;
            ERR_clear_error();
            goto out;
        }
        if (use_pin && !pin_matches(ssl)) { result = E_PIN; goto out; }
    }
    set_io_timeout(fd, io_timeout);
    if (ctx) {
        if (SSL_write(ssl, request, (int)request_len) != (int)request_len) goto io_error;
    } else if (write(fd, request, request_len) != (ssize_t)request_len) {
        goto io_error;
    } else {
        /* tangd answers and then reads on until EOF (curl in clevis stops at Content-Length
           and closes); our half-close lets it exit, so reading to EOF ends. */
        shutdown(fd, SHUT_WR);
    }
    for (;;) { /* the request says Connection: close; read to EOF */
        int n = ssl ? SSL_read(ssl, buf + got, (int)(sizeof buf - 1 - got)) :
                      (int)read(fd, buf + got, sizeof buf - 1 - got);
        if (n <= 0) {
            if (ssl) {
                int e = SSL_get_error(ssl, n);
                if (e == SSL_ERROR_ZERO_RETURN) break;
                if (e == SSL_ERROR_SYSCALL && n == 0) break; /* EOF without close_notify */
            } else if (n == 0) {
                break;
            }
            goto io_error;
        }
        got += n;
        if (got >= sizeof buf - 1) break; /* answers here are small; keep the head */
    }
    buf[got] = 0;
    if (sscanf(buf, "HTTP/1.%*d %d", status) != 1) goto io_error;
    char *ra = strcasestr(buf, "\r\nRetry-After:");
    if (ra) *retry_after = atof(ra + 14);
    result = *status == 200 ? OK : (*status == 429 || *status >= 500) ? E_STATUS_RETRY : E_STATUS_OTHER;
    goto out;
io_error:
    result = (errno == EAGAIN || errno == EWOULDBLOCK) ? E_TIMEOUT : E_IO;
    ERR_clear_error();
out:
    if (ssl) {
        SSL_shutdown(ssl); /* sends close_notify; does not wait for the peer's */
        SSL_free(ssl);
    }
    close(fd);
    return result;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double *sorted, size_t n, double p) {
    if (!n) return 0;
    size_t i = (size_t)(p / 100.0 * (n - 1) + 0.5);
    return sorted[i < n ? i : n - 1];
}

static int parse_pin(const char *hex) {
    use_pin = 1;
    if (strlen(hex) != 64) return 0;
    for (int i = 0; i < 32; i++)
        if (sscanf(hex + 2 * i, "%2hhx", &pin[i]) != 1) return 0;
    return 1;
}

/* ---- steady ---- */

struct steady_worker {
    pthread_t thread;
    SSL_CTX *ctx;
    const char *request;
    size_t request_len;
    double start, measure_from, stop;
    double *latencies;
    size_t count, capacity;
    size_t all_ok; /* warm-up included: what the server's CPU time is divided by */
    unsigned long outcomes[N_OUTCOMES];
};

static void *steady_run(void *arg) {
    struct steady_worker *w = arg;
    while (now() < w->start) usleep(1000);
    for (;;) {
        double t0 = now();
        if (t0 >= w->stop) break;
        int status;
        double retry_after;
        enum outcome o = exchange(&targets[0], w->ctx, w->request, w->request_len, 10, 10, &status, &retry_after);
        double t1 = now();
        if (o == OK) w->all_ok++;
        if (t0 < w->measure_from || t1 > w->stop) continue;
        w->outcomes[o]++;
        if (o != OK) continue;
        if (w->count == w->capacity) {
            w->capacity = w->capacity ? 2 * w->capacity : 4096;
            w->latencies = realloc(w->latencies, w->capacity * sizeof(double));
            if (!w->latencies) die("realloc");
        }
        w->latencies[w->count++] = t1 - t0;
    }
    return NULL;
}

static int steady(int argc, char **argv) {
    if (argc != 4 && argc != 7) return -1;
    int concurrency = atoi(argv[0]);
    double warmup = atof(argv[1]), duration = atof(argv[2]);
    size_t request_len;
    char *request = read_file(argv[3], &request_len);
    SSL_CTX *ctx = NULL;
    if (argc == 7) {
        if (!parse_pin(argv[6])) return -1;
        ctx = client_context(argv[4], argv[5]);
    }
    struct steady_worker *workers = calloc(concurrency, sizeof *workers);
    double start = now() + 0.2;
    for (int i = 0; i < concurrency; i++) {
        struct steady_worker *w = &workers[i];
        w->ctx = ctx;
        w->request = request;
        w->request_len = request_len;
        w->start = start;
        w->measure_from = start + warmup;
        w->stop = start + warmup + duration;
        if (pthread_create(&w->thread, NULL, steady_run, w)) die("pthread_create");
    }
    size_t total = 0, all_ok = 0;
    unsigned long outcomes[N_OUTCOMES] = {0};
    for (int i = 0; i < concurrency; i++) {
        pthread_join(workers[i].thread, NULL);
        total += workers[i].count;
        all_ok += workers[i].all_ok;
        for (int k = 0; k < N_OUTCOMES; k++) outcomes[k] += workers[i].outcomes[k];
    }
    double *all = malloc((total ? total : 1) * sizeof(double));
    size_t n = 0;
    for (int i = 0; i < concurrency; i++) {
        memcpy(all + n, workers[i].latencies, workers[i].count * sizeof(double));
        n += workers[i].count;
    }
    qsort(all, n, sizeof(double), compare_double);
    printf("{\"mode\":\"steady\",\"concurrency\":%d,\"duration\":%.3f,\"ok\":%zu,\"all_ok\":%zu,"
           "\"rate\":%.1f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,\"outcomes\":{",
           concurrency, duration, n, all_ok, n / duration, percentile(all, n, 50) * 1e3,
           percentile(all, n, 90) * 1e3, percentile(all, n, 99) * 1e3, n ? all[n - 1] * 1e3 : 0);
    for (int k = 0; k < N_OUTCOMES; k++) printf("%s\"%s\":%lu", k ? "," : "", outcome_names[k], outcomes[k]);
    printf("}}\n");
    return 0;
}

/* ---- storm ---- */

struct host {
    pthread_t thread;
    size_t index; /* its place in HOSTS_FILE: where its list of nodes starts */
    SSL_CTX *ctx;
    char *request;
    size_t request_len;
    double *delays;
    int n_delays;
    double served_at; /* seconds after the start; <0 when it gave up */
    double gave_up_at; /* seconds after the start, when it gave up */
    int attempts;
    int late; /* answered, but after DEADLINE_S: the boot had already fallen back to a prompt */
    unsigned long outcomes[N_OUTCOMES];
};

static double storm_start, connect_timeout, read_timeout, deadline;

static void sleep_seconds(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

static void *storm_run(void *arg) {
    struct host *h = arg;
    sleep_seconds(storm_start - now());
    double stop = storm_start + deadline;
    h->served_at = -1;
    for (int round = 0;; round++) {
        double retry_after = 0;
        for (int k = 0; k < n_targets; k++) {
            double remaining = stop - now();
            if (remaining <= 0) return NULL;
            int status;
            double hint;
            double ct = connect_timeout < remaining ? connect_timeout : remaining;
            double rt = read_timeout < remaining ? read_timeout : remaining;
            const struct sockaddr_in *node = &targets[(h->index + k) % n_targets];
            enum outcome o = exchange(node, h->ctx, h->request, h->request_len, ct, rt, &status, &hint);
            h->attempts++;
            h->outcomes[o]++;
            double at = now() - storm_start;
            if (o == OK && at <= deadline) {
                h->served_at = at;
                return NULL;
            }
            /* Timeouts bound each socket operation, as in the agent, not the whole exchange,
               so an answer can come after the deadline; it counts as a failure. */
            h->gave_up_at = at;
            if (o == OK) {
                h->late = 1;
                return NULL;
            }
            if (o == E_PIN || o == E_STATUS_OTHER) return NULL; /* the agent stops at once */
            if (hint > retry_after) retry_after = hint;
        }
        double delay = h->delays[round < h->n_delays ? round : h->n_delays - 1];
        if (retry_after > delay) delay = retry_after;
        if (now() + delay >= stop) return NULL;
        sleep_seconds(delay);
    }
}

static int storm(int argc, char **argv) {
    if (argc != 5 || !parse_pin(argv[4])) return -1;
    connect_timeout = atof(argv[1]);
    read_timeout = atof(argv[2]);
    deadline = atof(argv[3]);
    FILE *f = fopen(argv[0], "r");
    if (!f) die(argv[0]);
    size_t capacity = 1024, n = 0;
    struct host *hosts = calloc(capacity, sizeof *hosts);
    char cert[4096], key[4096], request[4096], delays[65536];
    while (fscanf(f, "%4095s %4095s %4095s %65535s", cert, key, request, delays) == 4) {
        if (n == capacity) {
            hosts = realloc(hosts, 2 * capacity * sizeof *hosts);
            memset(hosts + capacity, 0, capacity * sizeof *hosts);
            capacity *= 2;
        }
        struct host *h = &hosts[n];
        h->index = n++;
        h->ctx = client_context(cert, key);
        h->request = read_file(request, &h->request_len);
        h->delays = malloc(sizeof(double) * (strlen(delays) / 2 + 2));
        for (char *p = strtok(delays, ","); p; p = strtok(NULL, ",")) h->delays[h->n_delays++] = atof(p);
        if (!h->n_delays) h->delays[h->n_delays++] = 1;
    }
    fclose(f);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    storm_start = now() + 1.0 + n / 20000.0; /* every thread exists before the first knock */
    const char *start_file = getenv("LOADGEN_START_FILE");
    if (start_file) { /* when the storm starts, on CLOCK_MONOTONIC: for whoever acts during it */
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", start_file);
        FILE *sf = fopen(tmp, "w");
        if (!sf || fprintf(sf, "%.6f\n", storm_start) < 0 || fclose(sf) != 0 || rename(tmp, start_file) != 0)
            die(start_file);
    }
    for (size_t i = 0; i < n; i++)
        if (pthread_create(&hosts[i].thread, &attr, storm_run, &hosts[i])) die("pthread_create");
    unsigned long outcomes[N_OUTCOMES] = {0};
    size_t served = 0, attempts = 0;
    double *times = malloc(n * sizeof(double));
    double *gave_up = malloc(n * sizeof(double)); /* when each failed host stopped trying */
    size_t failed = 0, late = 0;
    for (size_t i = 0; i < n; i++) {
        pthread_join(hosts[i].thread, NULL);
        attempts += hosts[i].attempts;
        for (int k = 0; k < N_OUTCOMES; k++) outcomes[k] += hosts[i].outcomes[k];
        late += hosts[i].late;
        if (hosts[i].served_at >= 0) times[served++] = hosts[i].served_at;
        else gave_up[failed++] = hosts[i].gave_up_at;
    }
    qsort(times, served, sizeof(double), compare_double);
    qsort(gave_up, failed, sizeof(double), compare_double);
    printf("{\"mode\":\"storm\",\"hosts\":%zu,\"served\":%zu,\"failed\":%zu,\"late\":%zu,\"attempts\":%zu,"
           "\"makespan_s\":%.3f,\"p50_s\":%.3f,\"p99_s\":%.3f,"
           "\"gave_up_min_s\":%.3f,\"gave_up_p50_s\":%.3f,\"gave_up_max_s\":%.3f,\"outcomes\":{",
           n, served, failed, late, attempts, served ? times[served - 1] : 0, percentile(times, served, 50),
           percentile(times, served, 99), failed ? gave_up[0] : 0, percentile(gave_up, failed, 50),
           failed ? gave_up[failed - 1] : 0);
    for (int k = 0; k < N_OUTCOMES; k++) printf("%s\"%s\":%lu", k ? "," : "", outcome_names[k], outcomes[k]);
    printf("}}\n");
    return 0;
}

int main(int argc, char **argv) {
    /* A node killed mid-exchange must cost its hosts an error, as the agent sees it (Python
       ignores SIGPIPE), not this process. */
    signal(SIGPIPE, SIG_IGN);
    if (argc < 4) goto usage;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    char ports[256];
    snprintf(ports, sizeof ports, "%s", argv[3]);
    for (char *port = strtok(ports, ","); port; port = strtok(NULL, ",")) {
        if (n_targets == MAX_TARGETS || getaddrinfo(argv[2], port, &hints, &res) != 0) goto usage;
        memcpy(&targets[n_targets++], res->ai_addr, sizeof targets[0]);
        freeaddrinfo(res);
    }
    if (!n_targets) goto usage;
    int rest = argc - 4;
    char **args = argv + 4;
    int r = -1;
    if (!strcmp(argv[1], "steady")) r = steady(rest, args);
    else if (!strcmp(argv[1], "storm")) r = storm(rest, args);
    if (r == 0) return 0;
usage:
    fprintf(stderr,
            "usage: loadgen steady HOST PORT CONCURRENCY WARMUP_S DURATION_S REQUEST_FILE [CERT KEY PIN]\n"
            "       loadgen storm HOST PORT[,PORT...] HOSTS_FILE CONNECT_TIMEOUT_S READ_TIMEOUT_S DEADLINE_S PIN\n");
    return 2;
}
