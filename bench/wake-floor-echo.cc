// The floor under bench/wake-floor.ts: the least a process can spend on one sleep and wake-up,
// written as plainly as C allows (blocking calls, no event loop). Two modes:
//   echo SOCKET MSG_BYTES   listen on SOCKET, answer each MSG_BYTES-byte message with one of the
//                           same size until the client closes, then print "cpu_us N count N"
//   timer US COUNT          sleep COUNT times on a one-shot timerfd of US µs, then print
//                           "cpu_us N count N wall_us N"
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

static double cpuUs() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

static double nowUs() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int echo(const char* path, size_t bytes) {
  int listener = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(listener, 1) != 0) {
    std::perror("bind/listen");
    return 1;
  }
  // The parent waits for this line before it connects.
  std::printf("listening\n");
  std::fflush(stdout);
  int conn = accept(listener, nullptr, nullptr);
  if (conn < 0) {
    std::perror("accept");
    return 1;
  }
  char buf[4096];
  if (bytes > sizeof buf) bytes = sizeof buf;
  double start = cpuUs();
  long count = 0;
  for (;;) {
    size_t got = 0;
    while (got < bytes) {
      ssize_t r = read(conn, buf + got, bytes - got);
      if (r <= 0) {
        std::printf("cpu_us %.1f count %ld\n", cpuUs() - start, count);
        return 0;
      }
      got += static_cast<size_t>(r);
    }
    if (write(conn, buf, bytes) != static_cast<ssize_t>(bytes)) return 1;
    count++;
  }
}

static int timer(double us, long count) {
  int fd = timerfd_create(CLOCK_MONOTONIC, 0);
  itimerspec spec{};
  spec.it_value.tv_sec = static_cast<time_t>(us / 1e6);
  spec.it_value.tv_nsec = static_cast<long>((us - spec.it_value.tv_sec * 1e6) * 1e3);
  double cpu0 = cpuUs();
  double wall0 = nowUs();
  for (long i = 0; i < count; i++) {
    uint64_t expirations;
    timerfd_settime(fd, 0, &spec, nullptr);
    if (read(fd, &expirations, sizeof expirations) != sizeof expirations) return 1;
  }
  std::printf("cpu_us %.1f count %ld wall_us %.1f\n", cpuUs() - cpu0, count, nowUs() - wall0);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "echo") == 0) return echo(argv[2], std::strtoul(argv[3], nullptr, 10));
  if (argc == 4 && std::strcmp(argv[1], "timer") == 0) return timer(std::strtod(argv[2], nullptr), std::strtol(argv[3], nullptr, 10));
  std::fprintf(stderr, "usage: wake-floor-echo echo SOCKET MSG_BYTES | timer US COUNT\n");
  return 2;
}
