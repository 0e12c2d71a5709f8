"""How the library picks an sm90 GEMM configuration (kernels/gemm.cu: the winners table, then sm90_rule), asked
through fdm_gemm_sm90_auto_config for a given SM count and L2 size. Host code only: runs without a GPU wherever the
kernel library is built for sm_90a (CI builds it)."""

import math

import pytest

from fastdm import kernels

SMS = 132
H100_L2, H200_L2 = 50, 60


@pytest.fixture(scope="module")
def sm90_lib():
    if not kernels.available():
        pytest.skip("the kernel library is not built")
    lib = kernels.library()
    if not lib.fdm_has_sm90():
        pytest.skip("the kernel library was built without sm_90a")
    return lib


@pytest.fixture(scope="module")
def choice(sm90_lib):
    lib = sm90_lib
    names = kernels.sm90_config_names()

    def pick(m, n, k, gated=False, l2=H200_L2):
        return names[lib.fdm_gemm_sm90_auto_config(m, n, k, int(gated), SMS, l2)]

    return pick


def test_table_rows_take_the_hand_written_kernels(choice):
    """FLUX qkv and SDXL's one-wave ff down run the hand-written kernels on both cards; a gated form always runs a
    configuration that takes a gate (never a lean CUTLASS kernel)."""
    for l2 in (H100_L2, H200_L2):
        assert choice(4608, 9216, 3072, l2=l2).startswith("wgmma 128x256")
        assert choice(2048, 1280, 5120, l2=l2).startswith("wgmma 128x160 c2x1")
        for m, n, k in [(4608, 9216, 3072), (2048, 1280, 5120), (4608, 3072, 15360), (8192, 640, 640)]:
            assert "lean" not in choice(m, n, k, gated=True, l2=l2)


def test_card_rows(choice):
    """A row tagged with the H100's L2 size wins there; the untagged row serves the H200."""
    assert choice(4608, 12288, 3072, l2=H100_L2).startswith("wgmma 192x192")
    assert choice(4608, 12288, 3072, l2=H200_L2).startswith("pingpong 128x128")
    # FLUX's gated output projections and SDXL's gated attention projections on the H100 (session 16): the
    # hand-written gated epilogue, not CUTLASS
    for m, n, k in [(4608, 3072, 12288), (4608, 3072, 15360), (4608, 3072, 3072), (4096, 3072, 12288),
                    (4096, 3072, 3072), (8192, 640, 640), (2048, 1280, 1280)]:
        assert choice(m, n, k, gated=True, l2=H100_L2).startswith("wgmma"), (m, n, k)
    # FLUX's 512-row text-stream MLP (session 17): ping-pong 128x128 in clusters of two on the H100
    for m, n, k in [(512, 3072, 12288), (512, 12288, 3072)]:
        assert choice(m, n, k, l2=H100_L2).startswith("pingpong 128x128 c2x1"), (m, n, k)
    assert choice(512, 3072, 12288, gated=True, l2=H100_L2).startswith("pingpong 128x128 c2x1")
    assert choice(512, 3072, 12288, l2=H200_L2).startswith("coop 128x128")


def last_wave_fill(tiles):
    return tiles / (math.ceil(tiles / SMS) * SMS)


@pytest.mark.parametrize("m,n,k", [(4608, 3072, 8000), (6000, 8192, 4096), (3000, 7000, 5000)])
def test_rule_for_large_plain_problems(choice, m, n, k):
    """Unlisted plain problems with 1024+ rows and a wave of 128x256 tiles: 128x256, unless 192x192 tiles fill their
    last wave by more than 2 points more; gated ones the same kernel (its epilogue reads the residual)."""
    big = math.ceil(m / 128) * math.ceil(n / 256)
    square = math.ceil(m / 192) * math.ceil(n / 192)
    want = "wgmma 192x192" if last_wave_fill(square) > last_wave_fill(big) + 0.02 else "wgmma 128x256"
    assert choice(m, n, k).startswith(want)
    assert choice(m, n, k, gated=True) == choice(m, n, k)


def test_rule_both_tilings_are_reached(choice):
    assert choice(4608, 3072, 8000).startswith("wgmma 192x192")  # 432 tiles of 128x256: a 3.3-wave tail
    assert choice(6000, 8192, 4096).startswith("wgmma 128x256")


def test_rule_for_narrow_and_small_problems(choice):
    """N in whole 160-column tiles (up to 1280): the hand-written 128x160, gated or not; few rows with short K:
    ping-pong 128x128."""
    assert choice(3000, 1280, 3000).startswith("wgmma 128x160 c2x1")
    assert choice(3000, 1280, 3000, gated=True).startswith("wgmma 128x160 c2x1")
    assert choice(512, 6144, 2048).startswith("pingpong 128x128")


@pytest.fixture(scope="module")
def band_rows(sm90_lib):
    def band(m, n, k, tile_m, tile_n, cluster_m=2, cluster_n=1, l2=H100_L2):
        block_m, block_n = tile_m * cluster_m, tile_n * cluster_n
        wave = SMS // (cluster_m * cluster_n)  # one CTA an SM
        return sm90_lib.fdm_gemm_sm90_wgmma_band_rows(math.ceil(m / block_m), math.ceil(n / block_n), block_m,
                                                      block_n, wave, k, l2)

    return band


def test_wgmma_band_rows(band_rows):
    """The hand-written kernels' tile walk (session 17, H100): bands of one cluster row where their first wave's
    inputs fit in the L2 and are at most 1.5x those of the least-reading band (one-wave and few-wave SDXL grids,
    FLUX's 3072 -> 3072), else the least-reading band, taller on ties."""
    assert band_rows(2048, 1280, 5120, 128, 160) == 1  # SDXL 32x32 ff down: one wave, every band reads the same
    assert band_rows(8192, 640, 640, 128, 160) == 1  # SDXL 64x64 attention projections: two waves
    assert band_rows(2048, 3840, 1280, 128, 160) == 1  # SDXL 32x32 qkv: 1.3x the least
    assert band_rows(8192, 5120, 640, 128, 256) == 1  # SDXL 64x64 ff up: 1.4x the least
    assert band_rows(4608, 3072, 3072, 192, 192) == 1  # FLUX attention out: 1.04x, 29 MiB
    assert band_rows(4608, 9216, 3072, 128, 256) == 8  # FLUX qkv: one-row bands read 2.2x
    assert band_rows(2048, 10240, 1280, 128, 256) == 8  # SDXL 32x32 ff up: 2.5x
    assert band_rows(27280, 14336, 3072, 192, 192) == 8  # Wan ff up: 4 and 8 read the same, the taller wins the tie
    assert band_rows(4608, 3072, 12288, 192, 192) == 8  # FLUX mlp down: 1.04x, but 117 MiB a wave > the L2
    assert band_rows(4608, 3072, 12288, 192, 192, l2=1024) == 1  # ... which a (hypothetical) 1 GiB L2 would hold
    assert band_rows(100, 100, 64, 128, 160) == 1  # one cluster: nothing to choose
