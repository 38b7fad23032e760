"""Vision Mamba models for scan-direction search, all registered with timm on import.

``import supernet`` registers every entrypoint, so ``timm.create_model(name, **kwargs)`` builds it:

* plain (Vim-like, :mod:`supernet.vim`): ``vim_tiny``, ``vim_small``, ``local_vim_tiny_search``, ``local_vim_tiny``,
  ``local_fixed_vim_tiny``, ``vim_mini``, ``local_vim_mini_search``, ``local_vim_mini``, ``local_fixed_vim_mini``,
  ``test_vim``, ``test_local_vim_search``, ``test_local_vim``, ``test_local_fixed_vim``;
* hierarchical (VMamba-like, :mod:`supernet.vmamba`): ``vmamba_tiny``, ``local_vmamba_tiny_search``,
  ``local_vmamba_tiny``, ``vmamba_mini``, ``local_vmamba_mini_search``, ``local_vmamba_mini``,
  ``local_fixed_vmamba_mini``, ``test_vmamba``, ``test_local_vmamba_search``, ``test_local_vmamba``.

``*_search`` entrypoints are supernets (``space=``, ``mix=``); their children (the same name without ``_search``)
require ``arch=``. Both are built from one block, :class:`supernet.mixer.MultiOrderMixer`.
"""

from . import vim, vmamba  # noqa: F401  (registers the entrypoints with timm)
from .compile import compile_model, compile_options
from .derive import create_derived, derive_arch, list_models, load_supernet_weights, supernet_state_for_child
from .flops import count_params_flops
from .mixer import ARCH_MODES, MultiOrderMixer, slice_mixer_state
from .slws import draw_shuffle, shuffle_tokens, slws_probs, unshuffle_tokens
from .vim import VisionMamba
from .vmamba import VMamba

__all__ = [
    "ARCH_MODES",
    "MultiOrderMixer",
    "VMamba",
    "VisionMamba",
    "compile_model",
    "compile_options",
    "count_params_flops",
    "create_derived",
    "derive_arch",
    "draw_shuffle",
    "list_models",
    "load_supernet_weights",
    "shuffle_tokens",
    "slice_mixer_state",
    "slws_probs",
    "supernet_state_for_child",
    "unshuffle_tokens",
]
