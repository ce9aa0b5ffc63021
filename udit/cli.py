"""argparse value types shared by the scripts: bad values exit with status 2 and one line."""

import argparse
import json


def json_object(text):
    """argparse type for --model-kwargs: a JSON object, parsed, never evaluated."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"depth\": [1, 2, 4, 2, 1]}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"hidden_size\": 64}'")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
