"""Hierarchical (VMamba-like) vision Mamba: the VMamba baseline, LocalVMamba supernets and their derived children.

Papers:
* `VMamba: Visual State Space Model` - https://arxiv.org/abs/2401.10166
* `LocalMamba: Visual State Space Model with Windowed Selective Scan` - https://arxiv.org/abs/2403.09338
* `Stochastic Layer-Wise Shuffle: A Good Practice to Improve Vision Mamba Training` - https://arxiv.org/abs/2408.17081

A two-conv stem, then stages of VSS blocks at halving resolution (a strided 3×3 conv + LN between stages), a final LN
and a mean-pool head. A VSS block is ``x + drop_path(mixer(LN(x)))`` then ``x + drop_path(mlp(LN(x)))``; its mixer is
the :class:`~supernet.mixer.MultiOrderMixer` in VMamba's configuration: a 3×3 depthwise conv on the image grid before
the scan (shared by every order), no ``z`` gate, a LayerNorm after the merge. The VMamba-T sizes follow its ``s1l8``
recipe (dims 96-768, depths 2/2/8/2, d_state 1, ssm_ratio 1, MLP ratio 4).

Tensors are channels-last (B, H, W, C) between blocks. Stride-2 convs round odd grids up (7 → 4 → 2), so only the
stem's ``patch_size`` has to divide the input size.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ._base import (
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
from .mixer import ARCH_MODES, Branch, LayerNorm, MultiOrderMixer, gemm_input_dtype
from .slws import draw_shuffle, slws_probs

__all__ = ["Downsample", "Stem", "VMamba", "VMambaStage", "VSSBlock"]

VMAMBA_ORDERS = ("h", "v", "h_flip", "v_flip")
LOCAL_FIXED_ORDERS = ("h", "h_flip", "w2", "w2_flip")


def _conv(cin: int, cout: int, stride: int) -> nn.Conv2d:
    # 3×3 overlapping conv for stride 1-2 (VMamba's stem); a patchify conv for larger strides.
    if stride <= 2:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    return nn.Conv2d(cin, cout, stride, stride=stride)


class Stem(nn.Module):
    """VMamba's stem: conv → LN → GELU → conv → LN, total stride ``patch_size``. (B, C_in, H, W) → (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_backend: str = "auto") -> None:
        super().__init__()
        s1 = max(patch_size // 2, 1)
        if patch_size % s1:  # 5, 7, 9, ...: a stride-1 first conv, the whole stride in the second
            s1 = 1
        s2 = patch_size // s1
        self.conv1 = _conv(in_chans, embed_dim // 2, s1)
        self.norm1 = LayerNorm(embed_dim // 2, backend=norm_backend)
        self.act = nn.GELU()
        self.conv2 = _conv(embed_dim // 2, embed_dim, s2)
        self.norm2 = LayerNorm(embed_dim, backend=norm_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x).permute(0, 2, 3, 1)))
        return self.norm2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """3×3 stride-2 conv then LN: (B, H, W, C) → (B, ceil(H/2), ceil(W/2), C_out)."""

    def __init__(self, dim: int, out_dim: int, norm_backend: str = "auto") -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm(out_dim, backend=norm_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def _norm_for_gemm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a GEMM to read: in the GEMM's autocast dtype from :class:`~supernet.mixer.LayerNorm` (a norm
    module of another kind, swapped in, is called plainly)."""
    return norm(x, gemm_input_dtype(x)) if isinstance(norm, LayerNorm) else norm(x)


class VSSBlock(nn.Module):
    """VMamba block: ``x + dp(mixer(LN(x)))`` then ``x + dp(mlp(LN(x)))`` on (B, H, W, C)."""

    def __init__(
        self, dim: int, mixer: MultiOrderMixer, mlp_ratio: float, drop_path: float, norm_backend: str = "auto"
    ) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, backend=norm_backend)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, backend=norm_backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU) if mlp_ratio > 0 else None

    def forward(self, x: torch.Tensor, perm: torch.Tensor | None = None, branch: Branch | None = None) -> torch.Tensor:
        """x: (B, H, W, C) → (B, H, W, C); ``perm`` (H·W,) shuffles the tokens the mixer scans (SLWS); ``branch`` is
        the mixer's ``(w, idx)`` if the model drew them (see :meth:`MultiOrderMixer.forward`)."""
        bsz, h, w, c = x.shape
        # Both norms feed a GEMM only (the mixer's in_proj, the MLP's fc1): under autocast they write its dtype.
        mixed = self.mixer(_norm_for_gemm(self.norm, x).reshape(bsz, h * w, c), perm=perm, branch=branch)
        x = x + self.drop_path(mixed.view(bsz, h, w, c))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(_norm_for_gemm(self.norm2, x)))
        return x


class VMambaStage(nn.Module):
    """Optional downsample, then VSS blocks at one resolution."""

    def __init__(self, downsample: nn.Module | None, blocks: list[VSSBlock], grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)


class VMamba(ArchModelMixin, nn.Module):
    """Hierarchical vision Mamba over multi-order mixers (VMamba baseline, LocalVMamba supernet or child).

    Args:
        img_size: input size, int or (H, W); must be divisible by ``patch_size``.
        patch_size: stem stride.
        in_chans: input channels.
        num_classes: classifier classes (0: no classifier).
        global_pool: ``"avg"`` or ``""``.
        dims: width of each stage.
        depths: blocks per stage.
        d_state: SSM state size N.
        ssm_ratio: mixer inner width ``ssm_ratio * dim``.
        dt_rank: Δ projection rank (``"auto"``: ``ceil(dim / 16)``).
        d_conv: 2-D depthwise conv kernel before the scan.
        mlp_ratio: MLP hidden ratio (0: no MLP).
        branch_attn: LocalMamba's per-branch channel attention in the mixer.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        shuffle_max: SLWS ``P_max`` (0: off); layer index and depth count every block of every stage.
        orders, space, arch, mix, derived_model_name, scan_backend, scan_recompute, model_name: as
            :class:`supernet.vim.VisionMamba`.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 8, 2),
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        mlp_ratio: float = 4.0,
        branch_attn: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        shuffle_max: float = 0.0,
        orders: Sequence[str] | None = None,
        space: SpaceSpec | None = None,
        arch: ArchSpecLike | None = None,
        mix: str | None = None,
        derived_model_name: str | None = None,
        scan_backend: str = "auto",
        scan_recompute: bool | None = None,
        model_name: str = "VMamba",
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
        check_sizes(model_name, {"dims": dims, "depths": depths, "d_state": d_state},
                    {"ssm_ratio": ssm_ratio}, d_conv)  # fmt: skip
        patch_size = check_patch_size(model_name, patch_size)
        if any(s % patch_size for s in self.img_size):
            raise ValueError(
                f"{model_name}: img_size {self.img_size} is not divisible by patch_size {patch_size}; use a multiple"
            )
        dims, depths = tuple(dims), tuple(depths)
        if len(dims) != len(depths) or not depths or min(depths) < 1:
            raise ValueError(f"{model_name}: dims {dims} and depths {depths} must be equally long, depths >= 1")
        if global_pool not in ("avg", ""):
            raise ValueError(f"{model_name}: global_pool must be 'avg' or '', got {global_pool!r}")
        if mix is not None and mix not in ARCH_MODES:
            raise ValueError(f"{model_name}: mix must be one of {', '.join(ARCH_MODES)}, got {mix!r}")
        if mix is not None and space is None:
            raise ValueError(f"{model_name}: mix= applies to search models only (pass space= too)")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.derived_model_name = derived_model_name
        total = sum(depths)
        self.shuffle_max = float(shuffle_max)
        self.slws_probs = slws_probs(total, self.shuffle_max)

        labels = [f"stages.{s}.blocks.{j}" for s, d in enumerate(depths) for j in range(d)]
        layer_orders = resolve_layer_orders(labels, model_name, orders=orders, space=space, arch=arch)
        self.search_space = layer_orders.space
        self.arch = layer_orders.arch

        self.stem = Stem(patch_size, in_chans, dims[0], norm_backend=scan_backend)
        grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        dpr = torch.linspace(0, drop_path_rate, total).tolist()
        stages, layer = [], 0
        for s, (dim, depth) in enumerate(zip(dims, depths)):
            if s > 0:
                grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
            mixer = partial(
                MultiOrderMixer,
                dim,
                grid,
                search=layer_orders.search,
                mode=mix or "softmax",
                min_global=layer_orders.space.min_global if layer_orders.search else 0,
                d_state=d_state,
                expand=ssm_ratio,
                dt_rank=dt_rank,
                d_conv=0,
                conv_2d=d_conv,
                conv_bias=False,
                gate=False,
                out_norm=True,
                branch_attn=branch_attn,
                scan_backend=scan_backend,
                scan_recompute=(None if layer_orders.search else False) if scan_recompute is None else scan_recompute,
            )
            blocks = []
            for _ in range(depth):
                blk = VSSBlock(dim, mixer(layer_orders.per_layer[layer]), mlp_ratio, dpr[layer], scan_backend)
                blocks.append(blk)
                layer += 1
            down = Downsample(dims[s - 1], dim, scan_backend) if s > 0 else None
            stages.append(VMambaStage(down, blocks, grid))
        self.stages = nn.ModuleList(stages)
        self.feature_info = [
            dict(module=f"stages.{s}", num_chs=dim, reduction=patch_size * 2**s) for s, dim in enumerate(dims)
        ]
        self.norm = LayerNorm(dims[-1], backend=scan_backend)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if device is not None or dtype is not None:  # timm's factory arguments: built here, then placed
            self.to(device=device, dtype=dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def named_mixers(self) -> list[tuple[str, MultiOrderMixer]]:
        return [
            (f"stages.{s}.blocks.{j}", blk.mixer)
            for s, stage in enumerate(self.stages)
            for j, blk in enumerate(stage.blocks)
        ]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return self._mixer_no_weight_decay()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
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
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stages(self, x: torch.Tensor, take: Sequence[int] = (), stop: int | None = None):
        """Stem and stages (up to ``stop``, all if None): ``(x, taken)``, ``taken`` the output of each stage index in
        ``take``, (B, H_s, W_s, C_s)."""
        check_input_size(x, self.img_size)
        x = self.stem(x)
        layer, taken = 0, []
        branches = self._branch_weights()
        stages = self.stages if stop is None else self.stages[: stop + 1]
        for s, stage in enumerate(stages):
            x = stage.downsample(x)
            num_tokens = stage.grid[0] * stage.grid[1]
            for blk in stage.blocks:
                perm = None
                if self.training and self.shuffle_max > 0.0:
                    perm = draw_shuffle(self.slws_probs[layer], num_tokens, x.device)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, perm, branches[layer], use_reentrant=False)
                else:
                    x = blk(x, perm, branches[layer])
                layer += 1
            if s in take:
                taken.append(x)
        return x, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) → (B, H', W', C_last) normalized, channels-last."""
        return self.norm(self._stages(x)[0])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the output of the stages ``indices`` selects (an int: the last n; a sequence: those
        indices, negative from the end; None: all), at strides ``patch_size · 2^s``.

        Args:
            x: (B, in_chans, H, W) images.
            indices: which stages (taken in stage order, each once).
            norm: apply the final norm to the last stage's output, if taken (the other stages have their own widths).
            stop_early: run no stage after the last one taken (the final features are then that stage's output,
                without the final norm unless it is the last stage).
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the intermediates.

        Returns:
            ``(forward_features(x), intermediates)``, or the intermediates alone.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = take_indices(len(self.stages), indices, "stages")
        stop = max_index if stop_early or intermediates_only else None
        x, taken = self._stages(x, take, stop)
        last = len(self.stages) - 1
        if norm and last in take:
            taken[-1] = self.norm(taken[-1])
        if output_fmt == "NCHW":
            taken = [t.permute(0, 3, 1, 2).contiguous() for t in taken]
        if intermediates_only:
            return taken
        # stopped before the last stage: that stage's output as it is (the final norm has the last stage's width)
        return (self.norm(x) if stop is None or stop == last else x), taken

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm, the head if asked): timm's
        ``features_only`` models keep only what their features need. Returns the absolute indices."""
        take, max_index = take_indices(len(self.stages), indices, "stages")
        if max_index < len(self.stages) - 1:  # the features end at an earlier stage: its width, no norm or head
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = prune_head = True
        self.stages = self.stages[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, H, W, C) → (B, num_classes), or the pooled (B, C) with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: VMamba) -> dict:
    """timm's pretrained filter: a training checkpoint's weights (:func:`supernet._base.unwrap_checkpoint`); keys are
    this module's own, and none depends on the image size."""
    return unwrap_checkpoint(state_dict)


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_small = dict(input_size=(3, 32, 32), num_classes=10, crop_pct=1.0, pool_size=None)
default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny": _cfg(),
        "local_vmamba_tiny_search": _cfg(),
        "local_vmamba_tiny": _cfg(),
        "vmamba_mini": _cfg(**_small),
        "local_vmamba_mini_search": _cfg(**_small),
        "local_vmamba_mini": _cfg(**_small),
        "local_fixed_vmamba_mini": _cfg(**_small),
        "test_vmamba": _cfg(**_small),
        "test_local_vmamba_search": _cfg(**_small),
        "test_local_vmamba": _cfg(**_small),
    }
)


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    # features_only: every stage by default
    return build_family_model(VMamba, variant, pretrained, checkpoint_filter_fn, None, **kwargs)


# ImageNet sizes -------------------------------------------------------------------------------------------------------

_tiny_args = dict(patch_size=4, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), d_state=1, ssm_ratio=1.0)


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T (s1l8): dims 96-768, depths 2/2/8/2, d_state 1, cross scan (h, v, h_flip, v_flip). ~30M params."""
    model_args = dict(_tiny_args, orders=VMAMBA_ORDERS)
    return _create_vmamba("vmamba_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vmamba_tiny_search(pretrained: bool = False, **kwargs) -> VMamba:
    """LocalVMamba-T supernet on the VMamba-T body, K = 8 (``localmamba``)."""
    model_args = dict(
        _tiny_args, branch_attn=True, space="localmamba", mix="softmax", derived_model_name="local_vmamba_tiny"
    )
    return _create_vmamba("local_vmamba_tiny_search", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vmamba_tiny(pretrained: bool = False, **kwargs) -> VMamba:
    """LocalVMamba-T child on the VMamba-T body (``arch=`` required)."""
    model_args = dict(_tiny_args, branch_attn=True)
    return _create_vmamba("local_vmamba_tiny", pretrained, **dict(model_args, **kwargs))


# 28-64 px (Fashion-MNIST, CIFAR) --------------------------------------------------------------------------------------

_mini_args = dict(patch_size=2, dims=(32, 64, 128, 256), depths=(2, 2, 2, 1), d_state=1, ssm_ratio=1.0, mlp_ratio=2.0)


@register_model
def vmamba_mini(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba for 28-64 px: patch 2, dims 32-256, depths 2/2/2/1, MLP ratio 2, cross scan (~ vim_mini in params)."""
    model_args = dict(_mini_args, orders=VMAMBA_ORDERS)
    return _create_vmamba("vmamba_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vmamba_mini_search(pretrained: bool = False, **kwargs) -> VMamba:
    """LocalVMamba supernet for 28-64 px, K = 8 (``localmamba``)."""
    model_args = dict(
        _mini_args, branch_attn=True, space="localmamba", mix="softmax", derived_model_name="local_vmamba_mini"
    )
    return _create_vmamba("local_vmamba_mini_search", pretrained, **dict(model_args, **kwargs))


@register_model
def local_vmamba_mini(pretrained: bool = False, **kwargs) -> VMamba:
    """LocalVMamba child for 28-64 px (``arch=`` required)."""
    model_args = dict(_mini_args, branch_attn=True)
    return _create_vmamba("local_vmamba_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def local_fixed_vmamba_mini(pretrained: bool = False, **kwargs) -> VMamba:
    """LocalVMamba for 28-64 px without search: (h, h_flip, w2, w2_flip) in every layer."""
    model_args = dict(_mini_args, branch_attn=True, orders=LOCAL_FIXED_ORDERS)
    return _create_vmamba("local_fixed_vmamba_mini", pretrained, **dict(model_args, **kwargs))


# CI -------------------------------------------------------------------------------------------------------------------

_test_args = dict(patch_size=4, dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), d_state=2, mlp_ratio=2.0)


@register_model
def test_vmamba(pretrained: bool = False, **kwargs) -> VMamba:
    """Tiny VMamba for CI."""
    model_args = dict(_test_args, orders=VMAMBA_ORDERS)
    return _create_vmamba("test_vmamba", pretrained, **dict(model_args, **kwargs))


@register_model
def test_local_vmamba_search(pretrained: bool = False, **kwargs) -> VMamba:
    """Tiny LocalVMamba supernet for CI."""
    model_args = dict(
        _test_args, branch_attn=True, space="localmamba", mix="softmax", derived_model_name="test_local_vmamba"
    )
    return _create_vmamba("test_local_vmamba_search", pretrained, **dict(model_args, **kwargs))


@register_model
def test_local_vmamba(pretrained: bool = False, **kwargs) -> VMamba:
    """Tiny LocalVMamba child for CI (``arch=`` required)."""
    model_args = dict(_test_args, branch_attn=True)
    return _create_vmamba("test_local_vmamba", pretrained, **dict(model_args, **kwargs))
