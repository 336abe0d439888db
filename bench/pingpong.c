#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
// Two processes ping-pong one byte over pipes N times; each pinned to a CPU.
// Prints the parent's CPU time per round trip and the wall time.
int main(int argc, char **argv) {
  int a = atoi(argv[1]), b = atoi(argv[2]), n = atoi(argv[3]);
  int p1[2], p2[2]; pipe(p1); pipe(p2); char c = 0;
  cpu_set_t s;
  if (fork() == 0) {
    CPU_ZERO(&s); CPU_SET(b, &s); sched_setaffinity(0, sizeof s, &s);
    for (int i = 0; i < n; i++) { read(p1[0], &c, 1); write(p2[1], &c, 1); }
    return 0;
  }
  CPU_ZERO(&s); CPU_SET(a, &s); sched_setaffinity(0, sizeof s, &s);
  struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) { write(p1[1], &c, 1); read(p2[0], &c, 1); }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  struct rusage r; getrusage(RUSAGE_SELF, &r);
  int st; wait(&st); struct rusage rc; getrusage(RUSAGE_CHILDREN, &rc);
  double wall = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
  double cpu = r.ru_utime.tv_sec * 1e6 + r.ru_utime.tv_usec + r.ru_stime.tv_sec * 1e6 + r.ru_stime.tv_usec;
  double ccpu = rc.ru_utime.tv_sec * 1e6 + rc.ru_utime.tv_usec + rc.ru_stime.tv_sec * 1e6 + rc.ru_stime.tv_usec;
  printf("cpus %d,%d: %.2f us wall per round trip, parent CPU %.2f us, child CPU %.2f us per round trip\n", a, b, wall / n, cpu / n, ccpu / n);
  return 0;
}
