"""BOS-aware text-encoder quantization (MixDQ): the BOS token's output kept in full precision.

In a causal text encoder (CLIP) the first token attends only to itself, so its output embedding is
the same for every prompt, and it is an outlier (CLIP's BOS features are tens of times larger than
the others): quantizing the encoder moves it most. MixDQ precomputes it once in FP; here a forward
hook writes the precomputed rows over the quantized encoder's position 0 (last and, when asked for,
every hidden state), leaving the other tokens exactly as the quantized encoder computes them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def bos_states(encoder: nn.Module, tokenizer: Any, probes: tuple[str, str] = ("a photo", "an unrelated caption")
               ) -> tuple[torch.Tensor, ...]:
    """Position-0 rows of the float encoder's outputs: every hidden state (embeddings ... last layer),
    then the final `last_hidden_state`. Checked to be the same for two different prompts: a
    bidirectional encoder (T5) has no constant BOS and is refused."""
    ids = tokenizer(list(probes), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(next(encoder.parameters()).device)
    out = encoder(ids, output_hidden_states=True)
    states = tuple(h[:, 0] for h in out.hidden_states) + (out.last_hidden_state[:, 0],)
    for h in states:
        if not torch.allclose(h[0], h[1], rtol=1e-5, atol=1e-5 * float(h.abs().max())):
            raise ValueError(f"{type(encoder).__name__}: the first token's output depends on the prompt (not a causal "
                             "encoder with a BOS token): BOS-aware quantization does not apply")
    return tuple(h[0].clone() for h in states)


def attach_bos(encoder: nn.Module, states: tuple[torch.Tensor, ...]) -> Any:
    """Forward hook: position 0 of the encoder's outputs replaced by the FP rows. Returns the handle."""

    def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
        last = output[0].clone()
        last[:, 0] = states[-1].to(last.dtype)
        output["last_hidden_state"] = last
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            patched = []
            for h, row in zip(hidden, states[:-1]):
                h = h.clone()
                h[:, 0] = row.to(h.dtype)
                patched.append(h)
            output["hidden_states"] = tuple(patched)
        return output

    return encoder.register_forward_hook(hook)
