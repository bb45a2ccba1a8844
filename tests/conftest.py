"""Shared fixtures: tiny denoisers of each family with random weights, built offline from configs."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: on a shared 2-core machine OpenMP threads stall whenever another process holds
# a core (a 3 us elementwise op took 12 ms with two threads); results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch's inductor cache is not keyed by ATEN_CPU_CAPABILITY: kernels compiled on the default path came
# back with garbage outputs under ATEN_CPU_CAPABILITY=avx2 (tests/test_compile.py); one cache per path.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_dmquant_{os.environ.get('ATEN_CPU_CAPABILITY') or 'native'}"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def accelerate_launch():
    """`accelerate launch` on CPU with `n` processes, on a free port: tests run in parallel (pytest-xdist),
    and two launches on the default port would meet in one process group."""
    import socket
    import sys

    def command(n: int) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(n),
                "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    return command


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def _pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=32, caption_channels=24, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    )


def _latte():
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        sample_size=8, num_layers=1, attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=32, caption_channels=24, patch_size=2, video_length=3,
    )


def _inputs(family, batch=2):
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([10, 700][:batch])
    if family == "unet":
        return (torch.randn(batch, 4, 8, 8, generator=g),), dict(
            timestep=t, encoder_hidden_states=torch.randn(batch, 5, 32, generator=g))
    text = torch.randn(batch, 5, 24, generator=g)
    if family == "pixart":
        return (torch.randn(batch, 4, 8, 8, generator=g),), dict(
            encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return (torch.randn(batch, 4, 3, 8, 8, generator=g),), dict(
        encoder_hidden_states=text, timestep=t, enable_temporal_attentions=True)


BUILDERS = {"unet": _unet, "pixart": _pixart, "latte": _latte}


@pytest.fixture(params=list(BUILDERS))
def denoiser(request):
    """(family, model in eval mode, run(model) -> output tensor) for each family."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    args, kwargs = _inputs(request.param)

    def run(m):
        with torch.no_grad():
            return m(*args, **kwargs, return_dict=False)[0]

    return request.param, model, run


@pytest.fixture
def full_grid_kernels():
    """Skip unless the CPU int8 kernels run the full 8-bit grid the fake-quant reference uses: without
    VNNI they saturate int16 pair sums there and the library falls back to a 7-bit grid."""
    from dmquant.kernels import available_backends
    from dmquant.kernels.cpu import vnni_available

    if "fbgemm" not in available_backends() or not vnni_available():
        pytest.skip("needs CPU int8 kernels on the full 8-bit grid (VNNI)")


@pytest.fixture
def decode_gemm(monkeypatch):
    """Weight-only layers on torch's packed kernels or the decode-GEMM, as on CPUs without AVX512-FP16
    (where dmquant's fp16 kernel would otherwise take their 4-bit linears)."""
    from dmquant.kernels import weight_only

    monkeypatch.setattr(weight_only, "f16_fits", lambda layer: False)
