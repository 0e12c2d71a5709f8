"""bench/ab_libraries.py without a GPU: the order it runs the builds in, its table, and its refusals. (The child
processes' measurements need CUDA and torch; they run on the GPU machine.)"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ab_libraries", ROOT / "bench" / "ab_libraries.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def empty_libraries(folder: Path, *names: str) -> list[Path]:
    """Library files that exist (the children that would load them are faked)."""
    libs = [folder / name for name in names]
    for lib in libs:
        lib.write_bytes(b"")
    return libs


def test_builds_alternate_and_the_table_compares_them(ab, tmp_path, monkeypatch, capsys):
    libs = empty_libraries(tmp_path, "main.so", "new.so")
    calls = []

    def fake_child(lib, case_sets, rounds):
        calls.append((Path(lib).name, tuple(case_sets), rounds))
        us = 40.0 if Path(lib).name == "main.so" else 30.0
        return {"add [2, 8, 8, 64]": {"add": 10.0 + len(calls), "add_stats": us}}

    monkeypatch.setattr(ab, "run_child", fake_child)
    ab.main([str(libs[0]), str(libs[1]), "--cases", "producers", "--rounds", "3", "--alternations", "2"])
    assert calls == [("main.so", ("producers",), 3), ("new.so", ("producers",), 3)] * 2
    out = capsys.readouterr().out
    assert f"A = {libs[0]}, B = {libs[1]}" in out
    # every run's time in its build's column (A: runs 1 and 3, B: runs 2 and 4), then B's mean over A's
    assert "| add [2, 8, 8, 64] | add | 11.00 / 13.00 | 12.00 / 14.00 | 1.083 |" in out
    assert "| add [2, 8, 8, 64] | add_stats | 40.00 / 40.00 | 30.00 / 30.00 | 0.750 |" in out


def test_a_call_missing_from_a_build_shows_as_a_dash(ab):
    runs = [(0, {"case": {"x": 2.0, "y": 4.0}}), (1, {"case": {"x": 1.0}})]
    text = ab.table(["a.so", "b.so"], runs)
    assert "| case | x | 2.00 | 1.00 | 0.500 |" in text
    assert "| case | y | 4.00 | - | - |" in text


@pytest.mark.parametrize("argv,message", [
    (["one.so"], "at least two library builds"),
    (["--cases", "groupnorm,nonsense", "a.so", "b.so"], "unknown case set"),
])
def test_refusals(ab, argv, message, capsys):
    with pytest.raises(SystemExit):
        ab.main(argv)
    assert message in capsys.readouterr().err


def test_missing_library_file_is_named(ab, tmp_path, capsys):
    (real,) = empty_libraries(tmp_path, "main.so")
    with pytest.raises(SystemExit):
        ab.main([str(real), str(tmp_path / "absent.so")])
    assert "absent.so" in capsys.readouterr().err


def test_every_case_set_reaches_the_children(ab, tmp_path, monkeypatch, capsys):
    libs = empty_libraries(tmp_path, "a.so", "b.so")
    seen = []

    def fake_child(lib, case_sets, rounds):
        seen.append(tuple(case_sets))
        return {"attention x": {"attention": 2.0, "cudnn": 2.5, "attention/cudnn %": 80.0}}

    monkeypatch.setattr(ab, "run_child", fake_child)
    ab.main([str(libs[0]), str(libs[1]), "--cases", ",".join(ab.CASE_SETS), "--alternations", "1"])
    assert seen == [tuple(ab.CASE_SETS)] * 2
    assert {"groupnorm", "producers", "gemm", "attention"} <= set(ab.CASE_SETS)
    assert "| attention x | attention/cudnn % | 80.00 | 80.00 | 1.000 |" in capsys.readouterr().out
