"""Pipelines layer: procedural data, offline tokenizers, tiny pipelines of every family, load/generate,
the judge, the training script, and quantize + save/load on whole pipelines."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmquant
from dmquant.pipelines import (
    available,
    build_tiny_pipeline,
    family_of,
    generate,
    judge,
    load,
    make_images,
    make_videos,
    miniature_prompts,
    parse_prompt,
)
from dmquant.pipelines.data import COLOURS
from dmquant.pipelines.miniature import NAMES, WEIGHTS
from dmquant.pipelines.tokenizers import clip_tokenizer, t5_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["sd", "sdxl", "pixart", "sd3", "flux", "latte", "cogvideox", "wan"]
VIDEO_KW = {f: dict(num_frames=9, height=16, width=16, max_sequence_length=16) for f in ("cogvideox", "wan")}


def test_data_is_deterministic_and_labels_match_prompts():
    a, b = make_images(64, seed=3), make_images(64, seed=3)
    assert torch.equal(a.pixels, b.pixels) and a.prompts == b.prompts
    assert not torch.equal(a.pixels, make_images(64, seed=4).pixels)
    for batch in (a, make_videos(16, seed=1)):
        assert batch.pixels.min() >= 0 and batch.pixels.max() <= 1
        for i, p in enumerate(batch.prompts):
            assert parse_prompt(p) == {k: int(v[i]) for k, v in batch.labels.items()}
    v = make_videos(8, seed=2)
    assert v.pixels.shape == (8, 8, 3, 32, 32) and "moving" in v.prompts[0]


def test_masks_cover_exactly_the_painted_shape():
    """The masks the VAE loss weights by are where the caption's colour was painted, nowhere else."""
    colours = torch.tensor(list(COLOURS.values()))
    for batch in (make_images(32, seed=5), make_videos(6, seed=5)):
        rgb = colours[batch.labels["colour"]]
        pixels = batch.pixels if batch.pixels.dim() == 5 else batch.pixels.unsqueeze(1)
        masks = batch.masks if batch.masks.dim() == 4 else batch.masks.unsqueeze(1)
        painted = (pixels == rgb.view(-1, 1, 3, 1, 1)).all(2)
        assert torch.equal(painted, masks) and masks.flatten(1).sum(1).min() > 20


def test_sharpening_the_decoder_keeps_the_latent_space():
    """Only decoder weights move, so denoisers trained on the old latents stay valid."""
    from diffusers import AutoencoderKL

    from dmquant.pipelines.miniature import VAE
    from dmquant.pipelines.training import sharpen_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    sharpen_decoder(vae, steps=2, batch=4)
    after = vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved), sorted(moved)[:5]
    assert all(p.requires_grad for p in vae.parameters())


@torch.no_grad()
def test_inflated_latte_is_the_image_dit_frame_by_frame():
    """After `inflate`, Latte's temporal blocks are identities: with the fixed temporal position
    embedding removed, every frame's prediction is PixArt's on that frame (text mask-free, as
    LattePipeline calls it), with or without temporal attention; the unused sigma half is 0."""
    from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel

    from dmquant.pipelines.miniature import LATTE, PIXART
    from dmquant.pipelines.training import inflate

    torch.manual_seed(0)
    image, video = PixArtTransformer2DModel(**PIXART).eval(), LatteTransformer3DModel(**LATTE).eval()
    inflate(video, image)
    video.temp_pos_embed.zero_()
    x, t, emb = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 700]), torch.randn(2, 7, 64)
    for temporal in (False, True):
        out = video(x, encoder_hidden_states=emb, timestep=t, enable_temporal_attentions=temporal).sample
        assert torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:]))
        for f in range(8):
            ref = image(x[:, :, f], encoder_hidden_states=emb, timestep=t,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            torch.testing.assert_close(out[:, :4, f], ref, atol=1e-5, rtol=1e-4)


def test_shifted_timesteps_follow_their_cdf():
    """Shift s maps u ~ U(0, 1) to s*u / (1 + (s-1)*u), so P(t/T <= x) = x / (s - (s-1)*x); shift 1
    stays the plain integer draw (the committed rounds depend on it)."""
    from dmquant.pipelines.training import sample_timesteps

    n, total = 200_000, 1000
    plain = sample_timesteps(n, total, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randint(0, total, (n,), generator=torch.Generator().manual_seed(0)))
    for shift in (3.0, 8.0):
        t = sample_timesteps(n, total, shift, torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() <= total - 1
        for x in (0.1, 0.5, 0.9):
            cdf = x / (shift - (shift - 1) * x)
            assert abs((t < x * total).double().mean().item() - cdf) < 0.005, (shift, x)


def test_shape_weighted_loss_against_loops():
    """Latent masks set a cell where any of its 4x4 pixels is set; the weighted mean equals a float64
    loop over elements, and weight 0 is the plain MSE."""
    from dmquant.pipelines.training import latent_masks, shape_weighted_mean

    masks = make_videos(3, seed=7).masks  # (3, 8, 32, 32)
    cells = latent_masks(masks, 8)
    assert cells.shape == (3, 8, 8, 8)
    for n, f, i, j in torch.cartesian_prod(*(torch.arange(s) for s in cells.shape)).tolist():
        assert bool(cells[n, f, i, j]) == bool(masks[n, f, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any())
    assert cells.any() and not cells.all()
    err = torch.randn(3, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = err**2
    num = den = 0.0
    for index in torch.cartesian_prod(*(torch.arange(s) for s in loss.shape)).tolist():
        n, _, f, i, j = index
        w = 1 + 5.0 * float(cells[n, f, i, j])
        num, den = num + w * float(loss[tuple(index)]), den + w
    assert abs(shape_weighted_mean(loss, cells, 5.0).item() - num / den) < 1e-6
    torch.testing.assert_close(shape_weighted_mean(loss, cells, 0.0), torch.nn.functional.mse_loss(err, 0 * err))


@torch.no_grad()
def test_seed_words_make_the_new_word_read_as_the_old():
    """After seeding up <- top, a caption with "up" encodes exactly as the one with "top"; other words
    keep their embeddings; multi-token words are refused."""
    from dmquant.pipelines.miniature import build_components
    from dmquant.pipelines.training import seed_words, text_embeddings

    torch.manual_seed(0)
    parts = build_components("miniature-latte")
    parts["text_encoder"].eval()  # no dropout
    before = parts["text_encoder"].get_input_embeddings().weight.clone()
    encode = lambda p: text_embeddings(parts, [p], video=True)[0]  # noqa: E731
    assert not torch.equal(encode("a red circle moving up"), encode("a red circle moving top"))
    seed_words(parts, {"up": "top"})
    assert torch.equal(encode("a red circle moving up"), encode("a red circle moving top"))
    changed = (parts["text_encoder"].get_input_embeddings().weight != before).any(1).nonzero().flatten().tolist()
    assert changed == parts["tokenizer"]("up", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="single tokens"):
        seed_words(parts, {"upwards": "top"})

def test_offline_tokenizers_roundtrip(tmp_path):
    for tok in (clip_tokenizer(), t5_tokenizer()):
        ids = tok("a red circle at the top left")["input_ids"]
        assert len(ids) <= 9  # one token per word (+ specials)
        tok.save_pretrained(tmp_path / type(tok).__name__)
        again = type(tok).from_pretrained(tmp_path / type(tok).__name__)
        assert again("a red circle at the top left")["input_ids"] == ids


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_runs_two_steps_through_generate(family):
    pipe = build_tiny_pipeline(family)
    assert family_of(pipe).name == family
    out = generate(pipe, ["a red circle", "a blue square"], seed=0, steps=2, progress=False,
                   **VIDEO_KW.get(family, {}))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert out.dim() == (5 if family_of(pipe).is_video else 4) and out.shape[0] == 2


@pytest.mark.parametrize("family", ["pixart", "latte", "sd"])
def test_generate_is_independent_of_batching(family):
    pipe = load(f"tiny-{family}")
    prompts = ["a red circle at the top", "a blue square moving up", "a green cross"]
    full = generate(pipe, prompts, seed=5, steps=2, batch_size=2, progress=False)
    shard = generate(pipe, prompts[1:], seed=5, steps=2, batch_size=1, start_index=1, progress=False)
    assert torch.allclose(full[1:], shard, atol=1e-5)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load("someone/not-in-cache")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline class"):
        load(tmp_path)
    assert set(NAMES) <= set(available())


def test_judge_on_real_procedural_samples():
    """The committed judges classify held-out procedural data (seed far from training seeds)."""
    images = make_images(300, seed=123)
    acc = judge("image").adherence(images.pixels, images.prompts)
    assert min(acc.values()) > 0.95, acc
    videos = make_videos(120, seed=123)
    vacc = judge("video").adherence(videos.pixels, videos.prompts)
    assert vacc["colour"] > 0.95 and vacc["direction"] > 0.95 and vacc["shape"] > 0.8, vacc
    assert judge("image").features(images.pixels[:5]).shape == (5, 128)


@pytest.mark.parametrize("name", NAMES)
def test_miniature_loads_and_follows_prompts(name):
    if not (WEIGHTS / name / "model_index.json").is_file():
        pytest.fail(f"{name} weights are missing: run scripts/train_miniatures.py --only {name}")
    pipe = load(name)
    prompts = miniature_prompts(name, 8)
    out = generate(pipe, prompts, seed=0, steps=10, progress=False)
    acc = judge(name).adherence(out, prompts)
    # every attribute far above chance (shape and direction 1/4, colour 1/6, position 1/9) even at 10
    # steps and 8 samples (measured: at least 7 of 8 right on each)
    assert min(acc.values()) > 0.5, acc


def test_training_script_smoke(tmp_path):
    """A few steps of every stage, so the reproduction script keeps working."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train_miniatures.py"), "--steps-scale", "0.002",
           "--num-samples", "32", "--out", str(tmp_path), "--threads", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    for name in NAMES:
        assert (tmp_path / name / "model_index.json").is_file()
    pipe = load(tmp_path / "miniature-sd")
    assert generate(pipe, ["a red circle"], steps=2, progress=False).shape == (1, 3, 32, 32)


def test_prompt_sensitivity_script():
    """Swapping one attribute changes only that attribute; the script prints a row per attribute."""
    script = ROOT / "scripts" / "prompt_sensitivity.py"
    spec = importlib.util.spec_from_file_location("prompt_sensitivity", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for prompt in make_images(40, seed=1).prompts + make_videos(8).prompts:
        labels = parse_prompt(prompt)
        for attribute in labels:
            swapped = parse_prompt(module.swap(prompt, attribute))
            assert swapped.keys() == labels.keys() and swapped[attribute] != labels[attribute], prompt
            assert all(swapped[k] == v for k, v in labels.items() if k != attribute), prompt
    out = subprocess.run([sys.executable, str(script), "--pipeline", "miniature-sd", "--num-samples", "2",
                          "--timesteps", "500"], capture_output=True, text=True, check=True, timeout=300).stdout
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| ") and "swapped" not in line}
    assert rows.keys() == {"shape", "colour", "position", "(empty prompt)"} and min(rows.values()) > 0, rows


@pytest.mark.parametrize("family,recipe", [("sd", "w8a8-all"), ("pixart", "w4a8"), ("latte", "w8a8-attn")])
def test_quantized_pipeline_save_load_bitwise(family, recipe, tmp_path):
    pipe = dmquant.quantize(load(f"tiny-{family}"), recipe)
    prompts = ["a red circle at the top", "a blue square moving up"]
    before = generate(pipe, prompts, seed=1, steps=2, progress=False)
    dmquant.save_quantized(pipe, tmp_path / "q")
    again = generate(load(tmp_path / "q"), prompts, seed=1, steps=2, progress=False)
    assert torch.equal(before, again)
    assert type(load(tmp_path / "q")).__name__ == type(pipe).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_family_table_matches_the_real_classes(family):
    """The per-family data (denoiser class and attribute, conditioning kwargs, FP-kept layers) is
    checked against the actual diffusers classes, so the table cannot drift from the code it describes."""
    import inspect
    import re

    pipe = build_tiny_pipeline(family)
    fam = family_of(pipe)
    denoiser = getattr(pipe, fam.denoiser)
    assert type(denoiser).__name__ == fam.denoiser_class and family_of(fam.denoiser_class).denoiser == fam.denoiser
    params = inspect.signature(denoiser.forward).parameters
    assert {fam.timestep_kwarg, fam.text_kwarg, *fam.extra_conditioning} <= set(params)
    names = [n for n, _ in denoiser.named_modules() if n]
    for pattern in fam.skip_patterns:  # every pattern names something real
        assert any(re.search(pattern, n) for n in names), (family, pattern)
    # the family's own roles keep exactly the layers the core's generic default keeps
    layers = [n for n, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))]
    own, generic = dmquant.filters.LayerFilter(exclude=fam.skip_patterns), dmquant.filters.LayerFilter()
    assert [n for n in layers if not own(n)] == [n for n in layers if not generic(n)]
    first_last = [n for n, _ in denoiser.named_children() if n in ("conv_in", "conv_out", "proj_out")]
    assert first_last and all(not own(n) for n in first_last)
