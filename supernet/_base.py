"""What every model of this package shares: choosing each layer's orders, and the architecture-parameter API."""

from __future__ import annotations

import contextlib
import contextvars
import math
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from search_spaces import ArchSpec, SearchSpace, load_arch, load_space, validate_order_name

from .mixer import Branch, MultiOrderMixer, batched_branch_weights

__all__ = ["ArchModelMixin", "LayerOrders", "check_io", "resolve_layer_orders", "take_indices", "to_size"]

OrdersSpec = Sequence[str]
SpaceSpec = str | Path | dict | SearchSpace
ArchSpecLike = str | Path | dict | ArchSpec


def to_size(img_size: int | Sequence[int], what: str = "img_size") -> tuple[int, int]:
    """``224`` or ``(224, 224)`` (any integer type, numpy's included) → ``(224, 224)``; anything else is a
    ValueError."""
    bad = ValueError(f"{what} must be a positive int or a pair (H, W) of them, got {img_size!r}")
    if isinstance(img_size, (str, bytes)):
        raise bad
    try:
        size = (img_size, img_size) if isinstance(img_size, Integral) else tuple(img_size)
    except TypeError:  # a float, None, ...
        raise bad from None
    if len(size) != 2 or not all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in size):
        raise bad
    return int(size[0]), int(size[1])


def check_io(model_name: str, in_chans: int | None = None, num_classes: int | None = None) -> None:
    """Refuse fewer than one input channel and a negative class count (0 means no classifier); None is not checked."""
    if in_chans is not None and (not isinstance(in_chans, Integral) or isinstance(in_chans, bool) or in_chans < 1):
        raise ValueError(f"{model_name}: in_chans must be a positive int (input image channels), got {in_chans!r}")
    if num_classes is not None and (
        not isinstance(num_classes, Integral) or isinstance(num_classes, bool) or num_classes < 0
    ):
        raise ValueError(f"{model_name}: num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")


def check_sizes(model_name: str, ints: dict[str, Any], ratios: dict[str, Any], kernel: int) -> None:
    """Refuse, in one line, a width, depth or state size that is not a positive int (lists: each entry), a ratio
    that is not a positive number and a conv size ``kernel`` (``d_conv``, 0 = no conv) below 0, naming the argument
    (rather than a tensor-shape error deep in construction)."""
    for key, value in ints.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{model_name}: {key} must be a positive int (or a list of them), got {value!r}")
    if not isinstance(kernel, Integral) or isinstance(kernel, bool) or kernel < 0:
        raise ValueError(f"{model_name}: d_conv must be an int >= 0 (0: no conv), got {kernel!r}")
    for key, value in ratios.items():
        if not isinstance(value, Real) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{model_name}: {key} must be a positive number, got {value!r}")


# Where the weights sit in a training checkpoint handed over whole, EMA first as timm's loaders take them: timm's
# and this project's keys (``state_dict`` / ``state_dict_ema``), then this project's earlier ones (``ema`` /
# ``model_state``) and timm's older ``model_ema`` / ``model``.
_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model_state", "model")


def unwrap_checkpoint(state_dict: dict) -> dict:
    """The weights of a training checkpoint (see ``_WEIGHT_KEYS``), or ``state_dict`` itself when it is weights."""
    for key in _WEIGHT_KEYS:
        if isinstance(state_dict.get(key), dict):
            return state_dict[key]
    return state_dict


def check_patch_size(model_name: str, patch_size: Any) -> int:
    """``patch_size`` as a plain int (a numpy int too: the grid and the orders are built from it), or a one-line
    ValueError naming it."""
    if not isinstance(patch_size, Integral) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"{model_name}: patch_size must be a positive int, got {patch_size!r}")
    return int(patch_size)


def check_input_size(x: torch.Tensor, img_size: tuple[int, int]) -> None:
    """Refuse, in one line that says what to do, an input whose height and width are not the model's ``img_size``
    (the scan orders are permutations of that grid)."""
    if tuple(x.shape[-2:]) != img_size:
        raise ValueError(
            f"input size {tuple(x.shape[-2:])} does not match the model's img_size {img_size}; resize the input to "
            f"it, or build the model with img_size={tuple(x.shape[-2:])}"
        )


def check_device(model_name: str) -> None:
    """Refuse, in one line, building the class itself under ``with torch.device("meta")``: the constructor computes
    the scan orders (and more) on the host. ``device="meta"`` builds on the host and then moves the model;
    ``timm.create_model`` under the context does that by itself (see :func:`build_family_model`)."""
    if torch.get_default_device().type == "meta":
        raise ValueError(
            f"{model_name}: cannot be built under torch.device('meta') (its scan orders are computed on the host); "
            f"build it outside the context with device='meta', or through timm.create_model"
        )


# The token grid a pretrained file's ``pos_embed`` was trained on, when the file says (see :func:`_file_facts`): set
# while :func:`build_family_model` runs timm's loader, read by the plain family's checkpoint filter.
SOURCE_GRID: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("source_grid", default=None)


def _file_facts(cfg: Any, classifier: str, first_conv: str) -> dict[str, Any]:
    """What a pretrained file or state dict (``pretrained_cfg_overlay=dict(file=...)`` / ``state_dict=``) says of
    the model it came from: its classes (the classifier's rows), its input channels (the first conv's), and, for a
    checkpoint of this project's trainers, the token grid of its ``pos_embed`` (from the recorded ``img_size``).
    Anything it cannot read is left out: timm's own loader reports an unreadable file."""
    from timm.models import clean_state_dict  # the wrapper prefixes timm's loader strips (DDP, torch.compile)

    facts: dict[str, Any] = {}
    state, path = cfg.get("state_dict"), str(cfg.get("file") or "")
    try:
        if state is None and path.endswith(".safetensors"):  # weights only: read the two shapes from the header
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            spec = None
        else:
            if state is None:  # memory-mapped: only the shapes are read (files in torch's legacy format cannot be)
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                return facts
            spec = state.get("model_spec") if isinstance(state.get("model_spec"), dict) else None
            weights = unwrap_checkpoint(state)
            shapes = {k: tuple(v.shape) for k, v in clean_state_dict(weights).items() if hasattr(v, "shape")}
    except Exception:  # noqa: BLE001  (timm's loader reads the file next and says what is wrong with it)
        return facts
    head, conv = shapes.get(f"{classifier}.weight"), shapes.get(f"{first_conv}.weight")
    if head is not None and len(head) == 2:
        facts["num_classes"] = head[0]
    if conv is not None and len(conv) == 4:
        facts["in_chans"] = conv[1]
    pos = shapes.get("pos_embed")
    kwargs = (spec or {}).get("kwargs")
    try:
        size = to_size(kwargs["img_size"]) if isinstance(kwargs, dict) and "img_size" in kwargs else None
    except ValueError:
        size = None
    if pos is not None and len(pos) == 3 and size is not None:
        h, w, tokens = *size, pos[1]  # pos_embed holds the grid tokens only
        patch = math.isqrt(h * w // tokens) if tokens > 0 and (h * w) % tokens == 0 else 0
        if patch and patch * patch * tokens == h * w and h % patch == 0 and w % patch == 0:
            facts["grid"] = (h // patch, w // patch)
    return facts


def build_family_model(
    model_cls: type, variant: str, pretrained: bool, filter_fn: Any, default_out_indices: Any, **kwargs: Any
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for one of our families: ``features_only=True`` wraps the model in timm's
    FeatureGetterNet (``out_indices``, else ``default_out_indices``); the pretrained cfg records the input size the
    model was built for (and, with ``in_chans`` other than 3, a mean and std per channel), so timm's data config
    resolves to it.

    ``pretrained=True`` with a file (``pretrained_cfg_overlay=dict(file=...)``) takes the file's own classes and
    input channels as the source's, so timm keeps a trained head when ``num_classes`` matches it (and drops it only
    when it does not) and knows the file's input channels (timm 1.0.31 and later adapt the first conv from them); a
    checkpoint of this project's trainers also tells the plain family's filter the grid its position embedding was
    trained on."""
    from timm.models import build_model_with_cfg, get_pretrained_cfg
    from timm.models._features import FeatureGetterNet  # (not re-exported by timm.models)

    if kwargs.get("img_size") is not None:  # as a pair of ints before timm reads it too (numpy ints included)
        kwargs["img_size"] = to_size(kwargs["img_size"])
    grid_token = None
    overlay = kwargs.get("pretrained_cfg_overlay")
    if pretrained and isinstance(overlay, dict) and (overlay.get("file") or overlay.get("state_dict") is not None):
        default = get_pretrained_cfg(variant)
        facts = _file_facts(overlay, default.classifier, default.first_conv)
        overlay = dict(overlay)
        if "num_classes" in facts:
            overlay.setdefault("num_classes", facts["num_classes"])
        if "in_chans" in facts and "input_size" not in overlay:
            overlay["input_size"] = (facts["in_chans"], *default.input_size[1:])
        kwargs["pretrained_cfg_overlay"] = overlay
        grid_token = SOURCE_GRID.set(facts.get("grid"))
    out_indices = kwargs.pop("out_indices", default_out_indices) if kwargs.get("features_only") else None
    if torch.get_default_device().type == "meta":  # `with torch.device("meta"):`
        if kwargs.get("device") is None:
            kwargs["device"] = "meta"
        place: Any = torch.device("cpu")  # built on the host (see check_device), then placed
    else:
        place = contextlib.nullcontext()
    try:
        with place:
            model = build_model_with_cfg(
                model_cls,
                variant,
                pretrained,
                pretrained_filter_fn=filter_fn,
                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                model_name=variant,
                **kwargs,
            )
    finally:
        if grid_token is not None:
            SOURCE_GRID.reset(grid_token)
    net = model.model if isinstance(model, FeatureGetterNet) else model  # features_only: the wrapper holds it
    cfg = dict(model.pretrained_cfg)
    in_chans = net.init_args["in_chans"]
    cfg["input_size"] = (in_chans, *net.img_size)
    for key in ("mean", "std"):  # timm's data config takes these as they are: one value per input channel
        if cfg.get(key) is not None and len(cfg[key]) != in_chans:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * in_chans
    if cfg.get("pool_size") is not None and hasattr(net, "stages"):  # the hierarchical family's last grid
        cfg["pool_size"] = tuple(net.stages[-1].grid)
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def take_indices(num: int, indices: Any, what: str) -> tuple[list[int], int]:
    """The layers a feature call takes, in timm's forms: None (all ``num``), an int n (the last n), or a sequence of
    ints (negative ones count from the end). Returns the absolute indices in layer order, each once, and the last.

    Raises:
        ValueError: naming the value given and the range that fits ``num`` ``what`` (e.g. ``"blocks"``).
    """
    if indices is None:
        return list(range(num)), num - 1
    if isinstance(indices, Integral) and not isinstance(indices, bool):
        if not 1 <= indices <= num:
            raise ValueError(f"indices={indices!r}: an int takes the last n of the {num} {what}; use 1 to {num}")
        return list(range(num - int(indices), num)), num - 1
    values = list(indices) if isinstance(indices, Sequence) and not isinstance(indices, str) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, Integral) for v in values):
        raise ValueError(f"indices={indices!r}: give None, an int (the last n) or a list of ints")
    if not values:
        raise ValueError(f"indices={indices!r} is empty; give at least one of the {num} {what}")
    for v in values:
        if not -num <= v < num:
            raise ValueError(
                f"indices={indices!r}: {v} is out of range for {num} {what}; use 0 to {num - 1} or -{num} to -1"
            )
    take = sorted({int(v) % num for v in values})
    return take, take[-1]


class LayerOrders:
    """Which orders each layer scans and whether it searches over them.

    Attributes:
        per_layer: one tuple of order names per layer, in model order.
        search: layers own ``arch_logits`` over their orders (a supernet).
        space: the search space (search and derived models), else None.
        arch: the arch (derived models), else None.
    """

    def __init__(
        self, per_layer: list[tuple[str, ...]], search: bool, space: SearchSpace | None, arch: ArchSpec | None
    ) -> None:
        self.per_layer, self.search, self.space, self.arch = per_layer, search, space, arch


def resolve_layer_orders(
    labels: Sequence[str],
    model_name: str,
    orders: OrdersSpec | None = None,
    space: SpaceSpec | None = None,
    arch: ArchSpecLike | None = None,
) -> LayerOrders:
    """Exactly one of: fixed ``orders`` for every layer (baselines), a search ``space`` (supernets), an ``arch``.

    Raises:
        TypeError: none of the three is given (derived entrypoints require ``arch=``).
        ValueError: more than one is given, an order name is unknown, or the arch does not fit the model.
    """
    given = [n for n, v in (("orders", orders), ("space", space), ("arch", arch)) if v is not None]
    if not given:
        raise TypeError(f"{model_name} requires arch= (an arch YAML path, a dict or an ArchSpec)")
    if len(given) > 1:
        raise ValueError(
            f"{model_name}: pass only one of orders=, space=, arch= (got {', '.join(given)}; an entry point that scans "
            f"its own orders, like vim_tiny or the *_search ones, sets orders= or space= itself: for a supernet use "
            f"a *_search entry point, for a derived model local_vim_tiny / local_vmamba_tiny or their mini/test sizes)"
        )
    n = len(labels)
    if orders is not None:
        if isinstance(orders, str) or not orders:
            raise ValueError(f"{model_name}: orders must be a non-empty list of order names, got {orders!r}")
        names = tuple(validate_order_name(o) for o in orders)
        if len(set(names)) != len(names):
            raise ValueError(f"{model_name}: repeated orders in {list(names)}")
        return LayerOrders([names] * n, False, None, None)
    if space is not None:
        sp = load_space(space)
        return LayerOrders([sp.candidates] * n, True, sp, None)
    spec = load_arch(arch)  # type: ignore[arg-type]
    spec.check_compatible(labels, spec.space, model_name)
    # Layers the arch leaves unlabelled take the model's labels, so the model's arch is a complete arch file.
    spec = spec.with_labels(labels)
    return LayerOrders([tuple(o) for o in spec.orders], False, spec.space, spec)


class ArchModelMixin:
    """Architecture-parameter API shared by both families; the model sets ``search_space``, ``arch`` and
    ``derived_model_name`` and implements :meth:`arch_labels` and :meth:`named_mixers`."""

    search_space: SearchSpace | None
    arch: ArchSpec | None
    derived_model_name: str | None

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile`` with Inductor's layout optimization off (:mod:`supernet.compile`): a ``mode`` becomes
        that mode's Inductor options plus ``layout_optimization=False``. Other backends, explicit ``options`` and
        positional arguments pass through unchanged."""
        if not args and kwargs.get("backend", "inductor") == "inductor" and "options" not in kwargs:
            from .compile import compile_options

            kwargs.update(compile_options(self, kwargs.pop("mode", None)))
        super().compile(*args, **kwargs)

    def named_mixers(self) -> list[tuple[str, MultiOrderMixer]]:
        """(label, mixer) of every layer, in model order."""
        raise NotImplementedError

    def arch_labels(self) -> list[str]:
        """Stable per-layer labels in model order (e.g. ``"blocks.3"``, ``"stages.2.blocks.1"``)."""
        return [label for label, _ in self.named_mixers()]

    @property
    def is_search(self) -> bool:
        return any(m.search for _, m in self.named_mixers())

    def arch_parameters(self) -> list[nn.Parameter]:
        """Every ``arch_logits`` (one (K,) per layer) of a supernet; empty for other models."""
        return [m.arch_logits for _, m in self.named_mixers() if m.arch_logits is not None]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter; with :meth:`arch_parameters`, a partition."""
        arch_ids = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch_ids]  # type: ignore[attr-defined]

    def arch_probs(self) -> dict[str, torch.Tensor]:
        """label → softmax(arch_logits) over the space's candidates (detached fp32 CPU); empty for other models."""
        return {label: m.arch_probs() for label, m in self.named_mixers() if m.arch_logits is not None}

    def set_arch_mode(self, mode: str, tau: float = 1.0, top_m: int = 1) -> None:
        """How supernet layers mix their orders: ``softmax`` (DARTS), ``gumbel`` (temperature ``tau``, every order
        computed) or ``hard`` (Gumbel top-``top_m`` straight-through: only the sampled orders are computed).

        Sampling happens in training mode only, from the default generator of the model's device. In eval mode
        ``gumbel`` uses the plain softmax and ``hard`` the ``top_m`` orders derivation keeps (the most probable, the
        space's ``min_global`` global ones reserved, ties toward the earlier candidate).
        """
        if not self.is_search:
            raise RuntimeError(f"set_arch_mode: {type(self).__name__} has fixed orders (no arch_logits)")
        for _, m in self.named_mixers():
            m.set_arch_mode(mode, tau=tau, top_m=top_m)

    def _branch_weights(self) -> list[Branch]:
        """Every layer's merge weights and computed orders, in model order: a supernet's layers drawn as one batch
        (:func:`~supernet.mixer.batched_branch_weights`)."""
        return batched_branch_weights([m for _, m in self.named_mixers()])

    def _mixer_no_weight_decay(self) -> set[str]:
        # A_log, D and the per-order biases are stacked on K, so ndim > 1: name them, as Mamba does.
        names = set()
        for name, _ in self.named_parameters():  # type: ignore[attr-defined]
            if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_proj_bias", "conv1d_bias", "arch_logits"):
                names.add(name)
        return names
