"""The judge: a small CNN trained on the procedural generators, committed with the miniatures.

Its accuracy on generated samples is an offline stand-in for CLIP score (prompt adherence: shape,
colour, position, motion direction) and its penultimate features give an offline Fréchet distance.
Trained with blur/noise/brightness augmentation so that imperfect generations are still judged on
what they show rather than on how sharp they are.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import COLOURS, DIRECTIONS, POSITIONS, SHAPES, make_images, make_videos, parse_prompt
from .miniature import FRAMES, WEIGHTS

HEADS = {"image": {"shape": len(SHAPES), "colour": len(COLOURS), "position": len(POSITIONS)},
         "video": {"shape": len(SHAPES), "colour": len(COLOURS), "direction": len(DIRECTIONS)}}
FEATURES = 128


class Judge(nn.Module):
    """Classifier over images (N,3,32,32) or videos (N,F,3,32,32), values in [0, 1]."""

    def __init__(self, kind: str = "image") -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"judge kind must be 'image' or 'video', got {kind!r}")
        self.kind = kind
        c_in = 3 if kind == "image" else 3 * FRAMES  # video: frames stacked as channels
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())  # noqa: E731
        self.body = nn.Sequential(block(c_in, 32), block(32, 32), nn.AvgPool2d(2), block(32, 64), nn.AvgPool2d(2),
                                  block(64, 128), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(512, FEATURES),
                                  nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, n) for k, n in HEADS[kind].items()})

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "video":
            if x.dim() != 5:
                raise ValueError(f"video judge expects (N, F, 3, H, W), got {tuple(x.shape)}")
            x = x.flatten(1, 2)
        elif x.dim() != 4:
            raise ValueError(f"image judge expects (N, 3, H, W), got {tuple(x.shape)}")
        return x.float() * 2 - 1

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(self._prepare(x))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, 128): the embedding for Fréchet distances."""
        return torch.cat([self.body(self._prepare(c)) for c in x.split(batch_size)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [self(c) for c in x.split(256)]
        return {k: torch.cat([o[k] for o in outs]).argmax(-1) for k in self.heads}

    def adherence(self, x: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Fraction of samples whose predicted attribute matches the prompt, per attribute."""
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} samples but {len(prompts)} prompts")
        pred = self.predict(x)
        labels = [parse_prompt(p) for p in prompts]
        out = {}
        for attr in self.heads:
            pairs = [(int(pred[attr][i]), lab[attr]) for i, lab in enumerate(labels) if attr in lab]
            if pairs:
                out[attr] = sum(p == t for p, t in pairs) / len(pairs)
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "judge.safetensors"))
        (folder / "config.json").write_text(json.dumps({"kind": self.kind, "features": FEATURES}))

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        if not (folder / "judge.safetensors").is_file():
            raise FileNotFoundError(f"judge weights missing in {folder}: run scripts/train_miniatures.py --only judge")
        judge = cls(json.loads((folder / "config.json").read_text())["kind"])
        judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
        return judge.eval()


def judge(name: str = "image") -> Judge:
    """The committed judge for a miniature name ("miniature-latte" -> video) or a kind."""
    kind = "video" if name in ("video", "miniature-latte") else "image"
    return _load(kind)


@lru_cache(maxsize=2)
def _load(kind: str) -> Judge:
    return Judge.load(WEIGHTS / f"judge-{kind}")


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter, per sample (x: (N, C, H, W) in [0, 1])."""
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=g)
    x = x * (1 - mix) + blurred * mix
    x = x * (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g))
    return (x + 0.05 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_judge(kind: str, steps: int, batch: int = 128, seed: int = 0, lr: float = 2e-3) -> Judge:
    torch.manual_seed(seed)
    model = Judge(kind).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for step in (bar := tqdm(range(steps), desc=f"judge-{kind}")):
        data = make_images(batch, seed=10**6 + step) if kind == "image" else make_videos(batch, seed=10**6 + step)
        x = data.pixels
        x = _augment(x, g) if kind == "image" else _augment(x.flatten(1, 2), g).unflatten(1, (FRAMES, 3))
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], data.labels[k]) for k in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
