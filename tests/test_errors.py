"""usi/errors.py: UsageError's one-line form, cut long lines, "did you mean"."""
from conftest import usi_main


def test_a_huge_value_is_not_echoed_back_whole(tmp_path):
    (tmp_path / "r.yaml").write_text('model:\n  kwargs: {x: "' + "a" * 200_000 + '"}\n  nosuch: 1\n')
    out = usi_main("train", str(tmp_path / "r.yaml"))
    assert out.returncode == 2 and len(out.stderr) < 3000, len(out.stderr)
