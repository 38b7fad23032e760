"""Plain (Vim-like) vision Mamba: baselines, LocalVim supernets and their derived children.

Papers:
* `Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model` -
  https://arxiv.org/abs/2401.09417
* `LocalMamba: Visual State Space Model with Windowed Selective Scan` - https://arxiv.org/abs/2403.09338
* `Stochastic Layer-Wise Shuffle: A Good Practice to Improve Vision Mamba Training` - https://arxiv.org/abs/2408.17081

A patch embedding, an absolute position embedding, ``depth`` pre-norm residual blocks around a
:class:`~supernet.mixer.MultiOrderMixer` (per-order causal conv1d, gated scan), a final norm and a mean-pool (default)
or middle-class-token head. Every layer scans the same orders (``orders=``, the baselines), searches over a space
(``space=``, the supernets, which own ``arch_logits``), or scans the orders an arch file gives it (``arch=``).

Differences from the published code, on purpose: the residual stream is the usual ``x + drop_path(mixer(norm(x)))``,
computed as Vim's fused add-norm does (each block adds the previous mixer's output to the residual inside its norm,
``kernels.add_rms_norm``), but with each block's drop path on its own mixer's output; the middle class token is
stored after the grid tokens and every order visits it at its middle step (Vim inserts it in the middle of a
row-major sequence, which is the same for ``h`` and ``h_flip``); no RoPE (LocalVim adds one).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

import kernels

from ._base import (
    SOURCE_GRID,
    ArchModelMixin,
    ArchSpecLike,
    SpaceSpec,
    build_family_model,
    check_device,
    check_input_size,
    check_io,
    check_patch_size,
    check_sizes,
    resolve_layer_orders,
    take_indices,
    to_size,
    unwrap_checkpoint,
)
from .mixer import ARCH_MODES, Branch, MultiOrderMixer, gemm_input_dtype
from .slws import draw_shuffle, slws_probs

__all__ = ["Block", "PatchEmbed", "RMSNorm", "VisionMamba", "add_norm"]

VIM_ORDERS = ("h", "h_flip")
LOCAL_FIXED_ORDERS = ("h", "h_flip", "w2", "w2_flip")


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over the last dimension whose fp32 calls run ``kernels.rms_norm`` (the Triton kernels on CUDA
    with ``backend`` auto/triton). Same parameters and state dict as ``nn.RMSNorm``."""

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__(dim, eps=eps)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, backend=self.backend)


def add_norm(
    norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = residual + x`` (x alone without a residual) and ``(norm(r) in out_dtype, r)``: one fused op for
    :class:`RMSNorm` (``kernels.add_rms_norm``), composed for any other norm."""
    if isinstance(norm, RMSNorm):
        return kernels.add_rms_norm(x, residual, norm.weight, norm.eps, out_dtype, backend=norm.backend)
    r = x if residual is None else residual + x
    y = norm(r)
    return (y if out_dtype is None else y.to(out_dtype)), r


def _own_dtype(weight: torch.Tensor | None, x: torch.Tensor) -> torch.dtype | None:
    """Without autocast, the dtype of the module reading a norm's output (None: the norm's own choice); under
    autocast None, which leaves the dtypes to autocast."""
    if weight is None:
        return None
    device = x.device.type
    # (is_autocast_available breaks Dynamo's graph, and is_autocast_enabled raises for a device without autocast:
    # the meta device)
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device):
        return weight.dtype
    return None if torch.is_autocast_enabled(device) else weight.dtype


def _norm_layer(name: str, backend: str = "auto") -> type[nn.Module] | partial:
    if name == "rmsnorm":
        return partial(RMSNorm, eps=1e-5, backend=backend)
    if name == "layernorm":
        return partial(nn.LayerNorm, eps=1e-5)
    raise ValueError(f"norm_layer must be 'rmsnorm' or 'layernorm', got {name!r}")


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, in_chans, H, W) → (B, H/p · W/p, C), grid tokens row-major."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm residual block ``x + drop_path(mixer(norm(x)))`` on a (hidden, residual) pair, whose sum is x: the block
    adds ``hidden`` (the previous block's drop-pathed mixer output) to the residual inside its norm and returns its own
    (Vim's fused add-norm). Start with ``(x, None)``; ``sum(block(h, r))`` is the usual block applied to ``h + r``.

    Args:
        dim: width C.
        mixer: the multi-order mixer.
        norm_layer: norm constructor.
        drop_path: stochastic depth rate of this block.
    """

    def __init__(self, dim: int, mixer: MultiOrderMixer, norm_layer: type[nn.Module] | partial, drop_path: float):
        super().__init__()
        self.norm = norm_layer(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        perm: torch.Tensor | None = None,
        branch: Branch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, C) pair → (hidden, residual) pair; ``perm`` (L,) shuffles the tokens the mixer scans (SLWS);
        ``branch`` is the mixer's ``(w, idx)`` if the model drew them (see :meth:`MultiOrderMixer.forward`).

        Under autocast the norm writes the autocast dtype, which the mixer's first GEMM reads without a cast.
        """
        # compiled, none: the GEMM's own autocast cast fuses with the norm anyway. Without autocast, in_proj's dtype:
        # a model cast to bf16/fp16 keeps its residual in fp32 (residual_in_fp32) and feeds the GEMM its own dtype.
        out_dtype = gemm_input_dtype(hidden) or _own_dtype(self.mixer.in_proj.weight, hidden)
        normed, residual = add_norm(self.norm, hidden, residual, out_dtype)
        return self.drop_path(self.mixer(normed, perm=perm, branch=branch)), residual


class VisionMamba(ArchModelMixin, nn.Module):
    """Plain vision Mamba over multi-order mixers (Vim baseline, LocalVim supernet or child).

    Args:
        img_size: input size, int or (H, W); must be divisible by ``patch_size``.
        patch_size: patch size (int).
        in_chans: input channels.
        num_classes: classifier classes (0: no classifier).
        global_pool: ``"avg"`` (mean over the grid tokens), ``"token"`` (a class token visited at the middle step of
            every order, as Vim) or ``""`` (no pooling).
        embed_dim: width C.
        depth: number of blocks.
        d_state: SSM state size N.
        expand: mixer inner width ``expand * C``.
        dt_rank: Δ projection rank (``"auto"``: ``ceil(C / 16)``).
        d_conv: per-order causal conv1d width.
        norm_layer: ``"rmsnorm"`` or ``"layernorm"``.
        residual_in_fp32: keep the residual stream in fp32 under autocast (Vim).
        branch_attn: LocalMamba's per-branch channel attention in the mixer.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        shuffle_max: SLWS ``P_max`` (0: off).
        orders: fixed orders for every layer (baselines).
        space: search space (supernets): a preset name, YAML path, dict or SearchSpace.
        arch: derived architecture: an arch YAML path, dict or ArchSpec.
        mix: supernet mixing mode, ``softmax`` | ``gumbel`` | ``hard`` (see :meth:`set_arch_mode`).
        derived_model_name: the entrypoint that builds a child of this supernet from an arch file.
        scan_backend: ``kernels`` backend (``auto``, ``ref``, ``triton``, ``mamba``).
        scan_recompute: the scans keep no chunk-start states for the backward and recompute them (one more scan
            forward per step, much less memory). Default: search models recompute when they scan all K candidates
            (softmax, gumbel) and keep the states of a sampled path (hard); other models keep them.
        model_name: name used in error messages.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 4,
        norm_layer: str = "rmsnorm",
        residual_in_fp32: bool = True,
        branch_attn: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        shuffle_max: float = 0.0,
        orders: Sequence[str] | None = None,
        space: SpaceSpec | None = None,
        arch: ArchSpecLike | None = None,
        mix: str | None = None,
        derived_model_name: str | None = None,
        scan_backend: str = "auto",
        scan_recompute: bool | None = None,
        model_name: str = "VisionMamba",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # Every constructor argument as it reached the model, defaults included (a resumed run compares them);
        # not where it was placed (timm's ``device=`` / ``dtype=``, which its own records leave out too).
        placed = ("self", "__class__", "device", "dtype")
        init_args = {k: v for k, v in locals().items() if k not in placed}
        check_device(model_name)
        super().__init__()
        self.init_args = init_args
        self.img_size = to_size(img_size)
        check_io(model_name, in_chans, num_classes)
        check_sizes(model_name, {"embed_dim": embed_dim, "depth": depth, "d_state": d_state},
                    {"expand": expand}, d_conv)  # fmt: skip
        patch_size = check_patch_size(model_name, patch_size)
        if any(s % patch_size for s in self.img_size):
            raise ValueError(
                f"{model_name}: img_size {self.img_size} is not divisible by patch_size {patch_size}; use a multiple"
            )
        if global_pool not in ("avg", "token", ""):
            raise ValueError(f"{model_name}: global_pool must be 'avg', 'token' or '', got {global_pool!r}")
        if mix is not None and mix not in ARCH_MODES:
            raise ValueError(f"{model_name}: mix must be one of {', '.join(ARCH_MODES)}, got {mix!r}")
        if mix is not None and space is None:
            raise ValueError(f"{model_name}: mix= applies to search models only (pass space= too)")
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_grid_tokens = self.grid[0] * self.grid[1]
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.residual_in_fp32 = residual_in_fp32
        self.grad_checkpointing = False
        self.derived_model_name = derived_model_name
        self.shuffle_max = float(shuffle_max)
        self.slws_probs = slws_probs(depth, self.shuffle_max)

        labels = [f"blocks.{i}" for i in range(depth)]
        layer_orders = resolve_layer_orders(labels, model_name, orders=orders, space=space, arch=arch)
        self.search_space = layer_orders.space
        self.arch = layer_orders.arch

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_grid_tokens, embed_dim))
        # The class token sits after the grid tokens in memory; every order visits it at its middle step.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if global_pool == "token" else None
        extra_step = self.num_grid_tokens // 2 if self.cls_token is not None else None
        self.pos_drop = nn.Dropout(pos_drop_rate)

        norm = _norm_layer(norm_layer, scan_backend)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        mixer = partial(
            MultiOrderMixer,
            embed_dim,
            self.grid,
            search=layer_orders.search,
            mode=mix or "softmax",
            min_global=layer_orders.space.min_global if layer_orders.search else 0,
            d_state=d_state,
            expand=expand,
            dt_rank=dt_rank,
            d_conv=d_conv,
            branch_attn=branch_attn,
            extra_token_step=extra_step,
            scan_backend=scan_backend,
            scan_recompute=(None if layer_orders.search else False) if scan_recompute is None else scan_recompute,
        )
        self.blocks = nn.ModuleList(
            [Block(embed_dim, mixer(layer_orders.per_layer[i]), norm, dpr[i]) for i in range(depth)]
        )
        self.norm = norm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)
        if device is not None or dtype is not None:  # timm's factory arguments: built here, then placed
            self.to(device=device, dtype=dtype)

    def _init_weights(self, depth: int) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Mamba's pre-norm residual rescaling: keep the residual stream's variance flat over depth.
        for blk in self.blocks:
            nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                blk.mixer.out_proj.weight /= math.sqrt(depth)

    def named_mixers(self) -> list[tuple[str, MultiOrderMixer]]:
        return [(f"blocks.{i}", blk.mixer) for i, blk in enumerate(self.blocks)]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | self._mixer_no_weight_decay()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        check_io("reset_classifier", num_classes=num_classes)
        self.num_classes = num_classes
        if global_pool is not None:
            allowed = ("avg", "token", "") if self.cls_token is not None else ("avg", "")
            if global_pool not in allowed:
                raise ValueError(f"global_pool must be one of {allowed} for this model, got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _shuffle(self, layer: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        if not self.training or self.shuffle_max <= 0.0:
            return None
        perm = draw_shuffle(self.slws_probs[layer], self.num_grid_tokens, device)
        if perm is None or num_tokens == self.num_grid_tokens:
            return perm
        # Only grid tokens are shuffled; the class token keeps its place (the middle step of every order).
        return torch.cat([perm, torch.arange(self.num_grid_tokens, num_tokens, device=device)])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size)
        x = self.patch_embed(x)
        x = x + self.pos_embed
        if self.cls_token is not None:
            x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)
        x = self.pos_drop(x)
        return x.to(kernels.reference.compute_dtype(x)) if self.residual_in_fp32 else x  # fp64 stays fp64

    def _final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return add_norm(self.norm, x, residual, _own_dtype(getattr(self.norm, "weight", None), x))[0]

    def _blocks(self, x: torch.Tensor, take: Sequence[int] = (), stop: int | None = None):
        """Run the blocks (up to ``stop``, all if None) on embedded tokens: ``(hidden, residual, taken)``, ``taken`` the
        residual stream ``hidden + residual`` after each block index in ``take``."""
        residual, taken = None, []
        branches = self._branch_weights()
        blocks = self.blocks if stop is None else self.blocks[: stop + 1]
        for i, blk in enumerate(blocks):
            perm = self._shuffle(i, x.shape[1], x.device)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, residual = checkpoint(blk, x, residual, perm=perm, branch=branches[i], use_reentrant=False)
            else:
                x, residual = blk(x, residual, perm=perm, branch=branches[i])
            if i in take:
                taken.append(x + residual)
        return x, residual, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) → (B, L, C) normalized tokens (grid tokens row-major, then the class token)."""
        x, residual, _ = self._blocks(self._embed(x))
        return self._final_norm(x, residual)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the residual stream after the blocks ``indices`` selects (an int: the last n; a
        sequence: those indices, negative from the end; None: all).

        Args:
            x: (B, in_chans, H, W) images.
            indices: which blocks (taken in block order, each once).
            return_prefix_tokens: pair each intermediate with its class token, ``(grid, (B, 1, C))`` (models with
                ``global_pool="token"``; ``(B, 0, C)`` for the others, which have none).
            norm: apply the final norm to each intermediate.
            stop_early: run no block after the last one taken (the final features are then those of that block).
            output_fmt: ``"NCHW"`` (B, C, H/p, W/p) or ``"NLC"`` (B, H/p · W/p, C), grid tokens row-major.
            intermediates_only: return only the intermediates.

        Returns:
            ``(forward_features(x), intermediates)``, or the intermediates alone.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = take_indices(len(self.blocks), indices, "blocks")
        stop = max_index if stop_early or intermediates_only else None
        x, residual, taken = self._blocks(self._embed(x), take, stop)
        if norm:
            taken = [self._final_norm(t, None) for t in taken]
        n, (h, w) = self.num_grid_tokens, self.grid
        prefix = [t[:, n:] for t in taken]
        grid = [t[:, :n] for t in taken]
        if output_fmt == "NCHW":
            grid = [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in grid]
        if return_prefix_tokens:  # (B, 1, C) with a class token, (B, 0, C) without one
            grid = list(zip(grid, prefix))
        if intermediates_only:
            return grid
        return self._final_norm(x, residual), grid

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the head if asked): timm's
        ``features_only`` models keep only what their features need. Returns the absolute indices."""
        take, max_index = take_indices(len(self.blocks), indices, "blocks")
        self.blocks = self.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, L, C) → (B, num_classes), or the pooled (B, C) with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x[:, : self.num_grid_tokens].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, self.num_grid_tokens]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba) -> dict:
    """timm's pretrained filter: a training checkpoint's weights (:func:`supernet._base.unwrap_checkpoint`), with a
    ``pos_embed`` of another token grid resampled to this model's grid (timm's ``resample_abs_pos_embed``, bicubic,
    as timm's ViT does), so weights trained at one ``img_size`` load into a model built for another. The source grid
    is the one a checkpoint of this project's trainers records (:data:`supernet._base.SOURCE_GRID`, any shape);
    other files are read as a square grid, as timm's ViT reads them.

    Raises:
        ValueError: a ``pos_embed`` of another size whose token count is not a square grid and whose file does not
            say its grid (its shape is ambiguous).
    """
    state_dict = dict(unwrap_checkpoint(state_dict))
    pos = state_dict.get("pos_embed")
    want = model.pos_embed.shape
    if not (isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[2] == want[2]):
        return state_dict
    source = SOURCE_GRID.get()
    if source is None or source[0] * source[1] != pos.shape[1]:
        if pos.shape[1] == want[1]:
            return state_dict
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(
                f"pos_embed of {pos.shape[1]} tokens is not a square grid, so it cannot be resampled to this model's "
                f"{model.grid[0]}x{model.grid[1]}; build the model at the checkpoint's own img_size and patch_size"
            )
        source = (side, side)
    if tuple(source) != tuple(model.grid):
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.grid), old_size=list(source), num_prefix_tokens=0
        )
    return state_dict


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_small = dict(input_size=(3, 32, 32), num_classes=10, crop_pct=1.0)
default_cfgs = generate_default_cfgs(
    {
        "vim_tiny": _cfg(),
        "vim_small": _cfg(),
        "local_vim_tiny_search": _cfg(),
        "local_vim_tiny": _cfg(),
        "local_fixed_vim_tiny": _cfg(),
        "vim_mini": _cfg(**_small),
        "local_vim_mini_search": _cfg(**_small),
        "local_vim_mini": _cfg(**_small),
        "local_fixed_vim_mini": _cfg(**_small),
        "test_vim": _cfg(**_small),
        "test_local_vim_search": _cfg(**_small),
        "test_local_vim": _cfg(**_small),
        "test_local_fixed_vim": _cfg(**_small),
    }
)


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    depth = kwargs.get("depth")  # features_only: the last three blocks, as timm's ViTs (all of a shallower model)
    last3 = min(3, depth) if isinstance(depth, int) and depth > 0 else 3
    return build_family_model(VisionMamba, variant, pretrained, checkpoint_filter_fn, last3, **kwargs)


# ImageNet sizes -------------------------------------------------------------------------------------------------------


@register_model
def vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: patch 16, depth 24, width 192, d_state 16, (h, h_flip) averaged. ~7M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=24, orders=VIM_ORDERS)
    return _create_vim("vim_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: patch 16, depth 24, width 384, (h, h_flip). ~26M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=24, orders=VIM_ORDERS)
    return _create_vim("vim_small", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vim_tiny_search(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LocalVim-T supernet: depth 20, width 128 (narrower than its child, as LocalMamba), K = 8 (``localmamba``)."""
    model_args = dict(
        patch_size=16,
        embed_dim=128,
        depth=20,
        branch_attn=True,
        space="localmamba",
        mix="softmax",
        derived_model_name="local_vim_tiny",
    )
    return _create_vim("local_vim_tiny_search", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LocalVim-T: depth 20, width 192, the k orders per layer of ``arch=`` (required). ~8M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=20, branch_attn=True)
    return _create_vim("local_vim_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def local_fixed_vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LocalVim-T without search: (h, h_flip, w2, w2_flip) in every layer."""
    model_args = dict(patch_size=16, embed_dim=192, depth=20, branch_attn=True, orders=LOCAL_FIXED_ORDERS)
    return _create_vim("local_fixed_vim_tiny", pretrained, **dict(model_args, **kwargs))


# 28-64 px (Fashion-MNIST, CIFAR) --------------------------------------------------------------------------------------


@register_model
def vim_mini(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim for 28-64 px: patch 4, depth 8, width 128, (h, h_flip)."""
    model_args = dict(patch_size=4, embed_dim=128, depth=8, orders=VIM_ORDERS)
    return _create_vim("vim_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vim_mini_search(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LocalVim supernet for 28-64 px: patch 4, depth 8, width 128, K = 8 (``localmamba``)."""
    model_args = dict(
        patch_size=4,
        embed_dim=128,
        depth=8,
        branch_attn=True,
        space="localmamba",
        mix="softmax",
        derived_model_name="local_vim_mini",
    )
    return _create_vim("local_vim_mini_search", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vim_mini(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LocalVim child for 28-64 px (``arch=`` required); same width as its supernet, so weights can be sliced."""
    model_args = dict(patch_size=4, embed_dim=128, depth=8, branch_attn=True)
    return _create_vim("local_vim_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def local_fixed_vim_mini(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LocalVim for 28-64 px without search: (h, h_flip, w2, w2_flip) in every layer."""
    model_args = dict(patch_size=4, embed_dim=128, depth=8, branch_attn=True, orders=LOCAL_FIXED_ORDERS)
    return _create_vim("local_fixed_vim_mini", pretrained, **dict(model_args, **kwargs))


# CI -------------------------------------------------------------------------------------------------------------------

_test_args = dict(patch_size=4, embed_dim=32, depth=2, d_state=4)


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny Vim for CI."""
    model_args = dict(_test_args, orders=VIM_ORDERS)
    return _create_vim("test_vim", pretrained, **dict(model_args, **kwargs))


@register_model
def test_local_vim_search(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny LocalVim supernet for CI."""
    model_args = dict(
        _test_args, branch_attn=True, space="localmamba", mix="softmax", derived_model_name="test_local_vim"
    )
    return _create_vim("test_local_vim_search", pretrained, **dict(model_args, **kwargs))


@register_model
def test_local_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny LocalVim child for CI (``arch=`` required)."""
    model_args = dict(_test_args, branch_attn=True)
    return _create_vim("test_local_vim", pretrained, **dict(model_args, **kwargs))


@register_model
def test_local_fixed_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny LocalVim with (h, h_flip, w2, w2_flip) for CI."""
    model_args = dict(_test_args, branch_attn=True, orders=LOCAL_FIXED_ORDERS)
    return _create_vim("test_local_fixed_vim", pretrained, **dict(model_args, **kwargs))
