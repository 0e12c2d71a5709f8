"""FASTDM_CUDA_GRAPHS switches the models' CUDA-graph replay off (runtime/graphs.graphs_enabled); CPU models never
capture."""

from pathlib import Path

import pytest
from fastdm.runtime import graphs

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False), ("off", False),
                                            ("False", False), ("no", False), ("yes", True)])
def test_environment_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("FASTDM_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("FASTDM_CUDA_GRAPHS", value)
    assert graphs.graphs_enabled() is enabled


def test_cpu_unet_runs_eagerly():
    from fastdm.models.denoisers.unet2d import UNet2DCondition

    model = UNet2DCondition.from_pretrained(FIXTURES / "sdxl_unet_tiny", device="cpu", dtype="float32")
    assert not isinstance(model._body, graphs.CapturedCall)
