/* A SIGSEGV/SIGABRT/SIGBUS handler that writes the native backtrace to stderr, for machines without gdb.
 *
 * Built and LD_PRELOADed by benchmarks/aoti_load_steps.py. Its constructor installs the handler
 * before Python starts, so Python's faulthandler (which chains to the previous handler) prints
 * the Python stack first and this handler the native frames after it. */
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void write_backtrace(int signal_number, siginfo_t* info, void* context) {
  (void)context;
  void* frames[64];
  char header[160];
  int count = backtrace(frames, 64);
  int length = snprintf(header, sizeof header, "native backtrace: signal %d at address %p, %d frames\n",
                        signal_number, info ? info->si_addr : NULL, count);
  if (write(2, header, (size_t)length) < 0) _exit(128 + signal_number);
  backtrace_symbols_fd(frames, count, 2);
  _exit(128 + signal_number);
}

__attribute__((constructor)) void segv_backtrace_install(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = write_backtrace;
  action.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &action, NULL);
  sigaction(SIGABRT, &action, NULL);
  sigaction(SIGBUS, &action, NULL);
}
