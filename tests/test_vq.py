"""VQ4DiT vector quantization: k-means, the calibrated assignments and the recipe step, against
float64 references (Lloyd's fixed-point conditions, brute-force nearest codewords, tr(E H E^T))."""
import copy
import math

import pytest
import torch

import dmquant
from dmquant.algorithms.vq import from_subvectors, kmeans, to_subvectors, vector_quantize
from dmquant.config import QuantSpec, Recipe, Step
from dmquant.primitives import choose_qparams, fake_quantize, sqnr_db
from dmquant.recipes import get_recipe


def _rel_error(w_hat, w, h):
    e = (w_hat - w).double()
    return float(torch.trace(e @ h.double() @ e.T) / torch.trace(w.double() @ h.double() @ w.double().T))


def _layer(seed=0, out=64, n_in=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.05
    x = torch.randn(1500, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) * 0.3 + torch.eye(n_in))
    x[:, :4] *= 8  # a few loud input channels, as activations of diffusion models have
    return w, 2 * x.T @ x / x.shape[0]


def test_kmeans_reaches_a_lloyd_fixed_point():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(1))
    c, labels = kmeans(x, 7)
    x64, c64 = x.double(), c.double()
    nearest = torch.cdist(x64, c64).argmin(1)
    assert torch.equal(labels, nearest)  # every point sits with its nearest centroid
    for j in labels.unique():
        assert torch.allclose(c64[j], x64[labels == j].mean(0), atol=1e-5)  # every centroid is its members' mean


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(20, 0) + 0.01 * torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    c, labels = kmeans(x, 3)
    assert torch.allclose(c[torch.cdist(centres, c).argmin(1)], centres, atol=0.01)
    assert all(len(labels[i * 20:(i + 1) * 20].unique()) == 1 for i in range(3))


@pytest.mark.parametrize("bits,dim", [(2, 4), (3, 2)])
def test_vector_quantize_decodes_its_codes_and_reports_its_error(bits, dim):
    w, h = _layer()
    r = vector_quantize(w, h, bits, dim, iters=60)
    assert r.codebook.shape == (2 ** (bits * dim), dim)
    assert r.codes.shape == (64, 64 // dim) and int(r.codes.max()) < 2 ** (bits * dim)
    decoded = torch.stack([torch.cat([r.codebook[int(c)] for c in row]) for row in r.codes])  # loop reference
    assert torch.equal(r.weight, decoded)
    assert r.loss == pytest.approx(_rel_error(r.weight, w, h), rel=1e-3)
    assert r.loss <= r.kmeans_loss  # the calibrated assignments are kept only when they help


def test_kmeans_only_assignments_are_nearest_codewords():
    w, _ = _layer(seed=2)
    r = vector_quantize(w, None, 2, 4, iters=0)
    sub = to_subvectors(w, 4).reshape(-1, 4).double()
    brute = torch.stack([((r.codebook.double() - s) ** 2).sum(1).argmin() for s in sub])
    assert torch.equal(r.codes.reshape(-1), brute)


def test_calibrated_vq_beats_rtn_int2_on_the_layer_output():
    w, h = _layer(seed=3)
    r = vector_quantize(w, h, 2, 4, iters=200)
    spec = QuantSpec("int2", "group:64")
    rtn = fake_quantize(w, spec.fmt, spec.gran, choose_qparams(w, spec.fmt, spec.gran))
    gain_db = 10 * torch.log10(torch.tensor(_rel_error(rtn, w, h) / r.loss)).item()
    assert gain_db > 5, gain_db  # measured about 10 dB
    assert r.loss < r.kmeans_loss * 0.9  # calibration itself helps (measured ~2-3 dB)


def test_subvector_padding_round_trips_and_errors():
    w = torch.randn(5, 7)
    assert torch.equal(from_subvectors(to_subvectors(w, 4), 7), w)
    with pytest.raises(ValueError, match="too large"):
        vector_quantize(w, None, 3, 8)
    with pytest.raises(ValueError, match="2-D weight"):
        vector_quantize(torch.randn(2, 3, 4), None)


def test_vq4dit_recipe_on_tiny_pixart(tmp_path):
    from conftest import BUILDERS, _inputs

    torch.manual_seed(0)
    model = BUILDERS["pixart"]().eval()
    args, kwargs = _inputs("pixart")
    with torch.no_grad():
        ref = model(*args, **kwargs, return_dict=False)[0]
    calib = lambda m: m(*args, **kwargs)  # noqa: E731
    fast = get_recipe("vq4dit-w2a16")
    fast = fast.replace(steps=(Step("vq", {"bits": 2, "dim": 4, "iters": 40}),))
    vq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    dmquant.quantize(vq, fast, calibration=calib)
    dmquant.quantize(rtn, Recipe(name="w2a16-g64", weight=QuantSpec("int2", "group:64")))
    layers = [m for m in vq.modules() if hasattr(m, "weight_quantizer") and hasattr(m, "qname")]
    assert layers and all(m.weight_quantizer is None and m.is_vq for m in layers)
    # serving form: no float weight left, a 256-entry codebook and one byte per 4 weights (2 bits each)
    layer = layers[0]
    assert "weight" not in dict(layer.named_parameters()) and layer.vq_codebook.shape == (256, 4)
    assert layer.vq_packed.numel() == layer.weight_shape[0] * -(-math.prod(layer.weight_shape[1:]) // 4)
    w = layer.weight.detach()
    assert to_subvectors(w.reshape(w.shape[0], -1), 4).reshape(-1, 4).unique(dim=0).shape[0] <= 256
    assert all(any(torch.equal(v, c) for c in layer.vq_codebook) for v in to_subvectors(w.reshape(w.shape[0], -1), 4)[0])
    with torch.no_grad():
        s_vq = sqnr_db(ref, vq(*args, **kwargs, return_dict=False)[0])
        s_rtn = sqnr_db(ref, rtn(*args, **kwargs, return_dict=False)[0])
    assert s_vq > s_rtn + 3, (s_vq, s_rtn)
    dmquant.save_quantized(vq, tmp_path / "vq")  # packed save, bitwise load onto a float skeleton
    loaded = dmquant.load_quantized(tmp_path / "vq", model=BUILDERS["pixart"]().eval())
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs, return_dict=False)[0], vq(*args, **kwargs, return_dict=False)[0])
    assert all(m.is_vq for m in loaded.modules() if hasattr(m, "qname"))


@pytest.mark.parametrize("bits", [1, 7, 8, 12, 16, 24])
def test_wide_index_packing_round_trips_densely(bits):
    from dmquant.packing import pack_indices, packed_nbytes, unpack_indices

    g = torch.Generator().manual_seed(bits)
    idx = torch.randint(0, 2**bits, (1001,), generator=g)
    idx[0], idx[1] = 0, 2**bits - 1
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(1001, bits)
    assert torch.equal(unpack_indices(packed, bits, 1001), idx)
    stream = "".join(format(int(b), "08b")[::-1] for b in packed)  # LSB first, by hand
    assert int(stream[bits:2 * bits][::-1], 2) == int(idx[1])
    with pytest.raises(ValueError, match="do not fit"):
        pack_indices(torch.tensor([2**bits]), bits)
