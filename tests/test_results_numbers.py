"""The numbers results/README.md states agree with the committed record (results/check_numbers.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_numbers", ROOT / "results" / "check_numbers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_readme_agrees_with_files(capsys):
    mod = _checker()
    assert mod.main() == 0, capsys.readouterr().out


def test_checker_catches_a_wrong_number(tmp_path, monkeypatch):
    mod = _checker()
    wrong = tmp_path / "README.md"
    wrong.write_text(mod.README.read_text().replace("0.8473 at 666,670", "0.8474 at 666,670"))
    monkeypatch.setattr(mod, "README", wrong)
    assert mod.main() == 1


def test_collapse_definitions_in_words():
    """Every definition of the grid a control may never meet is named as itself (a control that
    never loses 10 points was once written 'never below 0.5 nor 25 points nor below 0.5')."""
    words = _checker()._collapse_words
    assert [words(k) for k in ("drop10", "drop25", "below0.5")] == ["10 points", "25 points", "below 0.5"]
    assert [words(k, adjective=True) for k in ("drop10", "below0.5")] == ["10-point", "below-0.5"]
