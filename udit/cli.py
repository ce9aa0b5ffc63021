"""Command-line helpers shared by the scripts: value types and one-line errors."""

import argparse
import json
import sys


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
        print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
        if isinstance(err, ActionableError):
            return err.exit_status
        return 2 if isinstance(err, ValueError) else 1
    return 0


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


def json_object(text):
    """argparse type for --model-kwargs: a JSON object, parsed, never evaluated."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"depth\": [1, 2, 4, 2, 1]}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"hidden_size\": 64}'")
    return value


def finite_float(text):
    """A float flag that NaN and infinity would turn into silent garbage (NaN images, NaN weights)."""
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def given_flags(parser, argv=None):
    """Destinations of the flags typed on the command line, even those given their default value."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=namespace)
    return sorted(k for k, v in vars(namespace).items() if v is not unset)
