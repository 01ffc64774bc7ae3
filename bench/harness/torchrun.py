"""torchrun (torch.distributed.run) with its failure report turned into one `bench: error` line.

When a rank dies (a signal, the OOM killer, an error), torchrun stops the other ranks within about
a second and raises ChildFailedError, whose traceback buries which rank failed and how. ``bench
run --gpus N`` / ``--cpu-ranks N`` launch ``python -m bench.torchrun <torchrun arguments>``.
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130


def describe(rank: int, failure) -> str:
    """One line for torchrun's first failure (a ProcessFailure)."""
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
        if failure.signal_name() == "SIGKILL":
            how += " (the kernel's OOM killer sends it: see `dmesg`)"
    elif failure.exitcode == 2:
        how = "stopped with the error above"
    else:
        how = f"exited with status {failure.exitcode} (its output is above)"
    return f"rank {rank} (pid {failure.pid}) {how}; torchrun stopped the other ranks"


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"bench: error: {describe(rank, failure)}", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    except (KeyboardInterrupt, SignalException) as exc:  # torchrun has already stopped the ranks
        sig = signal.Signals(getattr(exc, "sigval", signal.SIGINT))
        if sig == signal.SIGTERM:  # passed on to the ranks: with --checkpoint they saved one first
            print("bench: SIGTERM; every rank stopped", file=sys.stderr)
            return 128 + sig  # 143, as a preempted rank and a TERM-killed process report
        print(f"bench: interrupted ({sig.name}); every rank stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
