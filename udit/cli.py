"""Command-line helpers shared by the scripts: the parser, value types and one-line errors.

Every script builds its parser with ArgumentParser below, gives each numeric flag a
`number(...)` type and each output path an `output_dir` / `output_file` type, so a bad
value exits with status 2 and one line naming the flag before anything is created.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path


class ActionableError(Exception):
    """A failure whose message says what to do; scripts print it as one line and exit with `exit_status`."""
    exit_status = 2


def run_guarded(prog, fn):
    """Call fn(); a known failure prints `prog: error: ...` on one line and returns its exit status.

    ActionableError: its own status; ValueError (bad data, checkpoint or setting): 2;
    OSError (disk full, unwritable folder): 1. Anything else is a bug and keeps its traceback.
    """
    try:
        fn()
    except (ActionableError, ValueError, OSError) as err:
        # One write: processes of one job share the stream, and print's two writes (text, newline) interleave.
        sys.stderr.write(f"{prog}: error: {error_message(err)}\n")
        sys.stderr.flush()
        if getattr(err, "raised_on_every_process", False):
            _meet_before_exit()
        if isinstance(err, ActionableError):
            return err.exit_status
        return 2 if isinstance(err, ValueError) else 1
    return 0


def raised_on_every_process(err):
    """Mark err as raised by every process of the job at the same point; returns err.

    run_guarded then prints its line and waits for the others before returning: a launcher
    (torchrun) that sees one process exit stops the rest, often before they print, and a
    node would end with no line at all.
    """
    err.raised_on_every_process = True
    return err


def _meet_before_exit():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def error_message(err):
    """The message of err; for one re-raised from a DataLoader worker, the worker's own message.

    torch re-raises a worker's exception with the same type and a message made of the
    worker's whole traceback, whose last line is "module.Type: message".
    """
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.partition(f"{type(err).__name__}: ")[2] or last


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors end with the one line a user reads first.

    argparse prints its whole usage block (dozens of flags for train.py) above the error;
    here a one-line pointer to --help comes first and `prog: error: ...` last, exit 2.
    """

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options] (--help lists them)\n{self.prog}: error: {message}\n")


def number(kind, min=None, max=None, min_inclusive=True, max_inclusive=True):
    """argparse type factory: an int or float in the range [min, max] (an end open when not inclusive).

    kind: int or float; min/max: None for no bound. NaN is always refused and so is
    infinity unless it is an inclusive bound (e.g. max=math.inf): either would turn into
    silent garbage (NaN images, NaN weights, a run that never stops). The error names the
    range, e.g. "must be an integer >= 1, got 0"; argparse prefixes "argument --flag: ".
    """
    def describe():
        noun = "an integer" if kind is int else "a number"
        low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (min, max))
        if min is not None and max is not None:
            return f"{noun} in {'[' if min_inclusive else '('}{low}, {high}{']' if max_inclusive else ')'}"
        if min is not None:
            return f"{noun} {'>=' if min_inclusive else '>'} {low}"
        if max is not None:
            return f"{noun} {'<=' if max_inclusive else '<'} {high}"
        return "a finite number" if kind is float else noun

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe()}, got {text}") from None
        if value != value or (kind is float and math.isinf(value) and value not in (min, max)):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = min is not None and (value < min or (value == min and not min_inclusive))
        too_high = max is not None and (value > max or (value == max and not max_inclusive))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {describe()}, got {text}")
        return value

    parse.bounds = (kind, min, max, min_inclusive, max_inclusive)  # what tests enumerate
    return parse


positive_int = number(int, min=1)
positive_float = number(float, min=0, min_inclusive=False)
finite_float = number(float)
non_negative_int = number(int, min=0)
# numpy's SeedSequence takes non-negative integers; torch.manual_seed at most 64 bits.
seed = number(int, min=0, max=2**32 - 1)


def _unwritable_reason(path):
    """Why `path` (a folder, existing or to be created) cannot take new files; None when it can.

    The nearest existing folder at or above it decides: a file or a dangling link there, or
    a folder without write permission, would fail only once the work is done.
    """
    ancestor = path
    while not ancestor.exists():
        if ancestor.is_symlink():
            return f"{ancestor} is a dangling link"
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"the folder {ancestor} is not writable"
    return None


def output_dir(text):
    """argparse type for a folder a script creates or fills: refused unless it can be.

    It may exist (as a folder) or not (its nearest existing parent must be a writable
    folder); nothing is created here. Returns the text unchanged.
    """
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a folder (choose another path)")
    problem = _unwritable_reason(path)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot create or write the folder {text}: {problem}")
    return text


def output_file(text):
    """argparse type for a file a script writes: not a folder, and its folder exists or can be created."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name (e.g. {path / 'out'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
    problem = _unwritable_reason(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {problem}")
    return text


def inside(output, source):
    """True when the folder `output` is `source` or lies below it: what is written there would be read as input."""
    output, source = Path(output).resolve(), Path(source).resolve()
    return output == source or source in output.parents


def json_object(text):
    """argparse type for --model-kwargs: a JSON object, parsed, never evaluated."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"depth\": [1, 2, 4, 2, 1]}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"hidden_size\": 64}'")
    return value


def given_flags(parser, argv=None):
    """Destinations of the flags typed on the command line, even those given their default value."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=namespace)
    return sorted(k for k, v in vars(namespace).items() if v is not unset)
