"""Run a job specification from the command line: print its updates, handle Ctrl-C.

Shared by ``classify`` and ``stream``: the first Ctrl-C stops the job after the
current iteration (the checkpoint keeps everything computed), a second one
aborts at once (the checkpoint of the last finished iteration stays).

Under ``torchrun`` only rank 0 prints the job's lines; every process prints its
own errors, marked with its rank (``docs/distributed.md``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from napari_class2d.engine import distributed
from napari_class2d.run.runner import JobRunner, RunError
from napari_class2d.run.spec import JobSpec

#: a repeated waiting line is printed at most this often, seconds
REPEAT_SECONDS = 30.0


class Terminated(KeyboardInterrupt):
    """SIGTERM: ``torchrun`` stops every process when one fails; a batch system at the
    end of a job's time. Handled like a second Ctrl-C: stop at once, keep the last
    checkpoint."""


def run_spec(
    spec: JobSpec,
    prog: str,
    resume_command: Callable[[], str],
    *,
    quiet: bool = False,
    out=None,
) -> int:
    """Run ``spec``; return the exit code (0 done or stopped, 2 bad input, 3 another process
    of a distributed job lost, 130 aborted, 143 terminated by SIGTERM).

    Parameters
    ----------
    spec
        The job.
    prog
        The command, for error messages (``napari-class2d classify``).
    resume_command
        The command line that resumes this job (printed when it stops).
    quiet
        Print only notes, errors and the final line, not one line per iteration.
    """
    out = sys.stdout if out is None else out
    runner = JobRunner(spec)
    if distributed.launched():
        prog = f"{prog} (rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE')})"

    def is_main() -> bool:
        job = runner.job
        return job.reducer.is_main if job is not None else os.environ.get("RANK", "0") == "0"

    interrupted: list[bool] = []

    def on_interrupt(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        if is_main():
            print("\nstopping after the current iteration (Ctrl-C again to abort)...", file=out)
        runner.request_stop()

    def on_terminate(signum, frame):
        raise Terminated

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    previous_term = signal.signal(signal.SIGTERM, on_terminate) if in_main_thread else None
    started = time.monotonic()
    last_line, last_time = "", 0.0
    try:
        for update in runner.run():
            if not is_main():  # the other processes run the same job silently
                continue
            for note in update.notes:
                print(note, file=out, flush=True)
            if update.snapshot is None:
                print(update.status, file=out, flush=True)
                continue
            now = time.monotonic()
            waiting = update.snapshot.phase == "waiting"
            if quiet or (
                waiting and update.status == last_line and now - last_time < REPEAT_SECONDS
            ):
                continue
            print(f"[{now - started:7.1f} s]  {update.status}", file=out, flush=True)
            last_line, last_time = update.status, now
    except RunError as err:
        hint = ""
        if err.kind == "exists":
            hint = ". Add --resume to continue that job or --overwrite to start over"
        print(f"{prog}: error: {err}{hint}", file=sys.stderr)
        if err.exit_code == 3 and distributed.launched():
            # another process is lost: leave without tearing the process group down (its
            # destructor can wait on, or abort over, the lost peer) with the exit code
            # torchrun reports; the checkpoint is already on disk
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        return err.exit_code
    except Terminated:
        print(
            f"{prog}: stopped by SIGTERM (under torchrun: another process of the job failed, "
            f"or the job was cancelled); the checkpoint of the last finished iteration is in "
            f"{spec.out_path}. Resume with:\n  {resume_command()}",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        print(
            f"aborted; the checkpoint of the last finished iteration is in {spec.out_path}. "
            f"Resume with:\n  {resume_command()}",
            file=out,
        )
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
        if runner.outcome in ("done", "stopped"):  # (after a lost process it could hang)
            distributed.shutdown()
    if runner.outcome == "stopped" and is_main():
        print(f"Resume with:\n  {resume_command()}", file=out)
    return 0
