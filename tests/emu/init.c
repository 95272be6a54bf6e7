/* PID 1 of the emulated AVX-512 machine (tests/emu/avx512.sh).

   The initramfs holds this program as /init, the statically linked AVX-512
   test suite as /moe_tests, and the files the suite reads (/tests/ref,
   /tests/big, /examples/data). The program checks that the emulated CPU
   has the instructions the suite was compiled for, runs the suite from
   /tests with 2 OpenMP threads, prints "EMU-EXIT <status>" and powers the
   machine off, which ends the emulator. An optional suite filter comes from
   the kernel command line (moe_filter=NAME, which the kernel hands to init
   as an environment variable). Everything goes to the serial console.   */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <termios.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>

static int has_flag(const char *flags, const char *name) {   /* whole word in the flags line */
    size_t n = strlen(name);
    const char *p = flags;
    while ((p = strstr(p, name)) != NULL) {
        if ((p == flags || p[-1] == ' ' || p[-1] == '\t') && (p[n] == ' ' || p[n] == '\n' || p[n] == '\0'))
            return 1;
        p += n;
    }
    return 0;
}

static int run_suite(void) {
    static char line[8192];
    const char *need[] = { "avx512f", "avx512_bf16", "avx512_vnni" };
    FILE *f = fopen("/proc/cpuinfo", "r");
    int found = 0, status = 0;
    size_t i;
    pid_t pid;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "flags", 5) == 0) { found = 1; break; }
    if (f) fclose(f);
    if (!found) { printf("emu: no flags line in /proc/cpuinfo\n"); return 2; }
    for (i = 0; i < sizeof need / sizeof need[0]; i++) {
        if (!has_flag(line, need[i])) { printf("emu: the emulated CPU lacks %s\n", need[i]); return 2; }
        printf("emu: the emulated CPU has %s\n", need[i]);
    }
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        char *filter = getenv("moe_filter");
        char *argv[] = { "/moe_tests", filter, NULL };
        char *envp[] = { "OMP_NUM_THREADS=2", NULL };
        if (chdir("/tests") != 0) _exit(126);
        execve(argv[0], argv, envp);
        _exit(127);
    }
    if (pid < 0 || waitpid(pid, &status, 0) != pid) { printf("emu: could not run the suite\n"); return 2; }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(void) {
    int rc;
    mount("proc", "/proc", "proc", 0, NULL);
    mkdir("/tmp", 01777);                         /* tmpfile() in the suite */
    mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
    rc = run_suite();
    printf("EMU-EXIT %d\n", rc);
    fflush(stdout);
    tcdrain(STDOUT_FILENO);                       /* let the serial port drain before power-off */
    sleep(1);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
