"""Bit packing round-trips exactly and really stores `bits` per code."""
import pytest
import torch

from dmquant.packing import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 5, 8, 333])
def test_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_int4_layout_two_per_byte_low_nibble_first():
    codes = torch.tensor([0x1, 0xF, 0x7, 0x0, 0xA], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [0xF1, 0x07, 0x0A]


def test_int3_bitstream_lsb_first():
    codes = torch.tensor([0b101, 0b011, 0b110], dtype=torch.uint8)  # bits: 101 110 011 -> LSB first
    stream = 0b101 | (0b011 << 3) | (0b110 << 6)
    assert pack(codes, 3).tolist() == [stream & 0xFF, stream >> 8]


def test_errors():
    with pytest.raises(ValueError, match="fit"):
        pack(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="expected"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 10)
    with pytest.raises(ValueError, match="1-8"):
        pack(torch.zeros(2, dtype=torch.uint8), 9)
