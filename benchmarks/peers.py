"""Peer implementation `calm-pytorch` (lucidrains, PyPI) run on the same Hugging Face models.

Its anchor and augmenting models must return a logits tensor, so each HF model is wrapped in a
module returning `.logits`; its blocks hook the same decoder layers we connect, with the same
heads and head size. Same-input composition: the augmenting model reads the sequence itself
(`prompt=seq`), as in our causal mode.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from calm import hf


def available() -> bool:
    return importlib.util.find_spec("CALM_pytorch") is not None


def version() -> str:
    from importlib.metadata import version as v

    return v("CALM-Pytorch")


class Logits(nn.Module):
    """A Hugging Face causal LM called as model(ids) -> (B, T, V) logits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def build(anchor, aug, connections):
    """calm-pytorch's CALM on our models, with our connections (it counts layers from 1)."""
    from CALM_pytorch import CALM as PeerCALM
    from CALM_pytorch import AugmentParams

    heads = hf.num_attention_heads(anchor)
    params = AugmentParams(
        model=Logits(aug),
        transformer_blocks=list(hf.decoder_layers(aug)),
        connections=tuple((c.aug_layer + 1, c.anchor_layer + 1) for c in connections),
    )
    return PeerCALM(
        Logits(anchor),
        params,
        anchor_transformer_blocks=list(hf.decoder_layers(anchor)),
        attn_kwargs=dict(
            linear_project_context=True,
            pre_rmsnorm=True,
            flash=True,
            heads=heads,
            dim_head=hf.hidden_size(anchor) // heads,
        ),
    )


def step_fn(peer, ids: torch.Tensor, lr: float = 1e-4):
    """One training step of the peer: its loss, backward, AdamW on its cross-attention blocks."""
    opt = torch.optim.AdamW(peer.parameters(), lr=lr)

    def step() -> float:
        # calm-pytorch's forward shifts seq into input and labels itself.
        loss = peer(ids, prompt=ids, anchor_llm_in_train_mode=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def randomize(peer, seed: int = 0) -> None:
    """Non-zero block weights (its output projection starts at zero, which hides any leak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / max(1, p.shape[-1]) ** 0.5)


@torch.no_grad()
def logits(peer, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) composed logits with the augmenting model reading the same ids."""
    peer.eval()
    return peer(ids, prompt=ids, return_loss=False)


@torch.no_grad()
def generate(peer, ids: torch.Tensor, new_tokens: int):
    """Its own sampler: no KV cache; the augmenting model reads only the prompt."""
    return peer.generate(ids, seq_len=ids.shape[1] + new_tokens)
