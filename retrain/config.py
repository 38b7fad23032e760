"""Run configuration: a flat dict resolved from defaults, a YAML file, CLI flags and Python overrides.

Precedence, lowest first: the script's ``DEFAULTS`` → ``-c/--config FILE.yaml`` → kebab-case CLI flags → ``overrides``
(a dict from Python, e.g. a Ray Tune trial). Flags are generated from the defaults, so every key has exactly one name
everywhere (``batch_size`` in YAML and Python, ``--batch-size`` on the command line). Unlike timm's train.py, an unknown
key or a value of the wrong type is an error that names the key and the nearest valid one.

Types come from the default values: ``bool`` (``--x`` / ``--no-x``), ``int``, ``float`` (ints accepted), ``str``,
``list``/``tuple`` (``--x 1 2 3``; the element type of the default), and ``None`` defaults, which take any YAML scalar
(``--clip-grad 1.0`` gives a float, ``--resume auto`` a string, ``--clip-grad none`` resets to ``None``).
"""

from __future__ import annotations

import argparse
import ast
import contextvars
import difflib
import io
import os
import re
import signal
import sys
import tempfile
import tokenize
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence

import yaml

__all__ = [
    "ConfigError",
    "OneLineArgumentParser",
    "MODEL_ARGS_SET_BY_FLAGS",
    "check_model_kwargs",
    "defaults_help",
    "given_settings",
    "load_config",
    "nearest_flag",
    "one_line_warning",
    "unknown_kwarg_hint",
    "plain_value",
    "resolve_config",
    "run_cli",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key and what to do."""


def one_line(msg: Any, limit: int | None = None) -> str:
    """A message's text on one line (runs of whitespace as one space), cut to ``limit`` characters if given."""
    text = " ".join(str(msg).split())
    return text if limit is None else text[:limit]


def nearest_key(key: str, valid: Sequence[str], list_valid: bool = False) -> str:
    """``"; did you mean 'x'?"`` for the valid name nearest to an unknown one; with none near, ``""`` or (with
    ``list_valid``) ``"; valid: a, b, ..."``."""
    # A valid key that the unknown one extends or abbreviates ('lr_rate' -> 'lr') beats mere spelling likeness.
    key, valid = str(key), [str(v) for v in valid]
    parts = [v for v in valid if key.startswith(v + "_") or v.startswith(key + "_")]
    near = sorted(parts, key=len, reverse=True)[:1] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if near:
        return f"; did you mean '{near[0]}'?"
    return f"; valid: {', '.join(valid)}" if list_valid else ""


# Constructor arguments both trainers set from their flags or the data ("": the data); each adds its own.
MODEL_ARGS_SET_BY_FLAGS = {
    "num_classes": "",
    "in_chans": "--in-chans",
    "img_size": "--img-size",
    "patch_size": "--patch-size",
    "drop_path_rate": "--drop-path",
}


def check_model_kwargs(model_kwargs: Mapping[str, Any], owned: Mapping[str, str]) -> None:
    """Refuse ``model_kwargs`` entries that a trainer sets itself (``owned``: argument -> the flag that sets it, or
    ``""`` when the data decides it): a model built against the data's channels or classes would fail mid-run, and a
    silently ignored size would train another model than asked.

    Raises:
        ConfigError: one line naming the entry and what sets it instead.
    """
    for key in model_kwargs:
        if key in owned:
            flag = owned[key]
            how = f"use {flag} instead" if flag else "the trainer takes it from the dataset; drop it"
            raise ConfigError(f"--model-kwargs {key}={model_kwargs[key]!r}: {key} is set by the trainer; {how}")


def nearest_flag(arg: str, keys: Sequence[str]) -> str:
    """``"; did you mean '--key'?"`` for the config key nearest to a command-line argument (``--flag[=value]``), or
    ``""``."""
    hint = nearest_key(arg.lstrip("-").split("=")[0].replace("-", "_"), list(keys))
    return hint.replace("'", "'--", 1).replace("_", "-") if hint else hint


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``error: ...; see PROG --help``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")


def _type_name(default: Any) -> str:
    if default is None:
        return "a scalar or null"
    if isinstance(default, (list, tuple)):
        elem = _type_name(default[0]) if default else "any"
        return f"a list of {elem}"
    if isinstance(default, dict):
        return "a mapping of names to values (CLI: key=value ...)"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(type(default), "a value")


# The mode a new file gets from open() under this process's umask (read once, at import, before any thread starts:
# os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

# Exponent notation without a dot (1e-3, 5E4): numbers to a person and to YAML 1.2, strings to PyYAML (YAML 1.1).
_YAML11_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Check ``value`` against the type of ``default`` and return it in that type (ints widen to floats)."""

    def bad() -> ConfigError:
        return ConfigError(f"{source}: '{key}' must be {_type_name(default)}, got {value!r} ({type(value).__name__})")

    if default is None:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise bad()
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; a person means the number
        raise bad()
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if default:
            return [_coerce(f"{key}[{i}]", v, default[0], source) for i, v in enumerate(value)]
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad()
        return dict(value)
    raise ConfigError(f"{source}: '{key}' has a default of unsupported type {type(default).__name__}")


def _cli_scalar(text: str) -> Any:
    """Parse a CLI value for a key whose default is ``None``: YAML scalars, with ``none``/``null`` meaning None."""
    if text.lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) or value is None else text


def unknown_kwarg_hint(model_name: str, error: TypeError) -> str:
    """``"; did you mean 'embed_dim'?"`` for the keyword argument a model's constructor refused (``error``), from the
    parameters of the class that refused it (ours or timm's); ``""`` when the error or the class says nothing."""
    import inspect

    import timm

    found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(error))
    if not found:
        return ""
    try:
        module = sys.modules[timm.models.model_entrypoint(model_name).__module__]
        params = inspect.signature(getattr(module, found.group(1))).parameters.values()
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        return ""
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return nearest_key(found.group(2), named)


def _cli_pair(text: str) -> tuple[str, Any]:
    """``key=value`` for a mapping flag (``--model-kwargs embed_dim=160 depth=8``); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:  # argparse shows this message (a ValueError would show the function's name)
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. embed_dim=160, got '{text}'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def _cli_typed(default: Any) -> Callable[[str], Any]:
    """argparse ``type=`` for one element; errors are turned into ConfigError by the caller."""
    if default is None:
        return _cli_scalar
    if isinstance(default, bool):
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    return type(default)


def defaults_help(source: str | Path, name: str = "DEFAULTS") -> dict[str, str]:
    """``--help`` texts for a CLI's settings: the comment on each key's line of the ``name`` dict literal in the
    module file ``source`` (``"epochs": 10,  # the text``). Keys without a comment get none; an unreadable source gives
    an empty dict (the flags still list their defaults)."""
    try:
        text = Path(source).read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, SyntaxError, ValueError):
        return {}
    lines = text.splitlines()
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        value = getattr(node, "value", None)
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets) or not isinstance(value, ast.Dict):
            continue
        for key in value.keys:
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                continue
            comments = []
            try:  # a value opening a bracket it closes on a later line ends the line's tokens with an error
                for tok in tokenize.generate_tokens(io.StringIO(lines[key.lineno - 1] + "\n").readline):
                    if tok.type == tokenize.COMMENT:
                        comments.append(tok.string[1:].strip())
            except (tokenize.TokenError, IndentationError):
                pass
            if comments and comments[-1]:
                found[key.value] = comments[-1]
    return found


def _build_parser(
    defaults: Mapping[str, Any], description: str, helps: Mapping[str, str] | None = None
) -> argparse.ArgumentParser:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # run as `python -m nas.search`: say that
    prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None and spec.name else None
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        exit_on_error=False,
    )
    parser.add_argument("-c", "--config", metavar="FILE.yaml", help="YAML file of settings (CLI flags override it)")
    for key, default in defaults.items():
        flag = "--" + key.replace("_", "-")
        text = (helps or {}).get(key, "")
        help_text = (f"{text} (default: {default!r})" if text else f"(default: {default!r})").replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, help=help_text)
        elif isinstance(default, (list, tuple)):
            elem = default[0] if default else None
            parser.add_argument(flag, dest=key, nargs="*", type=_cli_typed(elem), metavar="V", help=help_text)
        elif isinstance(default, dict):
            parser.add_argument(flag, dest=key, nargs="*", type=_cli_pair, metavar="K=V", help=help_text)
        else:
            parser.add_argument(flag, dest=key, type=_cli_typed(default), metavar="V", help=help_text)
    return parser


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently: ``epochs: 2`` then ``epochs: 3`` would train 3 epochs with nothing said)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" merges a mapping; the base class expands it
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):  # unhashable keys: the base class reports them
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (a preset or a saved ``args.yaml``); no validation here."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path.resolve()} is a folder; pass a YAML file to -c/--config")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path.resolve()}; check the path given to -c/--config")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(one_line(f"config file {path}: not valid YAML ({e})")) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not a text file; pass a YAML file to -c/--config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _merge(cfg: dict[str, Any], updates: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> None:
    for key, value in updates.items():
        key = str(key)
        if key not in defaults:
            valid = list(defaults)
            # Accept kebab-case keys in YAML too, but never silently: they must still name a known key.
            if key.replace("-", "_") in defaults:
                key = key.replace("-", "_")
            else:
                raise ConfigError(f"{source}: unknown key '{key}'{nearest_key(key, valid)}")
        cfg[key] = _coerce(key, value, defaults[key], source)


def resolve_config(
    defaults: Mapping[str, Any],
    argv: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    description: str = "",
    helps: Mapping[str, str] | None = None,
    set_by: set[str] | None = None,
) -> dict[str, Any]:
    """Resolve a run configuration.

    Args:
        defaults: every valid key with its default value; the default's type is the key's type.
        argv: command-line arguments (without the program name); ``None`` means none (not ``sys.argv``), so that
            calling from Python never picks up a foreign command line.
        overrides: values set from Python; they win over YAML and CLI.
        description: the ``--help`` text.
        set_by: if given, receives the keys that the command line and its ``-c`` file set.

    Returns:
        A new flat dict with exactly the keys of ``defaults``.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML file.
    """
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()}
    set_by = set() if set_by is None else set_by
    if argv:
        parser = _build_parser(defaults, description, helps)
        try:
            ns, unknown = parser.parse_known_args(list(argv))
        except argparse.ArgumentError as e:  # a bad value for a typed flag
            raise ConfigError(one_line(f"command line: {e}; see --help")) from None
        except SystemExit as e:
            if e.code == 0:  # --help
                raise
            raise ConfigError("command line: could not parse the arguments (see the message above)") from None
        if unknown:
            first = next((u for u in unknown if u.startswith("--")), unknown[0])
            raise ConfigError(f"command line: unknown argument '{first}'{nearest_flag(first, defaults)}")
        given = vars(ns)
        for key, value in given.items():
            if isinstance(defaults.get(key), dict):  # key=value pairs from the command line
                given[key] = dict(value)
        config_file = given.pop("config", None)
        if config_file:
            from_file = load_config(config_file)
            _merge(cfg, from_file, defaults, f"config file {config_file}")
            set_by |= set(from_file)
        _merge(cfg, given, defaults, "command line")
        set_by |= set(given)
    if overrides:
        _merge(cfg, overrides, defaults, "overrides")
    return cfg


# The settings a command line (or its -c file) gave, while run_cli runs its main: see given_settings().
_GIVEN: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("scan_nas_given", default=None)


def given_settings() -> frozenset[str] | None:
    """Inside a ``main`` that :func:`run_cli` called: the keys its command line or ``-c`` file set (a value given
    equal to its default included); None when ``main`` was called from Python, whose dict says the same."""
    return _GIVEN.get()


def plain_value(value: Any) -> Any:
    """Containers as plain lists and dicts (tuples as lists, keys as strings) and paths as text, recursively: what
    YAML and a checkpoint store, so a value read back compares equal to the one written."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write the resolved config as YAML (temporary file, then rename), in key order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)  # mkstemp's file is private (0600); the run's other files follow the umask
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(plain_value(dict(cfg)), f, sort_keys=False, default_flow_style=None, width=120)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def run_cli(
    main_fn: Callable[[dict[str, Any]], Any],
    defaults: Mapping[str, Any],
    argv: Sequence[str] | None = None,
    description: str = "",
    helps: Mapping[str, str] | None = None,
) -> int:
    """The thin shell around ``main(cfg)``: resolve the config, run, and turn user errors into one line (``helps``:
    the settings' ``--help`` texts, see :func:`defaults_help`).

    Configuration, data, arch-file, checkpoint and file-system errors (``ValueError`` and ``OSError`` families)
    print ``error: <one line>`` on stderr and return 2; a run that a signal stopped (``main`` returned
    ``interrupted``) returns 128 + the signal's number, as a shell reports it; a collective that fails because another
    rank died or timed out prints one line and returns 1; ``--debug`` (or ``debug: true``) shows the traceback too.

    Returns:
        The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:  # warnings as one line each, like the errors (Python's own echo the source line below the message)
        warnings.showwarning = one_line_warning
    try:
        set_by: set[str] = set()
        cfg = resolve_config(defaults, argv, description=description, helps=helps, set_by=set_by)
        debug = debug or bool(cfg.get("debug", False))
        token = _GIVEN.set(frozenset(set_by))
        try:
            result = main_fn(cfg)
        finally:
            _GIVEN.reset(token)
    except (ValueError, OSError) as e:  # OSError: files and folders (missing, read-only, a file where a folder goes)
        if debug:
            traceback.print_exc()
        print(f"error: {_user_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        rank = _lost_peer_rank(e)
        if rank is None:
            raise
        if debug:
            traceback.print_exc()
        print(
            f"error: rank {rank} lost contact with the other ranks ({one_line(e, 200)}); another rank died or hung; "
            f"rerun the same command with --resume auto to continue from the newest complete checkpoint",
            file=sys.stderr,
        )
        return 1
    # A run stopped by a signal saved its checkpoint and said how to continue; a script running it must stop too:
    # the shell's status for that signal (130 for SIGINT, 143 for SIGTERM).
    if isinstance(result, Mapping) and result.get("interrupted"):
        return 128 + int(result.get("signal") or signal.SIGINT)
    return 0


def _user_message(e: BaseException) -> str:
    """The error's message on one line; from a DataLoader worker (``Caught X in DataLoader worker process N`` and the
    worker's traceback), the worker's own message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ": ") else last
    return one_line(text)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """``warnings.showwarning`` for the command-line tools: ``warning: <one line>``, without Python's source line."""
    print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file)


def _lost_peer_rank(e: RuntimeError) -> int | None:
    """This process's rank when ``e`` is a collective that failed because a peer died or timed out, else None."""
    dist = sys.modules.get("torch.distributed")  # only loaded by runs that can be distributed
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return None
    msg = str(e)
    comm = isinstance(e, getattr(dist, "DistError", ())) or any(
        word in msg
        for word in (
            "gloo",
            "Connection reset",
            "Connection closed",
            "NCCL",
            "timed out",
            "Timed out",
            "Application timeout",  # gloo's pair closed by --dist-timeout: a peer hung (stopped, not dead)
        )
    )
    return dist.get_rank() if comm else None
