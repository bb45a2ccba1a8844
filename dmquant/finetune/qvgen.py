"""QVGen (Huang et al. 2025) as the recipe step `qvgen`: an auxiliary branch that helps training
converge, then decays to rank 0 so inference pays nothing for it.

Each weight-quantized layer computes Q(W + s B A) x_q + aux(x_q) while it trains: the QALoRA of
`dmquant.finetune.qalora` plus a high-precision low-rank auxiliary branch (the branch reads the quantized
input, i.e. it is a full-precision weight added after the quantizer). Training runs in stages; at each
stage boundary the branch is re-factorised by SVD and cut to `decay` times its rank (keeping the largest
singular directions, where its contribution lives), down to 0 for the last stage, which trains without
it so the LoRA absorbs what it did. Within a stage a rank regulariser, `gamma` times the energy of the
rank-one components the next cut removes, shrinks them beforehand so the cut barely moves the outputs.
QVGen trains the full weights; the LoRA here keeps the float weights as the teacher (parameter-efficient).
Ranks are switched off by a mask, so parameter shapes (optimizer state, checkpoints) never change; a
cut resets the branch's Adam moments (its factors changed basis).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .adapters import LayerAdapters
from .distill import DistillConfig, DistillResult, Schedule
from .qalora import finetune_layers, weight_quantized_layers

log = logging.getLogger(__name__)


def decay_ranks(rank: int, decay: float) -> list[int]:
    """Ranks of the successive stages: rank, then repeatedly x decay (floored, strictly decreasing), 0."""
    if not 0 < decay < 1:
        raise ValueError(f"qvgen: decay must be in (0, 1), got {decay}")
    ranks = [rank]
    while ranks[-1] > 0:
        ranks.append(min(ranks[-1] - 1, int(ranks[-1] * decay)))
    return ranks


class RankDecay(Schedule):
    """Stage boundaries, SVD cuts and the rank regulariser for the auxiliary branches."""

    def __init__(self, adapters: dict[str, LayerAdapters], cfg: DistillConfig, decay: float, gamma: float) -> None:
        self.aux = [a.aux for a in adapters.values() if a.aux is not None]
        self.ranks = decay_ranks(self.aux[0].mask.numel(), decay) if self.aux else [0]
        self.iters, self.gamma = cfg.iters, gamma
        self.cuts: list[tuple[int, int]] = []  # (step, rank) of every cut made, for the report

    def target(self, step: int) -> int:
        stages = len(self.ranks)
        return self.ranks[min(stages - 1, step * stages // max(self.iters, 1))]

    @torch.no_grad()
    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        rank = self.target(step)
        for aux in self.aux:
            if aux.rank <= rank:
                continue
            u, s, vh = torch.linalg.svd(((aux.up * aux.mask) @ aux.down).double(), full_matrices=False)
            root = s[:rank].sqrt()
            aux.up.zero_()[:, :rank] = (u[:, :rank] * root).to(aux.up.dtype)
            aux.down.zero_()[:rank] = (root[:, None] * vh[:rank]).to(aux.down.dtype)
            aux.mask.zero_()[:rank] = 1
            optimizer.state.pop(aux.up, None)
            optimizer.state.pop(aux.down, None)
        if self.aux and (not self.cuts or self.cuts[-1][1] != rank):
            self.cuts.append((step, rank))
            log.info("qvgen: auxiliary branches at rank %d from step %d", rank, step)

    def penalty(self, step: int) -> torch.Tensor | None:
        current = self.target(step)
        if self.gamma == 0 or not self.aux or current == 0:
            return None
        nxt = self.ranks[self.ranks.index(current) + 1]  # what the next cut keeps
        # energy of each rank-one component k of the tail: |u_k|^2 |d_k|^2 (per weight element)
        terms = [((a.up[:, nxt:] * a.mask[nxt:]).pow(2).sum(0) * a.down[nxt:].pow(2).sum(1)).sum() / a.up.shape[0]
                 / a.down.shape[1] for a in self.aux]
        return self.gamma * torch.stack(terms).mean()


def apply_qvgen(modules: list[nn.Module], run: Any, rank: int = 8, aux_rank: int = 8, decay: float = 0.5,
                gamma: float = 1e-2, lsq: bool = True, scale_aware: bool = True, **loop: Any) -> DistillResult:
    """Recipe step `qvgen`: QALoRA of `rank` plus an auxiliary branch of `aux_rank` on every
    weight-quantized denoiser layer, decayed by `decay` per stage to 0 with regulariser weight `gamma`;
    `lsq`: temporal step sizes. Loop arguments: `dmquant.finetune.DistillConfig`.

    >>> dmquant.quantize(pipe, "qvgen-w4a4")   # designed for video (Latte)
    """
    if aux_rank < 1:
        raise ValueError("qvgen: aux_rank must be >= 1 (use the efficientdm step for no auxiliary branch)")
    schedules: list[RankDecay] = []

    def schedule_for(adapters: dict[str, LayerAdapters], cfg: DistillConfig) -> RankDecay:
        schedules.append(RankDecay(adapters, cfg, decay, gamma))
        return schedules[-1]

    result = finetune_layers(modules, run, "qvgen", lambda d, _: weight_quantized_layers(d), rank, lsq,
                             scale_aware, aux_rank=aux_rank, schedule_for=schedule_for, **loop)
    result.notes.update(rank_cuts=schedules[0].cuts, aux_rank=aux_rank)
    return result
