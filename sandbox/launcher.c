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
 * Any failure ends with exit status 126 and one "k1rl-launch: ..." line on stderr, before
 * the command runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void limit(int resource, rlim_t soft, rlim_t hard, const char *name) {
  struct rlimit r = {soft, hard};
  if (setrlimit(resource, &r) != 0) die("setrlimit", name);
}

int main(int argc, char **argv) {
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
  rlim_t cpu = number(argv[1]);
  limit(RLIMIT_CPU, cpu, cpu + 1, "cpu");
  limit(RLIMIT_AS, number(argv[2]), number(argv[2]), "as");
  limit(RLIMIT_FSIZE, number(argv[3]), number(argv[3]), "fsize");
  limit(RLIMIT_NOFILE, number(argv[4]), number(argv[4]), "nofile");
  limit(RLIMIT_NPROC, number(argv[5]), number(argv[5]), "nproc");
  limit(RLIMIT_CORE, 0, 0, "core");
  gid_t id = (gid_t)number(argv[6]);
  if (setgroups(0, NULL) != 0) die("setgroups", NULL);
  if (setgid(id) != 0) die("setgid", argv[6]);
  if (setuid((uid_t)id) != 0) die("setuid", argv[6]);
  execv(argv[9], argv + 9);
  die("cannot run", argv[9]);
  return 126;
}
