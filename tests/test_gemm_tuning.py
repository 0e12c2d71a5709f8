"""The GEMM tuning cache (runtime/ops/cuda/gemm_tuning.py) without a GPU: problem keys, the cache file's location,
reading and writing it, and the clear errors a broken cache gives (naming the file and what to do)."""

import json
from types import SimpleNamespace

import pytest
from fastdm.runtime.errors import InvalidArgumentError
from fastdm.runtime.ops.cuda import gemm_tuning as gt


def test_problem_keys_round_trip():
    for text in ("4608x9216x3072", "4608x3072x15360-gated", "1x1x1"):
        assert gt.Problem.parse(text).key == text
    p = gt.Problem.parse(" 2048x1280x5120-gated ")
    assert (p.M, p.N, p.K, p.gated) == (2048, 1280, 5120, True)


@pytest.mark.parametrize("bad", ["4608x9216", "4608x9216x0", "ax9216x3072", "1x2x3-fused", "1x2x3x4", ""])
def test_bad_problem_says_what_a_problem_is(bad):
    with pytest.raises(InvalidArgumentError, match="MxNxK"):
        gt.Problem.parse(bad)


def test_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDM_GEMM_TUNING", str(tmp_path / "t.json"))
    assert gt.cache_path() == tmp_path / "t.json"
    monkeypatch.setenv("FASTDM_GEMM_TUNING", "off")
    assert gt.cache_path() is None
    monkeypatch.delenv("FASTDM_GEMM_TUNING")
    assert gt.cache_path().name == "gemm_sm90.json"


def test_card_key():
    dev = SimpleNamespace(name="NVIDIA H100 80GB HBM3", multiprocessor_count=132, l2_cache_size=50 << 20)
    assert gt.card_key(dev) == "NVIDIA H100 80GB HBM3|132|50"


def test_write_then_read(tmp_path):
    path = tmp_path / "sub" / "gemm.json"
    assert gt.read_cache(path) == {"version": gt.CACHE_VERSION, "cards": {}}  # no file yet: empty
    data = {"version": gt.CACHE_VERSION,
            "cards": {"card|132|50": {"4608x3072x15360": {"config": 16, "ms": 0.586, "auto_ms": 0.651}}}}
    gt.write_cache(path, data)
    assert gt.read_cache(path) == data
    assert [p.name for p in path.parent.iterdir()] == ["gemm.json"]  # no temporary file left behind


@pytest.mark.parametrize("content,why", [
    ("{not json", "cannot be read"),
    (json.dumps({"version": 99, "cards": {}}), "not a version"),
    (json.dumps({"version": 1, "cards": {"c": []}}), "holds no entries"),
    (json.dumps({"version": 1, "cards": {"c": {"1x2x3": {"config": -1}}}}), "no valid configuration"),
    (json.dumps({"version": 1, "cards": {"c": {"1x2x3": {"config": "16"}}}}), "no valid configuration"),
    (json.dumps({"version": 1, "cards": {"c": {"12x3": {"config": 1}}}}), "MxNxK"),
])
def test_broken_cache_names_the_file_and_the_fix(tmp_path, content, why):
    path = tmp_path / "gemm.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError, match=why) as e:
        gt.read_cache(path)
    assert str(path) in str(e.value) and "delete it" in str(e.value)
