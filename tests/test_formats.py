"""Every registered format against a brute-force float64 reference (nearest value, ties to even)."""
import math

import pytest
import torch

from dmquant.formats import BlockFormat, FloatFormat, IntFormat, get_format, list_formats
from reference import adversarial_inputs, nearest_on_grid

ALL = list_formats()


@pytest.mark.parametrize("name", ALL)
def test_round_matches_brute_force(name):
    fmt = get_format(name)
    torch.manual_seed(0)
    scale = fmt.max_value
    x = torch.cat([adversarial_inputs(fmt), torch.randn(2000) * scale / 2, torch.randn(200) * scale * 3])
    got = fmt.round(x)
    ref = nearest_on_grid(x, fmt).float()
    assert torch.equal(got, ref), name
    if not isinstance(fmt, IntFormat):  # minifloats have a negative zero and must keep its sign
        assert torch.equal(torch.signbit(got), torch.signbit(ref))


@pytest.mark.parametrize("name", ALL)
def test_nan_propagates(name):
    assert torch.isnan(get_format(name).round(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("name", ALL)
def test_encode_decode_roundtrip(name):
    fmt = get_format(name)
    grid = fmt.grid().float()
    codes = fmt.encode(grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**fmt.bits
    assert torch.equal(fmt.decode(codes), grid)
    neg_zero = fmt.decode(fmt.encode(torch.tensor([-0.0])))
    has_neg_zero = not isinstance(fmt, IntFormat)
    assert neg_zero.item() == 0 and torch.signbit(neg_zero).item() == has_neg_zero


@pytest.mark.parametrize("name,maximum,count", [
    ("fp8_e4m3", 448.0, 253), ("fp8_e5m2", 57344.0, 247), ("fp6_e3m2", 28.0, 63),
    ("fp6_e2m3", 7.5, 63), ("fp4_e2m1", 6.0, 15), ("int4", 7, 16), ("uint4", 15, 16), ("int2", 1, 4),
])
def test_published_ranges(name, maximum, count):
    """Max values from the OCP FP8 / MX specifications; value counts exclude inf/NaN, -0 == +0."""
    fmt = get_format(name)
    assert fmt.max_value == maximum and fmt.grid().numel() == count


def test_minifloat_subnormals_match_spec():
    e4m3 = get_format("fp8_e4m3")
    pos = e4m3.grid()[e4m3.grid() > 0]
    assert pos.min().item() == 2.0**-9  # smallest subnormal: 2^(1-7) * 2^-3
    assert (pos[:7] == torch.arange(1, 8, dtype=torch.float64) * 2.0**-9).all()
    e2m1 = get_format("fp4_e2m1").grid()
    assert e2m1.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_e4m3_matches_torch_float8():
    """torch's own float8_e4m3fn cast is a second independent reference (RNE, finite values)."""
    x = torch.randn(5000) * 100
    x = x.clamp(-448, 448)
    assert torch.equal(get_format("fp8_e4m3").round(x), x.to(torch.float8_e4m3fn).float())
    y = torch.randn(5000) * 1000
    assert torch.equal(get_format("fp8_e5m2").round(y), y.to(torch.float8_e5m2).float())


def test_registry_types_and_errors():
    assert isinstance(get_format("int8"), IntFormat)
    assert isinstance(get_format("fp8"), FloatFormat)  # alias
    nv = get_format("nvfp4")
    assert isinstance(nv, BlockFormat) and nv.block_size == 16 and nv.tensor_scale
    assert get_format("mxfp4").block_size == 32 and get_format("mxfp4").scale_kind == "e8m0"
    with pytest.raises(ValueError, match="bits out of range"):
        get_format("int9")
    with pytest.raises(ValueError, match="bits out of range"):
        get_format("int1")
    with pytest.raises(ValueError, match="unknown format"):
        get_format("fp7_e9")


def test_int_grid_is_twos_complement():
    t = get_format("int3").decode_table()
    assert t.tolist() == [0, 1, 2, 3, -4, -3, -2, -1]
    assert math.isclose(get_format("int8").max_value, 127)
