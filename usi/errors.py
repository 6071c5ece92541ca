"""The one exception type a user is meant to see (a one-line message, exit code 2), and the helpers that
keep its messages to one readable line, and what keeps a path a user names from being read as a file."""
import difflib
import logging
import os
import re
import stat


class UsageError(Exception):
    """Bad recipe, data, model name or file: the user can fix it from the message alone."""


def one_line(error: Exception) -> str:
    """The message of `error` as one line. An error raised in a DataLoader worker reaches the main
    process with the worker's whole traceback in its message: its last line is the message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any("Traceback (most recent call last)" in line for line in lines):
        return printable(shorten(lines[-1].split("Error: ", 1)[-1]))
    if isinstance(error, UsageError):  # usi writes one line: a line break in it came with a name or value
        return printable(shorten(str(error).strip()))
    return printable(shorten(lines[0]))


def shorten(line: str, limit: int = 1000) -> str:
    """A line a person reads: a 50 MB value echoed back is cut, with how much was left out."""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line) - limit} more characters)"


def quote(value, limit: int = 80) -> str:
    """repr(value) for a message, cut to `limit` characters: the message around a 120 KB value stays
    readable (repr also escapes its line breaks and control characters)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


# What text from outside (file, folder and class names, recipe values, library messages) must not carry
# onto a console or into log.txt as it is: control characters (a line break would start a forged line, an
# escape sequence rewrites the terminal), Unicode line separators and bidirectional overrides.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every unsafe character escaped as Python writes it (\\n, \\x1b, \\u202e)."""
    return UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class Escaped(logging.Filter):
    """On the `usi` logger: every record's message with its unsafe characters escaped, whatever handler
    prints it (the console, log.txt, logging's last resort before any is set up)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if UNSAFE.search(message):
            record.msg, record.args = printable(message), None
        return True


def suggest(word: str, choices) -> str:
    """'; did you mean X?' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


NOT_REGULAR = ((stat.S_ISDIR, "is a directory, not a file"),
               (stat.S_ISFIFO, "is not a regular file (a named pipe)"),
               (stat.S_ISCHR, "is not a regular file (a character device)"),
               (stat.S_ISBLK, "is not a regular file (a block device)"),
               (stat.S_ISSOCK, "is not a regular file (a socket)"))


def file_problem(path) -> str | None:
    """Why `path` cannot be read as a file, in words ("does not exist", "is a directory, not a file", "is not
    a regular file (a named pipe)", ...), or None. Follows links and never opens the path: a named pipe
    would block, /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a link to a file that does not exist" if os.path.islink(path) else "does not exist"
    except OSError as e:  # a loop of links, a name too long, a file used as a folder
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None if os.access(path, os.R_OK) else "cannot be read (permission denied)"
    return next((reason for test, reason in NOT_REGULAR if test(mode)), "is not a regular file")


# Installed where every usi process (loader workers included, spawned or forked) passes: this module.
logging.getLogger("usi").addFilter(Escaped())
