"""Reading the JSON files of a model directory with errors that name the file."""
from __future__ import annotations

import json
import os


def read_json(path) -> dict:
    """The JSON object in ``path``; ValueError naming the file if it is not readable JSON or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: not a text file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object, got {type(value).__name__}")
    return value
