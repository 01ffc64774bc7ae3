"""What `bench` reports as one line and exit status 2: a user's mistake or a run that cannot go on
as asked, never a bug (those keep their traceback)."""


class BenchError(Exception):
    """Base of every error `bench` prints as one line and exits 2 for (LoaderError from the library
    is the other)."""


class UsageError(BenchError):
    """A bad command line or option."""


class Preempted(BenchError):
    """SIGTERM: the run checkpointed at a step boundary and stopped; ``bench run --resume`` continues it."""

    exit_code = 143  # 128 + SIGTERM: what a shell (and SLURM) reports for a run ended by TERM
