"""usi/errors.py: UsageError's one-line form, cut long lines, "did you mean", what a path is, escaping."""
import io
import logging
import os

import pytest

from usi.errors import UsageError, file_problem, one_line, printable, quote, shorten, suggest

from conftest import usi_main


def test_a_huge_value_is_not_echoed_back_whole(tmp_path):
    (tmp_path / "r.yaml").write_text('model:\n  kwargs: {x: "' + "a" * 200_000 + '"}\n  nosuch: 1\n')
    out = usi_main("train", str(tmp_path / "r.yaml"))
    assert out.returncode == 2 and len(out.stderr) < 3000, len(out.stderr)


def test_one_line_keeps_the_first_line_or_a_worker_tracebacks_last():
    first = "model.name='x' is not a timm model"
    assert one_line(ValueError(f"{first}\nmore detail")) == first  # a library's message: its first line
    # usi's own messages are one line: a line break in one came with a file name, and is kept, escaped
    assert one_line(UsageError("image folder a\nusi: error: forged does not exist")) == \
        "image folder a\\nusi: error: forged does not exist"
    worker = RuntimeError("Caught OSError in DataLoader worker process 0.\n"
                          "Original Traceback (most recent call last):\n"
                          "  File \"x.py\", line 1, in f\nOSError: image file is truncated")
    assert one_line(worker) == "image file is truncated"
    assert one_line(ValueError("")) == "ValueError"  # no message: at least its kind


def test_shorten_cuts_a_long_line_and_says_how_much_it_left_out():
    assert shorten("a" * 1000) == "a" * 1000
    assert shorten("a" * 1500) == "a" * 1000 + "... (500 more characters)"
    assert len(one_line(UsageError("b" * 10_000))) < 1100


def test_suggest_names_the_closest_choice_or_nothing():
    assert suggest("lrr", ["lr", "weight_decay", "eps"]) == "; did you mean 'lr'?"
    assert suggest("resnet5O", ["resnet50", "resnet18"]) == "; did you mean 'resnet50'?"
    assert suggest("zzzz", ["lr", "eps"]) == ""


def test_file_problem_names_what_a_path_is_without_opening_it(tmp_path):
    regular, fifo, zero, dangling = (tmp_path / n for n in ("w.pt", "pipe.pt", "zero.pt", "gone.pt"))
    regular.write_bytes(b"x")
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    dangling.symlink_to(tmp_path / "nothing")
    assert file_problem(regular) is None
    assert file_problem(tmp_path) == "is a directory, not a file"
    assert file_problem(fifo) == "is not a regular file (a named pipe)"  # not opened: opening would block
    assert file_problem(zero) == "is not a regular file (a character device)"
    assert file_problem(tmp_path / "none") == "does not exist"
    assert file_problem(dangling) == "is a link to a file that does not exist"


@pytest.mark.parametrize("raw, shown", [
    ("a\nusi: error: forged", "a\\nusi: error: forged"), ("a\rb", "a\\rb"), ("\x1b[2Jx", "\\x1b[2Jx"),
    ("a\tb\x00", "a\\tb\\x00"), ("a\x7fb\x85", "a\\x7fb\\x85"), ("a\u2028b\u2029", "a\\u2028b\\u2029"),
    ("evil\u202egpj.exe", "evil\\u202egpj.exe"), ("Ünïcödé 名前 ok", "Ünïcödé 名前 ok")])
def test_printable_escapes_every_control_character_and_keeps_the_rest(raw, shown):
    assert printable(raw) == shown


def test_every_usi_log_line_is_escaped_whatever_prints_it():
    """The filter sits on the logger, before any handler: the console's, log.txt's, logging's last resort
    (a dry run sets none up) all get the escaped line."""
    log, out = logging.getLogger("usi"), io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    try:
        log.warning("skipped unreadable image %s: x", "a.jpg\nusi: error: forged")
        log.warning("class folder " + "b\x1b[31m")
    finally:
        log.removeHandler(handler)
    assert out.getvalue().splitlines() == ["skipped unreadable image a.jpg\\nusi: error: forged: x",
                                           "class folder b\\x1b[31m"]


def test_quote_cuts_a_huge_value_and_says_how_much_it_left_out():
    assert quote("resnet50") == "'resnet50'"
    assert quote("a" * 120_000) == "'" + "a" * 79 + "... (119922 more characters)"
    assert quote("a\nb") == "'a\\nb'"
