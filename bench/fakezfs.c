/*
 * fakezfs: a zero-cost stand-in for zfs and zpool, so that timing an agent run measures
 * the agent, not ZFS. It answers exactly the calls `zfs-unlock-agent unlock --no-mount`
 * makes (zfs_unlock_agent/zfs.py):
 *
 *   zpool list -H -p -o name,guid ...         the canned DIR/zpool-list.out
 *   zfs list -H -p -t filesystem,volume ...   the canned DIR/zfs-list.out
 *   zfs load-key -L prompt DATASET            reads the key from stdin to EOF; a raw key
 *                                             must be 32 bytes ("Raw key too short/long")
 *
 * DIR is the directory of argv[0]; the program is zpool when argv[0] ends in "zpool",
 * else zfs (bench/agent.py links both names to this binary). Every call appends one line
 * to DIR/calls.log (the arguments; for load-key, the dataset and how many bytes came), so
 * the benchmark can prove each run loaded every key. Anything else exits 2, loudly.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RAW_KEY_BYTES 32

static char dir[4096];

static void path_in_dir(char *out, size_t size, const char *name) {
    if ((size_t)snprintf(out, size, "%s/%s", dir, name) >= size) {
        fprintf(stderr, "fakezfs: path too long\n");
        exit(2);
    }
}

static int write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static void log_call(int argc, char **argv, const char *extra) {
    char line[8192], path[4200];
    size_t used = 0;
    for (int i = 0; i < argc && used < sizeof line; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, "%s%s", i ? " " : "", argv[i]);
    if (used < sizeof line) used += (size_t)snprintf(line + used, sizeof line - used, "%s\n", extra);
    if (used >= sizeof line) used = sizeof line - 1;
    path_in_dir(path, sizeof path, "calls.log");
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || write_all(fd, line, used) < 0) {
        perror("fakezfs: calls.log");
        exit(2);
    }
    close(fd);
}

static int cat(const char *name) {
    char path[4200], buf[65536];
    path_in_dir(path, sizeof path, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror(path);
        return 2;
    }
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        if (write_all(STDOUT_FILENO, buf, (size_t)n) < 0) return 2;
    close(fd);
    return n < 0 ? 2 : 0;
}

static int load_key(int argc, char **argv) {
    /* zfs load-key -L prompt DATASET: the only form the agent's unlock uses */
    if (argc != 5 || strcmp(argv[2], "-L") != 0 || strcmp(argv[3], "prompt") != 0) {
        fprintf(stderr, "fakezfs: unsupported load-key form\n");
        return 2;
    }
    char buf[4096];
    size_t total = 0;
    ssize_t n;
    while ((n = read(STDIN_FILENO, buf, sizeof buf)) != 0) {
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("fakezfs: stdin");
            return 2;
        }
        total += (size_t)n;
    }
    memset(buf, 0, sizeof buf); /* the key was here */
    char extra[64];
    snprintf(extra, sizeof extra, " %zu", total);
    log_call(argc, argv, extra);
    if (total != RAW_KEY_BYTES) {
        fprintf(stderr, "Key load error: Raw key too %s (expected %d).\n",
                total < RAW_KEY_BYTES ? "short" : "long", RAW_KEY_BYTES);
        return 255;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *slash = strrchr(argv[0], '/');
    if (!slash || (size_t)(slash - argv[0]) >= sizeof dir) {
        fprintf(stderr, "fakezfs: run me by an absolute path (my directory holds the answers)\n");
        return 2;
    }
    memcpy(dir, argv[0], (size_t)(slash - argv[0]));
    size_t name_len = strlen(slash + 1);
    int is_zpool = name_len >= 5 && strcmp(slash + 1 + name_len - 5, "zpool") == 0;
    if (argc >= 2 && strcmp(argv[1], "list") == 0) {
        log_call(argc, argv, "");
        return cat(is_zpool ? "zpool-list.out" : "zfs-list.out");
    }
    if (!is_zpool && argc >= 2 && strcmp(argv[1], "load-key") == 0) return load_key(argc, argv);
    log_call(argc, argv, " unsupported");
    fprintf(stderr, "fakezfs: unsupported command: %s\n", argc >= 2 ? argv[1] : "(none)");
    return 2;
}
