"""Command-line arguments of every `raynas` subcommand: the parser and the typed value converters.

A bad argument is a user error like a bad config field: one line `raynas: error: <flag>: <problem>;
allowed: <what is>` and exit code 2, never argparse's multi-line usage block (`--help` still shows it).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from typing import Any

from raynas import config
from raynas.errors import ConfigError, UserError

# argparse's own messages, reworded into `<flag>: <problem>; allowed: <what is>`
_INVALID_CHOICE = re.compile(r"invalid choice: (?P<value>.*) \(choose from (?P<choices>.*)\)$")
_INVALID_VALUE = re.compile(r"invalid (?P<kind>\w+) value: (?P<value>.*)$")
_KINDS = {"int": "an integer", "float": "a number"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors raised as `UserError` (the `raynas` command prints them)."""

    def parse_known_args(self, args=None, namespace=None):
        # Each subcommand's parser refuses what it does not know, so the error can list its own options.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            options = sorted(o for a in self._actions for o in a.option_strings if o not in ("-h", "--help"))
            raise UserError(f"{extras[0]}: unknown argument of `{self.prog}`; allowed: "
                            f"{', '.join(options) or 'no options'} (see `{self.prog} --help`)")
        return namespace, extras

    def error(self, message: str):
        raise UserError(self._one_line(message))

    def _one_line(self, message: str) -> str:
        if message.startswith("the following arguments are required: "):
            names = message.split(": ", 1)[1]
            return f"{names}: missing; allowed: see `{self.prog} --help`"
        if not message.startswith("argument "):
            return f"{self.prog}: {message}; allowed: see `{self.prog} --help`"
        flag, problem = message[len("argument "):].split(": ", 1)
        if match := _INVALID_CHOICE.match(problem):
            return f"{flag}: {match['value']} is not allowed; allowed: {match['choices']}"
        if match := _INVALID_VALUE.match(problem):
            return f"{flag}: got {match['value']}; allowed: {_KINDS.get(match['kind'], match['kind'])}"
        if problem.startswith("expected "):  # e.g. a flag given without its value
            return f"{flag}: {problem}; allowed: see `{self.prog} --help`"
        return f"{flag}: {problem}"


def _checked(cast: Callable[[str], Any], check: Callable[[Any, str], Any]) -> Callable[[str], Any]:
    """An argparse `type`: `cast` the text, then check it with a raynas.config checker, so a flag and a
    config field are refused in the same words."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = text  # not a number at all: the checker refuses it, saying what is allowed
        try:
            return check(value, "value")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    return parse


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for integers in [minimum, maximum] (either end may be open)."""
    return _checked(int, lambda value, field: config.integer(value, field, minimum, maximum))


def number(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """An argparse `type` for finite numbers in [low, high] (either end may be open)."""
    return _checked(float, lambda value, field: config.number(value, field, low, high))


def number_list(low: float | None = None, high: float | None = None) -> Callable[[str], list[float]]:
    """An argparse `type` for comma-separated numbers, each in [low, high]."""
    one = number(low, high)
    return lambda text: [one(item) for item in text.split(",")]


def json_argument(text: str, flag: str) -> Any:
    """Inline JSON, or the JSON held by the file `text` names (a local path or a URI)."""
    from raynas import storage

    source, what = text, "not valid JSON"
    if not text.lstrip().startswith(("{", "[")) and storage.is_file(text):
        source = storage.read_bytes(text, flag).decode("utf-8", errors="replace")
        what = f"{storage.display(text)} does not hold valid JSON"
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag}: {what} ({exc.msg} at char {exc.pos}); allowed: a JSON object or a file "
                        "holding one") from None


SEED = integer(0)        # numpy and torch seeds are non-negative
POSITIVE = integer(1)    # counts: samples, workers, epochs, passes, threads
