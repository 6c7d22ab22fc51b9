"""The command-line tools' argument parser and the argparse types they share.

`ArgumentParser` is transformers' `HfArgumentParser` (options built from a dataclass's fields, their help, choices
and metavar read from each field's `metadata`) with what every pcaa-* tool needs:
- One spelling: options are declared in snake_case (`--output_dir`), as transformers' own scripts spell them; each is
  also accepted in kebab-case (`--output-dir`, the spelling of the tools' first versions), and the other way round.
  The second spelling is an alias for parsing only: --help and error messages use the declared one.
- @FILE arguments (with `fromfile_prefix_chars="@"`): one option and its values a line, `#` starting a comment.
- Dataclass fields typed `tuple[int, int]` take two values (`--base_size 2048 1024`); bool fields are flags, bare
  (`--multi_grid`) or with a value (`--multi_grid false`); `types` reads the values of a field its own way (e.g.
  `--bins 2x2 4x4` by `region_grid`); a field's `metadata["group"]` lists it under that heading in --help.

Each type refuses a bad value with a message naming it. `reports_errors` makes a tool's `main` end a failure caused
by its input (a file, an argument, the data) with one `error:` line and exit status 2, never a traceback.
"""

import argparse
import functools
import math
import re
import sys
import tempfile
from pathlib import Path
from types import GenericAlias

from huggingface_hub.errors import StrictDataclassError
from transformers.hf_argparser import HfArgumentParser, string_to_bool

# What a tool reports as its user's error: missing, unreadable, unwritable or invalid files (OSError), invalid values
# (ValueError, a configuration's StrictDataclassError), missing optional packages (ImportError). Our own checks raise
# these with a message naming the file or argument; anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, ImportError, StrictDataclassError)


def reports_errors(main=None, *, also=()):
    """
    Decorate a tool's `main(argv=None)`: a `USER_ERRORS` failure prints `error: <message>` and returns 2. A tool
    whose own failures end the same way names their types: `@reports_errors(also=(TrainingDivergedError,))`.
    """
    if main is None:
        return functools.partial(reports_errors, also=also)
    errors = USER_ERRORS + tuple(also)

    @functools.wraps(main)
    def main_reporting_errors(argv=None):
        try:
            return main(argv)
        except errors as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return main_reporting_errors


def other_spelling(option):
    """`--a_b` for `--a-b` and the other way round; None for an option with neither (or a short one)."""
    if not option.startswith("--"):
        return None
    name = option[2:]
    if "_" in name:
        return "--" + name.replace("_", "-")
    if "-" in name:
        return "--" + name.replace("-", "_")
    return None


def command_line_text(value):
    """A default as it is typed: sequences joined by spaces, a sequence inside one by "x" (`2048 1024`, `2x2 4x4`)."""
    if isinstance(value, (list, tuple)):
        return " ".join("x".join(map(str, item)) if isinstance(item, (list, tuple)) else str(item) for item in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (the tools' docstrings hold examples laid out by hand)."""


class DefaultsHelpFormatter(HelpFormatter):
    """Also each option's default after its help, where it has one (not None or False) the help does not give."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default is argparse.SUPPRESS
                or "default:" in text):
            return text
        return f"{text} (default: {command_line_text(default).replace('%', '%%')})"


class ArgumentParser(HfArgumentParser):
    """
    argparse for the pcaa-* tools (see the module docstring); `dataclass_types` and `**kwargs` as
    `HfArgumentParser`'s, `types` {field name: argparse type} for fields whose values are read their own way.
    Arguments added by hand take `group=TITLE` too.
    """

    def __init__(self, dataclass_types=None, *, types=None, **kwargs):
        self._field_types = dict(types or {})
        self._groups = {}
        kwargs.setdefault("formatter_class", HelpFormatter if dataclass_types is None else DefaultsHelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    def group(self, title):
        """The argument group listed under `title` in --help, made on first use."""
        if title not in self._groups:
            self._groups[title] = self.add_argument_group(title)
        return self._groups[title]

    def _add_dataclass_arguments(self, dtype):
        for title in getattr(dtype, "_argument_groups", ()):  # the order of the headings in --help
            self.group(title)
        super()._add_dataclass_arguments(dtype)

    def add_argument(self, *names, group=None, resumable_change=None, **kwargs):
        # resumable_change: field metadata for resumed training runs (TrainingArguments), nothing the parser uses.
        # HfArgumentParser declares a field's kebab spelling too: here it is an alias, which parse_known_args adds.
        names = [name for name in names if "_" in name or other_spelling(name) not in names]
        dest = kwargs.get("dest") or (names[0].lstrip("-").replace("-", "_") if names else None)
        value_type = kwargs.get("type")
        if dest in self._field_types:
            kwargs["type"] = self._field_types[dest]
        elif isinstance(value_type, GenericAlias) and value_type.__origin__ is tuple:  # HfArgumentParser has no rule
            # for tuples: it would call tuple[int, int]("2048"), splitting the string into characters.
            element = value_type.__args__[0]
            if kwargs.get("nargs") is not None or set(value_type.__args__) != {element}:
                raise TypeError(f"{names[0]}: give its type in `types` (HfArgumentParser reads {value_type} as "
                                "one string)")
            kwargs.update(type=element, nargs=len(value_type.__args__))
        elif value_type is string_to_bool:
            kwargs.setdefault("metavar", "true|false")
        if group is None:
            return super().add_argument(*names, **kwargs)
        return self.group(group).add_argument(*names, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            for option in action.option_strings:
                alias = other_spelling(option)
                if alias is not None:
                    self._option_string_actions.setdefault(alias, action)
        return super().parse_known_args(args, namespace)

    def _get_option_tuples(self, option_string):
        # An abbreviation that both spellings of one option start with means that option, not an ambiguity.
        matches = {}
        for match in super()._get_option_tuples(option_string):
            matches.setdefault(id(match[0]), match)  # the declared spelling, met first
        return list(matches.values())

    def convert_arg_line_to_args(self, line):
        """A line of an @FILE: an option and its values, `#` starting a comment."""
        return line.split("#", 1)[0].split()

    def parse_into_dataclasses(self, args=None):
        """
        The instances of the dataclass types, from the command line; a dataclass's refusal (a ValueError of its
        __post_init__, naming the field) is reported by `error`: usage, message, exit status 2.
        """
        namespace = self.parse_args(args)
        try:
            return self.parse_dict(vars(namespace))
        except ValueError as error:
            self.error(str(error))


def output_folder(text):
    """
    A folder a tool writes into, created if needed: refused at once when it, or the nearest of its parents that
    exists, is a file, or when no file can be created there (a read-only folder or file system).
    """
    path = Path(text)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder" + ("" if existing == path else
                                         f", so {text} cannot be created"))
    try:
        with tempfile.TemporaryFile(dir=existing):  # permissions, read-only mounts, root: only a write can tell
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write into {existing}: {error.strerror}") from None
    return path


def output_file(text):
    """A file a tool writes, its folder created if needed: refused when it is a folder or `output_folder` refuses its
    folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    output_folder(path.parent)
    return path


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return int(text)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# The largest input scale the tools take. The memory of a forward, and of the (K, H, W) logits kept per image, grows
# with the square of the scale: at 4 a 1024x2048 frame becomes 4096x8192, 20 GB per float32 logit map of 150 classes,
# of which inference holds a few. The paper's multi-scale test goes up to 1.75.
MAX_IMAGE_SCALE = 4.0


def image_scale(text):
    """A factor by which an image is rescaled before the model: positive, at most `MAX_IMAGE_SCALE`."""
    value = positive_float(text)
    if value > MAX_IMAGE_SCALE:
        raise argparse.ArgumentTypeError(
            f"a scale is at most {MAX_IMAGE_SCALE:g}, got {text!r}: memory grows with the square of the scale (at "
            f"{MAX_IMAGE_SCALE:g} a 1024x2048 image takes {MAX_IMAGE_SCALE ** 2:g} times the memory of scale 1)")
    return value


def opacity(text):
    """A number between 0 (transparent) and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def batch_shape(text):
    """An input shape written BATCHxHEIGHTxWIDTH (e.g. 3x389x643)."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not match or min(int(value) for value in match.groups()) < 1:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxHEIGHTxWIDTH with positive integers (e.g. 3x389x643), "
                                         f"got {text!r}")
    return tuple(int(value) for value in match.groups())


def region_grid(text):
    """A PCAA region grid written ROWSxCOLUMNS (e.g. 4x4), as the authors' --bin_h/--bin_w pairs."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"a bin grid is ROWSxCOLUMNS with positive integers (e.g. 4x4), got {text!r}")
    return int(match[1]), int(match[2])


__all__ = ["MAX_IMAGE_SCALE", "USER_ERRORS", "ArgumentParser", "batch_shape", "image_scale", "non_negative_int",
           "opacity", "output_file", "output_folder", "positive_float", "positive_int", "region_grid", "reports_errors"]
