/*
 * fault.c - surviving a SIGBUS while working on shared memory.  The server
 * maps files its clients share with it; a client may truncate such a file
 * (or hugetlbfs may run out of pages) while a request works on it, and the
 * access then faults.  The guarded thread jumps out of its request, which
 * fails with EFAULT; a SIGBUS anywhere else is handled as before.
 *
 * A signal handler is process-wide by nature: the previous action and the
 * guarded thread's jump target are the two pieces of state it needs, set
 * up once.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

#include "dmint.h"

static _Thread_local sigjmp_buf *guard_target;	/* set while this thread is guarded */
static struct sigaction previous;		/* SIGBUS's action before ours */
static pthread_once_t installed = PTHREAD_ONCE_INIT;

static void
on_sigbus(int sig, siginfo_t *info, void *uc)
{
	if (guard_target != NULL)
		siglongjmp(*guard_target, 1);
	/* Not ours: put the previous action back; the faulting access runs
	 * again and meets it (an asynchronous SIGBUS is then lost once). */
	sigaction(SIGBUS, &previous, NULL);
}

static void
install(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &previous);
}

int
dm_fault_guard(int (*fn)(void *), void *arg)
{
	sigjmp_buf target;
	sigset_t bus, old;
	volatile int err = EFAULT;

	pthread_once(&installed, install);
	sigemptyset(&bus);
	sigaddset(&bus, SIGBUS);
	/* The server's threads block signals; a synchronous one must reach us. */
	pthread_sigmask(SIG_UNBLOCK, &bus, &old);
	if (sigsetjmp(target, 0) == 0) {
		guard_target = &target;
		err = fn(arg);
	}
	guard_target = NULL;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return err;
}
