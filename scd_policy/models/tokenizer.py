"""Step tokeniser: one control step's inputs -> a few tokens, shared by every policy.

Per step: each vector observation (e.g. proprioception) -> 1 token through an MLP; each camera
(C, H, W) -> ``image_tokens`` tokens from a small conv encoder; optionally the previously executed
action -> 1 token (a learned "no previous action" token at an episode start). A learned embedding per
token slot tells the transformer which input a token came from. Inputs are already normalised.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scd_policy.conventions import is_policy_image


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, dividing the channel count."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Module):
    """Stride-2 conv, then a residual 3x3 conv; GroupNorm (batch-size independent) and SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2))
        x = F.silu(self.norm1(self.down(x)))
        return x + F.silu(self.norm2(self.conv(x)))


class ConvImageEncoder(nn.Module):
    """Image (N, C, H, W) in [-1, 1] -> ``n_tokens`` tokens (N, n_tokens, d_model).

    Strided conv blocks, then spatial-softmax pooling: each token has its own 1x1-conv attention map
    over the feature grid and reads the attention-weighted features *and* the expected (x, y) position
    of its map (keypoint coordinates, as in Diffusion Policy's spatial softmax), so where things are in
    the image reaches the transformer explicitly.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], n_tokens: int, d_model: int) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in itertools.pairwise(widths)))
        self.attention_logits = nn.Conv2d(widths[-1], n_tokens, 1)
        self.out = nn.Linear(widths[-1] + 2, d_model)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W) -> (N, K, D)
        feats = self.blocks(x)  # (N, C', h, w)
        h, w = feats.shape[-2:]
        attn = self.attention_logits(feats).flatten(2).softmax(dim=-1)  # (N, K, h*w)
        pooled = attn @ feats.flatten(2).transpose(1, 2)  # (N, K, C')
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=feats.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=feats.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)  # (h*w, 2)
        keypoints = attn @ grid  # (N, K, 2)
        out: Tensor = self.out(torch.cat([pooled, keypoints], dim=-1))
        return out


class StepTokenizer(nn.Module):
    """Normalised inputs of T steps -> tokens (B, T, tokens_per_step, D).

    Token order within a step: observation keys in sorted order (1 token per vector key,
    ``image_tokens`` per image key), then the previous-action token if ``use_prev_action``.
    """

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]],
        action_dim: int,
        d_model: int,
        image_tokens: int,
        image_channels: Sequence[int],
        use_prev_action: bool,
    ) -> None:
        super().__init__()
        if not input_shapes:
            raise ValueError("the step tokeniser needs at least one observation key in input_shapes")
        self.keys = sorted(input_shapes)
        self.shapes = {key: tuple(int(d) for d in input_shapes[key]) for key in self.keys}
        self.vector_encoders = nn.ModuleDict()
        self.image_encoders = nn.ModuleDict()
        n_tokens = 0
        for index, key in enumerate(self.keys):
            shape = self.shapes[key]
            name = f"k{index}"  # module names may not contain "." (LeRobot-style keys do)
            if len(shape) == 1:
                self.vector_encoders[name] = nn.Sequential(
                    nn.Linear(shape[0], d_model), nn.SiLU(), nn.Linear(d_model, d_model)
                )
                n_tokens += 1
            elif is_policy_image(shape):
                self.image_encoders[name] = ConvImageEncoder(shape[0], image_channels, image_tokens, d_model)
                n_tokens += image_tokens
            else:
                raise ValueError(
                    f"input_shapes[{key!r}]={list(shape)}: expected a vector (D,) or an image (C, H, W)"
                )
        self.use_prev_action = use_prev_action
        if use_prev_action:
            self.action_encoder = nn.Linear(action_dim, d_model)
            self.no_prev_action = nn.Parameter(torch.randn(d_model) * 0.02)
            n_tokens += 1
        self.tokens_per_step = n_tokens
        self.slot_embed = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)

    def forward(
        self,
        obs: Mapping[str, Tensor],
        prev_action: Tensor | None = None,
        prev_action_valid: Tensor | None = None,
    ) -> Tensor:
        """obs[key] (B, T, *shape); prev_action (B, T, Da), prev_action_valid (B, T) bool -> (B, T, S, D)."""
        first = obs[self.keys[0]]
        b, t = first.shape[:2]
        tokens: list[Tensor] = []
        for index, key in enumerate(self.keys):
            x = obs[key]
            name = f"k{index}"
            if name in self.vector_encoders:
                tokens.append(self.vector_encoders[name](x).unsqueeze(2))  # (B, T, 1, D)
            else:
                feats = self.image_encoders[name](x.flatten(0, 1))  # (B*T, K, D)
                tokens.append(feats.unflatten(0, (b, t)))  # (B, T, K, D)
        if self.use_prev_action:
            if prev_action is None or prev_action_valid is None:
                raise ValueError("this tokeniser reads the previous action: pass prev_action and its mask")
            action_token = self.action_encoder(prev_action)  # (B, T, D)
            action_token = torch.where(prev_action_valid[..., None], action_token, self.no_prev_action)
            tokens.append(action_token.unsqueeze(2))
        return torch.cat(tokens, dim=2) + self.slot_embed  # (B, T, S, D)
