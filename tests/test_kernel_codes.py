"""One copy of the weight on the CPU kernels: after the first call a layer drops its packed codes and
reads them back from the kernel's layout when it needs them (saving, copying, moving, compiling).

References: the packed bytes the layer held before its first call (what quantize produced, and what
the simulated path is checked against elsewhere), and the output of a copy that keeps its codes.
"""
import copy

import pytest
import torch
from torch import nn

import dmquant
from dmquant.config import QuantSpec, Recipe
from dmquant.kernels import cpu, weight_only
from dmquant.state import quant_layers

pytestmark = pytest.mark.skipif(not cpu.onednn_available(), reason="no oneDNN int8 kernels in this build")


class Net(nn.Module):
    """A conv (2-D and 1-D) and linears: every kernel layout the int8 GEMM packs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.lin = nn.Linear(8, 48)
        self.out = nn.Linear(48, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2)  # (N, 8, HW)
        h = self.conv1(h).transpose(1, 2)  # (N, HW, 8)
        return self.out(torch.relu(self.lin(h)))


def _recipe(wbits: int, gran: str = "tensor", wgran: str = "channel") -> Recipe:
    return Recipe(name=f"w{wbits}a8", weight=QuantSpec(f"int{wbits}", wgran),
                  input=QuantSpec("int8", gran, dynamic=True))


def _held(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer._buffers["weight_packed"].clone() for n, layer in quant_layers(model).items()}


@pytest.fixture(params=[(8, "tensor"), (4, "tensor"), (8, "token"), (4, "token", "group:16")],
                ids=["w8-tensor", "w4-tensor", "w8-token", "w4-group"])
def served(request):
    """Per-token activations put the 2-D conv on the per-tap layout (and leave the grouped conv1d simulated);
    group-wise weights put the linears on one GEMM per group (48 inputs: 3 groups; 8 inputs: one short
    group) and the 2-D conv on its weight re-quantized to int8 (it keeps its own codes)."""
    torch.manual_seed(0)
    model = dmquant.quantize(Net().eval(), _recipe(*request.param), backend="cpu")
    before = _held(model)
    kept = dmquant.hold_codes(copy.deepcopy(model))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = model(x)
    return model, kept, before, x, y, request.param


def test_first_call_leaves_the_kernel_as_the_only_copy(served):
    model, kept, before, x, y, spec = served
    with torch.no_grad():
        assert torch.equal(y, kept(x)) and torch.equal(model(x), y)
    on_kernel = {n: layer._kcache[1] is not None for n, layer in quant_layers(model).items()}
    simulated = {"conv1"} if spec[1] == "token" else set()  # a grouped conv has no per-tap layout
    assert {n for n, on in on_kernel.items() if not on} == simulated
    for name, layer in quant_layers(model).items():
        if not on_kernel[name]:
            continue
        if spec[2:] == ("group:16",) and name == "conv":  # re-quantized: the kernel's codes are not the layer's
            assert torch.equal(layer._buffers["weight_packed"], before[name])
            continue
        assert layer._buffers["weight_packed"] is None and layer.is_packed, name
        assert torch.equal(layer.packed_codes(), before[name]), name  # read back bit for bit
        assert quant_layers(kept)[name]._buffers["weight_packed"] is not None, name
    state = model.state_dict()
    assert all(torch.equal(state[f"{n}.weight_packed"], b) for n, b in before.items())


def test_saving_copying_and_moving_carry_the_codes(served, tmp_path):
    model, _, before, x, y, spec = served
    dmquant.save_quantized(model, tmp_path / "q")
    loaded = dmquant.load_quantized(tmp_path / "q", model=Net().eval(), backend="cpu")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), y) and torch.equal(twin(x), y)
    model.to("cpu")  # a move takes the codes back first: they travel with the layer
    assert all(torch.equal(layer._buffers["weight_packed"], before[n]) for n, layer in quant_layers(model).items())
    with torch.no_grad():
        assert torch.equal(model(x), y)
    reloaded = Net().eval()
    dmquant.quantize(reloaded, _recipe(*spec), backend="cpu")
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x), y)


def test_compile_after_kernel_calls_asks_for_the_codes(served):
    model, *_, x, y, _ = served
    torch._dynamo.reset()
    with pytest.raises(Exception, match="hold_codes"):
        torch.compile(model, fullgraph=True, backend="eager")(x)
    dmquant.hold_codes(model)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.allclose(out, y, rtol=0, atol=0.05 * y.abs().max().item())  # simulated vs kernel path


@pytest.mark.skipif(not weight_only.int4_unpack_exact(), reason="torch packs int4 in another layout under this "
                    "CPU capability (e.g. ATEN_CPU_CAPABILITY=avx2): layers then keep their own codes (next test)")
@pytest.mark.parametrize("out,inp", [(64, 128), (128, 64), (192, 96)])
def test_int4_unpack_inverts_torchs_packing_position_by_position(out, inp):
    """Brute force: pack each bit of every element's flat index through the op itself; reading the
    nibbles back with `unpack_int4` must give every element its own index."""
    index = torch.arange(out * inp).reshape(out, inp)
    found = torch.zeros(out, inp, dtype=torch.long)
    for bit in range(int(out * inp - 1).bit_length()):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((index >> bit) & 1).to(torch.int32), 1)
        found |= weight_only.unpack_int4(packed, out, inp).long() << bit
    assert torch.equal(found, index)


@pytest.mark.skipif(not weight_only.available(), reason="no CPU weight-only kernels in this torch")
@pytest.mark.parametrize("fmt,gran,sym,out,released", [("int8", "channel", True, 64, True),
                                                       ("int4", "group:32", True, 64, True),
                                                       ("int4", "group:64", False, 128, True),
                                                       ("int4", "group:32", True, 32, False)])
def test_weight_only_layers_share_their_codes_with_the_kernel(fmt, gran, sym, out, released):
    """int8 and int4 (blocks of 64 rows) weight-only layers keep only the kernel's copy; an int4
    layer of 32 rows, or any int4 layer where torch's layout differs from the one read back (the
    round-trip check `int4_unpack_exact`), keeps its own."""
    released = released and (fmt == "int8" or weight_only.int4_unpack_exact())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, out)).to(torch.bfloat16)
    dmquant.quantize(model, Recipe(name=fmt, weight=QuantSpec(fmt, gran, symmetric=sym)), backend="cpu")
    before = _held(model)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    layer = model[0]
    assert "weight-only" in layer.kernel_name()
    assert (layer._buffers["weight_packed"] is None) == released
    assert torch.equal(layer.packed_codes(), before["0"])
    with torch.no_grad():
        assert torch.equal(model(x), y) and torch.equal(copy.deepcopy(model)(x), y)
