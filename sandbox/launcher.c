/* k1rl sandbox launcher: the few steps between fork and exec of a sandboxed run, in C.
 *
 * The worker used to do them in Python (subprocess preexec_fn). A preexec_fn makes
 * Python fork() its whole ~35 MB process; without one it can vfork(), ~1.6 ms less per
 * run. So the worker vforks this small program, which does what preexec_fn did and
 * execs the real command (bwrap):
 *
 *   k1rl-launch CPU AS FSIZE NOFILE NPROC UID PROCS_FILES -- COMMAND...
 *
 * CPU (seconds; hard limit CPU+1), AS, FSIZE (bytes), NOFILE, NPROC: rlimits, soft = hard
 * except CPU; core dumps off. UID: uid and gid of the run, supplementary groups dropped.
 * PROCS_FILES: cgroup.procs files to move into, separated by ':' ("-" for none).
 * A "-" for a limit leaves it as it is; UID "-": keep the current identity.
 * Any failure ends with exit status 126 and one "k1rl-launch: ..." line on stderr, before
 * the command runs.
 *
 *   k1rl-launch --from-fd N
 *
 * reads the same arguments, each ended by a NUL byte, from file descriptor N until EOF,
 * closes it and goes on as above. This is how a pre-warmed sandbox starts its program
 * (sandbox/bubblewrap.py): bubblewrap has set everything up and runs this, which waits
 * on N for the run's limits and command, sets the limits inside the sandbox and execs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/resource.h>
#include <unistd.h>

static void die(const char *what, const char *arg) {
  fprintf(stderr, "k1rl-launch: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
  _exit(126);
}

static unsigned long long number(const char *s) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || end == s) {
    errno = EINVAL;
    die("bad number", s);
  }
  return v;
}

static void limit(int resource, const char *value, const char *name) {
  if (strcmp(value, "-") == 0) return;
  rlim_t v = number(value);
  /* CPU: SIGXCPU at the soft limit, SIGKILL a second later */
  struct rlimit r = {v, resource == RLIMIT_CPU ? v + 1 : v};
  if (setrlimit(resource, &r) != 0) die("setrlimit", name);
}

/* argv from fd: NUL-terminated strings until EOF (the caller's message is small). */
static char **read_args(const char *fd_arg, int *argc_out) {
  int fd = (int)number(fd_arg);
  size_t cap = 4096, len = 0;
  char *buf = malloc(cap);
  if (!buf) die("out of memory", NULL);
  for (;;) {
    if (len == cap && !(buf = realloc(buf, cap *= 2))) die("out of memory", NULL);
    ssize_t n = read(fd, buf + len, cap - len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("read", fd_arg);
    if (n == 0) break;
    len += (size_t)n;
  }
  close(fd);
  int argc = 1;
  for (size_t i = 0; i < len; i++) argc += buf[i] == '\0';
  char **argv = calloc((size_t)argc + 1, sizeof *argv);
  if (!argv) die("out of memory", NULL);
  argv[0] = "k1rl-launch";
  int k = 1;
  for (size_t i = 0; i < len; i += strlen(buf + i) + 1) argv[k++] = buf + i;
  *argc_out = k;
  return argv;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--from-fd") == 0) argv = read_args(argv[2], &argc);
  if (argc < 10 || strcmp(argv[8], "--") != 0) {
    fprintf(stderr, "usage: k1rl-launch CPU AS FSIZE NOFILE NPROC UID PROCS_FILES -- COMMAND...\n");
    return 126;
  }
  if (strcmp(argv[7], "-") != 0) {
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%d", (int)getpid());
    for (char *path = strtok(argv[7], ":"); path; path = strtok(NULL, ":")) {
      int fd = open(path, O_WRONLY | O_CLOEXEC);
      if (fd < 0 || write(fd, pid, n) != n) die("cannot join cgroup", path);
      close(fd);
    }
  }
  limit(RLIMIT_CPU, argv[1], "cpu");
  limit(RLIMIT_AS, argv[2], "as");
  limit(RLIMIT_FSIZE, argv[3], "fsize");
  limit(RLIMIT_NOFILE, argv[4], "nofile");
  limit(RLIMIT_NPROC, argv[5], "nproc");
  limit(RLIMIT_CORE, "0", "core");
  if (strcmp(argv[6], "-") != 0) {
    gid_t id = (gid_t)number(argv[6]);
    if (setgroups(0, NULL) != 0) die("setgroups", NULL);
    if (setgid(id) != 0) die("setgid", argv[6]);
    if (setuid((uid_t)id) != 0) die("setuid", argv[6]);
  }
  execv(argv[9], argv + 9);
  die("cannot run", argv[9]);
  return 126;
}
