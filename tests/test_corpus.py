"""The bad-input corpus: every malformed input gets one clear message naming the file or key and exit
code 2 — or is handled as documented — never a traceback, never a partial output."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
from make_corpus import build

from iopfl import cli


def run_cli(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["iopfl", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    entries = build(tmp_path / "corpus")
    handled, problems = 0, []
    for entry in entries:
        code, out, err = run_cli(entry["argv"], monkeypatch, capsys)
        if "Traceback" in err or "Traceback" in out:
            problems.append(f"{entry['name']}: traceback")
        elif entry["expect"] == "error" and not (code == 2 and entry["needle"] in err):
            problems.append(f"{entry['name']}: exit {code}, stderr {err.strip()[:200]!r}")
        elif entry["expect"] == "ok" and code not in (0, None):
            problems.append(f"{entry['name']}: expected to be handled, exit {code}: {err.strip()[:200]!r}")
        else:
            handled += 1
    print(f"{len(entries)} inputs tried, {handled} handled")
    assert not problems, "\n".join(problems)
    assert handled == len(entries) >= 25
    assert not (tmp_path / "PWNED").exists()  # the pickle payload never ran
    for name in ("checkpoint-other-architecture", "checkpoint-truncated", "checkpoint-pickle-payload"):
        assert not list((tmp_path / "corpus" / name).glob("out/*"))  # no partial outputs
