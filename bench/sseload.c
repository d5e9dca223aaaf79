/* sseload: one load-client process holding many SSE streams (compiled by bench/cclient.py).
 *
 * Same measurement as bench/loadclient.py, without Python's per-read cost: events are
 * counted by the '~' marker that starts every benchmark payload; the latency of the
 * first complete payload in each read (the oldest event in it) is weighted by the
 * number of events in that read. Commands come one per line on stdin, answers go one
 * per line to stdout:
 *
 *   target HOST PORT PATHFILE   paths, one per line; connection i uses path i mod k;
 *                               a line "PATH<TAB>ID" sends "Last-Event-ID: ID" with it
 *   connect N FIRST CONC        open N more streams, at most CONC connecting at once;
 *                               answers "connected ELAPSED_US" when all resolved
 *   goal K                      note when each stream has had K events in all
 *                               (a resume's replay); answers "ok"
 *   reset                       zero event counters and the CPU baseline
 *   stats                       "stats opened failed dropped events max_us cpu_us wall_us
 *                                nbuckets [bucket count]... nconn [connect_us]...
 *                                nlive [live_us]... ndone [done_us]..."
 *   close                       close everything, answer "closed", exit
 *
 * A stream is "live" once its first "id:" line arrived after the headers: ssehub sends
 * a stream's position only when its channels are subscribed in Redis. connect_us is
 * the time from connect() to the response headers, live_us to that first "id:" line,
 * done_us to the event that made the stream's count reach the goal.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define HIST_US 100
#define HIST_SIZE 100001
#define HEAD_MAX 8192
#define CONNECT_TIMEOUT_NS 30000000000LL

enum { CONNECTING, HEADERS, OPEN, DONE };

typedef struct {
    int fd;
    int state;
    int64_t t0;
    int path;
    int head_len;
    char *head;
    int live;
    int done;
    uint64_t n; /* events on this stream since it opened */
    int tail_len;
    char tail[3]; /* last bytes before live: "\nid:" may straddle two reads */
} conn_t;

static conn_t *conns;
static int nconns, capconns;
static char **paths;
static char **lastids; /* NULL or the Last-Event-ID of each path */
static int npaths;
static struct sockaddr_in dst, src;
static char hostport[300];
static int epfd;

static uint64_t hist[HIST_SIZE];
static uint64_t opened, failed, dropped, events, max_us;
static int64_t *connect_us;
static size_t nconnect_us, capconnect_us;
static int64_t *live_us;
static size_t nlive_us, caplive_us;
static int64_t *done_us;
static size_t ndone_us, capdone_us;
static uint64_t goal;
static double cpu0;
static int64_t wall0;

/* connect round in progress */
static int round_left, round_inflight, round_conc, round_next_path;
static int64_t round_t0;
static int round_active;

static int64_t now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t now_real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void reset(void) {
    memset(hist, 0, sizeof hist);
    events = 0;
    max_us = 0;
    cpu0 = cpu_s();
    wall0 = now_mono();
}

static void add_connect_time(int64_t us) {
    if (nconnect_us == capconnect_us) {
        capconnect_us = capconnect_us ? capconnect_us * 2 : 1024;
        connect_us = realloc(connect_us, capconnect_us * sizeof *connect_us);
    }
    connect_us[nconnect_us++] = us;
}

static void add_live_time(int64_t us) {
    if (nlive_us == caplive_us) {
        caplive_us = caplive_us ? caplive_us * 2 : 1024;
        live_us = realloc(live_us, caplive_us * sizeof *live_us);
    }
    live_us[nlive_us++] = us;
}

static void add_done_time(int64_t us) {
    if (ndone_us == capdone_us) {
        capdone_us = capdone_us ? capdone_us * 2 : 1024;
        done_us = realloc(done_us, capdone_us * sizeof *done_us);
    }
    done_us[ndone_us++] = us;
}

/* Body bytes of a stream not live yet: look for the start of an "id:" line. */
static void watch_live(conn_t *c, const char *p, size_t n) {
    char buf[4 + 64];
    /* the tail plus the first bytes of this read catch a split "\nid:" */
    size_t head = n < 64 ? n : 64;
    memcpy(buf, c->tail, c->tail_len);
    memcpy(buf + c->tail_len, p, head);
    size_t blen = c->tail_len + head;
    if (memmem(buf, blen, "\nid:", 4) || memmem(p, n, "\nid:", 4)) {
        c->live = 1;
        add_live_time((now_mono() - c->t0) / 1000);
        return;
    }
    size_t keep = blen < 3 ? blen : 3;
    memcpy(c->tail, buf + blen - keep, keep);
    c->tail_len = (int)keep;
}

static void finish(conn_t *c, int failure) {
    if (c->state == DONE) return;
    if (failure == 1) failed++;
    if (failure == 2) dropped++;
    if (c->state == CONNECTING) round_inflight--;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = DONE;
    free(c->head);
    c->head = NULL;
}

static void start_one(void) {
    if (nconns == capconns) {
        capconns = capconns ? capconns * 2 : 1024;
        conns = realloc(conns, capconns * sizeof *conns);
    }
    int idx = nconns++;
    conn_t *c = &conns[idx];
    memset(c, 0, sizeof *c);
    c->t0 = now_mono();
    c->path = round_next_path++ % npaths;
    c->state = CONNECTING;
    round_inflight++;
    round_left--;
    int one = 1;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        c->state = DONE;
        round_inflight--;
        failed++;
        return;
    }
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0 ||
        (connect(c->fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS)) {
        close(c->fd);
        c->state = DONE;
        round_inflight--;
        failed++;
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)idx};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void pump_round(void) {
    while (round_active && round_left > 0 && round_inflight < round_conc) start_one();
    if (round_active && round_left == 0 && round_inflight == 0) {
        round_active = 0;
        printf("connected %lld\n", (long long)((now_mono() - round_t0) / 1000));
        fflush(stdout);
    }
}

static void on_connected(conn_t *c, int idx) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        finish(c, 1);
        return;
    }
    char req[2048], last[400] = "";
    if (lastids[c->path]) snprintf(last, sizeof last, "Last-Event-ID: %s\r\n", lastids[c->path]);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\n%s\r\n",
                     paths[c->path], hostport, last);
    if (n >= (int)sizeof req || write(c->fd, req, n) != n) {
        finish(c, 1);
        return;
    }
    c->state = HEADERS;
    round_inflight--;
    c->head = malloc(HEAD_MAX);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_body(conn_t *c, const char *p, size_t n) {
    uint64_t count = 0;
    const char *q = p, *end = p + n, *first = NULL;
    while ((q = memchr(q, '~', end - q)) != NULL) {
        if (!first) first = q;
        count++;
        q++;
    }
    if (!count) return;
    events += count;
    c->n += count;
    if (goal && !c->done && c->n >= goal) {
        c->done = 1;
        add_done_time((now_mono() - c->t0) / 1000);
    }
    /* "~SEQ TIME_NS " : skip SEQ, read TIME_NS, which must end with a space in this read */
    const char *s = memchr(first, ' ', end - first);
    if (!s) return;
    s++;
    int64_t t = 0;
    const char *d = s;
    while (d < end && *d >= '0' && *d <= '9') t = t * 10 + (*d++ - '0');
    if (d == end || *d != ' ' || d == s) return;
    int64_t us = (now_real() - t) / 1000;
    if (us < 0) us = 0;
    if ((uint64_t)us > max_us) max_us = us;
    int64_t b = us / HIST_US;
    hist[b < HIST_SIZE ? b : HIST_SIZE - 1] += count;
}

static char rbuf[1 << 16];

static void on_readable(conn_t *c) {
    ssize_t n = read(c->fd, rbuf, sizeof rbuf);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        finish(c, c->state == OPEN ? 2 : 1);
        return;
    }
    if (c->state == HEADERS) {
        size_t take = (size_t)n;
        if (c->head_len + take > HEAD_MAX) take = HEAD_MAX - c->head_len;
        memcpy(c->head + c->head_len, rbuf, take);
        int old = c->head_len;
        c->head_len += take;
        char *e = memmem(c->head, c->head_len, "\r\n\r\n", 4);
        if (!e) {
            if (c->head_len == HEAD_MAX) finish(c, 1);
            return;
        }
        if (c->head_len < 12 || memcmp(c->head + 9, "200", 3) != 0) {
            finish(c, 1);
            return;
        }
        size_t body_off = (size_t)(e + 4 - c->head) - old; /* offset in rbuf */
        c->state = OPEN;
        opened++;
        add_connect_time((now_mono() - c->t0) / 1000);
        free(c->head);
        c->head = NULL;
        /* the blank line ending the headers: a body starting with "id:" is a line start */
        c->tail[0] = '\n';
        c->tail_len = 1;
        if (body_off < (size_t)n) {
            watch_live(c, rbuf + body_off, n - body_off);
            on_body(c, rbuf + body_off, n - body_off);
        }
        return;
    }
    if (!c->live) watch_live(c, rbuf, n);
    on_body(c, rbuf, n);
}

static void print_stats(void) {
    printf("stats %llu %llu %llu %llu %llu %lld %lld", (unsigned long long)opened,
           (unsigned long long)failed, (unsigned long long)dropped, (unsigned long long)events,
           (unsigned long long)max_us, (long long)((cpu_s() - cpu0) * 1e6),
           (long long)((now_mono() - wall0) / 1000));
    int nb = 0;
    for (int i = 0; i < HIST_SIZE; i++) nb += hist[i] != 0;
    printf(" %d", nb);
    for (int i = 0; i < HIST_SIZE; i++)
        if (hist[i]) printf(" %d %llu", i, (unsigned long long)hist[i]);
    printf(" %zu", nconnect_us);
    for (size_t i = 0; i < nconnect_us; i++) printf(" %lld", (long long)connect_us[i]);
    printf(" %zu", nlive_us);
    for (size_t i = 0; i < nlive_us; i++) printf(" %lld", (long long)live_us[i]);
    printf(" %zu", ndone_us);
    for (size_t i = 0; i < ndone_us; i++) printf(" %lld", (long long)done_us[i]);
    printf("\n");
    fflush(stdout);
}

static void load_paths(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) {
        perror(file);
        exit(2);
    }
    char line[1024];
    npaths = 0;
    int cap = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!*line) continue;
        if (npaths == cap) {
            cap = cap ? cap * 2 : 64;
            paths = realloc(paths, cap * sizeof *paths);
            lastids = realloc(lastids, cap * sizeof *lastids);
        }
        char *tab = strchr(line, '\t');
        if (tab) *tab = 0;
        lastids[npaths] = tab && tab[1] ? strdup(tab + 1) : NULL;
        paths[npaths++] = strdup(line);
    }
    fclose(f);
}

static char cmdbuf[1 << 16];
static size_t cmdlen;

static int on_command(char *line) {
    char a[256], file[4096];
    int n, first, conc, port;
    if (sscanf(line, "target %255s %d %4095s", a, &port, file) == 3) {
        dst.sin_family = AF_INET;
        dst.sin_port = htons(port);
        inet_pton(AF_INET, a, &dst.sin_addr);
        snprintf(hostport, sizeof hostport, "%s:%d", a, port);
        load_paths(file);
    } else if (sscanf(line, "connect %d %d %d", &n, &first, &conc) == 3) {
        round_left = n;
        round_conc = conc > 0 ? conc : 1;
        round_next_path = first;
        round_t0 = now_mono();
        round_active = 1;
        pump_round();
    } else if (sscanf(line, "goal %d", &n) == 1) {
        goal = n > 0 ? (uint64_t)n : 0;
        printf("ok\n");
        fflush(stdout);
    } else if (strncmp(line, "reset", 5) == 0) {
        reset();
        printf("ok\n");
        fflush(stdout);
    } else if (strncmp(line, "stats", 5) == 0) {
        print_stats();
    } else if (strncmp(line, "close", 5) == 0) {
        for (int i = 0; i < nconns; i++) finish(&conns[i], 0);
        printf("closed\n");
        fflush(stdout);
        return 1;
    } else {
        fprintf(stderr, "sseload: unknown command: %s\n", line);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: sseload SOURCE_IP\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    src.sin_family = AF_INET;
    src.sin_port = 0;
    inet_pton(AF_INET, argv[1], &src.sin_addr);
    epfd = epoll_create1(0);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    reset();
    static struct epoll_event evs[1024];
    int64_t last_scan = now_mono();
    for (;;) {
        int k = epoll_wait(epfd, evs, 1024, 100);
        for (int i = 0; i < k; i++) {
            uint32_t idx = evs[i].data.u32;
            if (idx == UINT32_MAX) {
                ssize_t r = read(0, cmdbuf + cmdlen, sizeof cmdbuf - cmdlen - 1);
                if (r == 0) return 0; /* parent gone */
                if (r < 0) continue;
                cmdlen += r;
                char *nl;
                while ((nl = memchr(cmdbuf, '\n', cmdlen)) != NULL) {
                    *nl = 0;
                    if (on_command(cmdbuf)) return 0;
                    size_t used = nl + 1 - cmdbuf;
                    memmove(cmdbuf, nl + 1, cmdlen - used);
                    cmdlen -= used;
                }
                continue;
            }
            conn_t *c = &conns[idx];
            if (c->state == CONNECTING) {
                on_connected(c, idx);
            } else if (c->state == HEADERS || c->state == OPEN) {
                if (evs[i].events & EPOLLIN)
                    on_readable(c);
                else if (evs[i].events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP))
                    finish(c, c->state == OPEN ? 2 : 1);
            }
        }
        int64_t now = now_mono();
        if (now - last_scan > 500000000LL) {
            last_scan = now;
            for (int i = 0; i < nconns; i++)
                if (conns[i].state == CONNECTING && now - conns[i].t0 > CONNECT_TIMEOUT_NS)
                    finish(&conns[i], 1);
        }
        pump_round();
    }
}
