"""
Starts a model program in a process group of its own: C{python _pgroup.py PROGRAM ARGS...}.

The daemon spawns this (argv, never a shell), which calls C{setsid()} and then
C{execv}s the program: the program keeps this process's pid, leads a new process group,
and whatever it starts joins that group, so the daemon can end them all with one
C{killpg}. On Linux it also asks for SIGTERM should the daemon die without stopping it.
"""

import os
import signal
import sys


def main():
    os.setsid()
    try:
        import ctypes  # here: only where it can be loaded (the wrapper must start anyway)

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    program = sys.argv[1]
    try:
        os.execv(program, sys.argv[1:])
    except OSError as e:
        sys.stderr.write(f"aibackend: cannot start {program}: {e.strerror}\n")
        sys.stderr.flush()
        os._exit(127)


if __name__ == "__main__":
    main()
