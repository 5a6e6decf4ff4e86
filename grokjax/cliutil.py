"""What the commands share: an argparse parser whose errors are one line, and the
environment variables that cap the BLAS/OpenMP thread pools."""

from __future__ import annotations

import argparse

# The thread-pool variables of numpy's BLAS and OpenMP: set to 1 in analysis workers and in
# the benchmark's torch process so that processes do not oversubscribe the cores.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, `<prog>: error: <message>`, and
    exit code 2, instead of the usage block and the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
