"""Checkpoint resolution and loading: Hugging Face repo ids, local directories, official `.pth` files, URLs.

Shared by every network loader of the package:

* `resolve_files` finds files of a hub repo (through `huggingface_hub`: cache, `HF_HUB_OFFLINE`,
  revisions) or of a local directory, and explains what to do when they are not available. Without
  a network connection it goes straight to the cache instead of retrying for a minute.
* `load_pretrained` reads a checkpoint into a `Checkpoint` (constructor kwargs + state dict),
  from `config.json` + `model.safetensors` or from an official Naver `.pth`
  (`{"args": Namespace(model="Class(kw=...)"), "model": state_dict}`), without running code
  from the file: `load_torch_file` unpickles with an allow-list (tensors, plain containers,
  `argparse.Namespace`; training-only objects of Lightning / omegaconf / numpy become inert
  placeholders), the same way on every torch version, and the constructor string is parsed as
  literals only.
* `cached_download` fetches a URL once into torch hub's checkpoint folder; `download_weights`
  fills the caches with every file the default metric needs (for preparing an offline machine).
* `load_state_dict_strict` loads weights and names missing / unexpected keys in its error.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import codecs
import collections
import functools
import hashlib
import inspect
import json
import logging
import os
import pickle
import re
import socket
import sys
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Hugging Face repos of the geometry networks the reference MEt3R uses
DEFAULT_REPO_IDS = {
    "mast3r": "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric",
    "dust3r": "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt",
}
# seconds to wait for a TCP connection before a download is given up as offline
CONNECT_TIMEOUT_S = 5.0
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# names allowed inside an official constructor string, e.g. depth_mode=('exp', -inf, inf)
_LITERAL_NAMES = {"inf": float("inf"), "nan": float("nan"), "True": True, "False": False, "None": None}


@dataclass
class Checkpoint:
    """A checkpoint read from disk: constructor kwargs, state dict, official class name if known, config file."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    class_name: str | None = None
    source: str = ""


# --------------------------------------------------------------------------------------------
# network and paths


def check_connection(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConnectionError within `timeout` seconds when `url`'s host (or its proxy) cannot be reached."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:  # DNS failure, refused, unreachable, timed out
        raise ConnectionError(f"cannot connect to {host}:{port} ({err})") from err


def looks_like_local_path(name: PathLike) -> bool:
    """Whether `name` can only mean a local path, not a Hugging Face repo id ("namespace/name")."""
    text = os.fspath(name)
    if text.startswith((".", "/", "~")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        return True
    if Path(text).suffix in (*_TORCH_SUFFIXES, ".safetensors", ".json"):
        return True
    namespace, _, repo = text.partition("/")
    if not namespace or not repo or "/" in repo:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    # `weights/mast3r` next to an existing `weights/` folder is a path with a typo, not a repo
    return Path(namespace).is_dir()


def resolve_files(
    name_or_path: PathLike,
    filenames: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME),
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool | None = None,
) -> dict[str, Path]:
    """Local paths of `filenames` from a local directory or a Hugging Face repo id.

    Without a network connection (checked with a `CONNECT_TIMEOUT_S` connect), only the cache is
    used. Raises FileNotFoundError naming every missing file and how to provide it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        missing = [f for f in filenames if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is missing {', '.join(missing)} (expected files: {', '.join(filenames)})")
        return {f: path / f for f in filenames}
    repo_id = os.fspath(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"{path}: not a directory with {', '.join(filenames)} and not a {'/'.join(_TORCH_SUFFIXES)} file")
    if looks_like_local_path(repo_id):
        raise FileNotFoundError(f"{name_or_path}: no such file or directory (a local path, not a Hugging Face repo id)")

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError

    offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
    why = "offline mode" if offline else "not in the cache and the download failed"
    if not offline:
        try:
            check_connection(constants.ENDPOINT)
        except ConnectionError as err:
            offline, why = True, f"not in the cache and no network connection to {constants.ENDPOINT}: {err}"
            logger.info("%s unreachable (%s): using the Hugging Face cache only", constants.ENDPOINT, err)
    resolved, missing, reasons = {}, [], []
    for filename in filenames:
        try:
            resolved[filename] = Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline
            ))
        except (EntryNotFoundError, HfHubHTTPError) as err:  # incl. LocalEntryNotFoundError, unknown repo / revision
            missing.append(filename)
            reasons.append(f"{filename}: {type(err).__name__}")
    if missing:
        cache = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"Could not get {', '.join(missing)} of '{repo_id}' (revision {revision or 'main'}): {why} "
            f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, cache: {cache}; {'; '.join(reasons)}; "
            f"no local path '{repo_id}' exists either).\n"
            f"To provide them: on a machine with internet access run "
            f"`hf download {repo_id} {' '.join(filenames)}` (or `met3r_diffusers.hub.download_weights()`) "
            f"and copy the cache to {cache} (or pass cache_dir=), or put {', '.join(filenames)} in a local "
            f"directory and pass its path, or pass the path of an official .pth checkpoint."
        )
    return resolved


def cached_download(
    url: str, file_name: str | None = None, cache_dir: PathLike | None = None, what: str = "checkpoint"
) -> Path:
    """Local copy of `url` in `cache_dir` (default `<torch hub dir>/checkpoints`) under `file_name`
    (default: the URL's base name), downloaded once; fails fast (FileNotFoundError) when offline."""
    model_dir = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    target = model_dir / (file_name or os.path.basename(urllib.parse.urlparse(url).path))
    if target.is_file():
        return target
    try:
        check_connection(url)
        model_dir.mkdir(parents=True, exist_ok=True)
        logger.info("downloading the %s checkpoint %s to %s", what, url, target)
        torch.hub.download_url_to_file(url, os.fspath(target))  # via a temporary file: never half-written
    except OSError as err:  # no connection, URLError / HTTPError, unwritable cache
        raise FileNotFoundError(
            f"the {what} checkpoint is not cached and could not be downloaded from {url} ({err}). "
            f"Download it on a machine with network access and put it at {target}, or pass its local path."
        ) from err
    return target


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# reading torch.save files without running code from them

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
# packages whose objects appear in training containers but never in weights: Lightning callbacks and
# hyper-parameters (AttributeDict, callback classes as keys in old versions), omegaconf configs, numpy
# scalars, typing.Any / pathlib paths inside those. They are rebuilt as inert placeholders, never imported.
OPAQUE_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "typing", "pathlib")


class _StorageType:
    """What the unpickler returns for `torch.<Type>Storage`: the element dtype of a stored buffer."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class OpaqueObject(dict):
    """Inert stand-in for an object of an allow-listed foreign class (see `OPAQUE_PACKAGES`).

    It keeps what the pickle gave it (constructor arguments, state, items) and runs no code of the class.
    """

    __hash__ = object.__hash__
    __eq__ = object.__eq__

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        """Keep the pickled state as it is."""
        self.state = state

    def append(self, item: Any) -> None:
        """Keep list items (pickled list subclasses)."""
        self.setdefault("_items", []).append(item)

    def extend(self, items: Any) -> None:
        """Keep list items (pickled list subclasses)."""
        self.setdefault("_items", []).extend(items)


@functools.lru_cache(maxsize=None)
def _opaque_class(module: str, name: str) -> type:
    return type(name.rpartition(".")[2], (OpaqueObject,), {"__module__": module, "__qualname__": name})


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    # backward hooks and metadata (Python-side extras) are not restored
    tensor = torch.as_strided(storage, size, stride, offset)  # checks the bounds against the storage
    return tensor.requires_grad_(requires_grad) if tensor.is_floating_point() else tensor


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any = None,
                       state: Any = None) -> nn.Parameter:
    return nn.Parameter(data.detach(), requires_grad=requires_grad)


_BUILTINS = ("set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "str", "bytes", "bytearray",
             "bool", "slice")
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **{("builtins", name): getattr(builtins, name) for name in _BUILTINS},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores bytes
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickler of a torch zip archive's `data.pkl` that resolves only allow-listed globals."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        """Allow-listed global, inert placeholder, or UnpicklingError."""
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2's name
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.partition(".")[0] in OPAQUE_PACKAGES:
            return _opaque_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allow-listed")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A stored buffer `('storage', type, key, location, numel)` as a flat CPU tensor (read once per key)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            dtype = storage_type.dtype
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            buffer = bytearray(nbytes)
            with self.archive.open(f"{self.prefix}/data/{key}") as f:
                view, filled = memoryview(buffer), 0
                while filled < nbytes and (count := f.readinto(view[filled:])):
                    filled += count
            if filled != nbytes:
                raise pickle.UnpicklingError(f"storage {key} holds {filled} of its {nbytes} bytes")
            self.storages[key] = torch.frombuffer(buffer, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _load_zip_archive(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("not a torch.save archive (no <name>/data.pkl)")
        prefix = pickles[0].rpartition("/")[0]
        if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder") != sys.byteorder.encode():
            raise pickle.UnpicklingError(f"stored with byte order {archive.read(f'{prefix}/byteorder')!r}")
        with archive.open(pickles[0]) as f:
            return _AllowListUnpickler(f, archive, prefix).load()


def load_torch_file(path: PathLike) -> Any:
    """Contents of a `torch.save` file, read without running code from it (same on every torch version).

    Zip archives (torch >= 1.6) are unpickled here with an allow-list: tensors and parameters, plain
    containers, `argparse.Namespace`, torch dtypes / sizes / devices; objects of `OPAQUE_PACKAGES`
    become `OpaqueObject`s; any other global is refused. Legacy (pre-zip) files go through
    `torch.load(weights_only=True)`. Raises ValueError naming the file when it cannot be read.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip_archive(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused global, a file cut short (no zip directory), not a torch file, ...
        raise ValueError(
            f"{path}: cannot read this checkpoint safely (truncated, corrupt, or it stores code): {err}"
        ) from err


# --------------------------------------------------------------------------------------------
# checkpoints of the geometry networks


def parse_constructor_call(text: str) -> tuple[str, dict[str, Any]]:
    """Parse an official constructor string such as "AsymmetricMASt3R(enc_depth=24, ...)" safely.

    Only literal arguments (numbers, strings, tuples, lists, dicts, inf, float('inf')) are accepted;
    nothing is evaluated. Returns (class name, kwargs).
    """
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse the checkpoint's model string {text!r}: {err}") from err
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.args:
        raise ValueError(f"expected 'ClassName(keyword=value, ...)' as model string, got {text!r}")
    if any(kw.arg is None for kw in call.keywords):
        raise ValueError(f"'**' arguments are not supported in the model string {text!r}")
    return call.func.id, {kw.arg: _literal(kw.value, text) for kw in call.keywords}


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e, text) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k, text): _literal(v, text) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"
            and len(node.args) == 1 and not node.keywords):
        return float(_literal(node.args[0], text))
    raise ValueError(f"unsupported expression {ast.unparse(node)!r} in the model string {text!r}")


def _load_torch_checkpoint(path: Path) -> Checkpoint:
    """Read an official Naver checkpoint: {"args": Namespace(model="Class(...)") | str, "model": state_dict}."""
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        keys = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected an official checkpoint with 'args' and 'model' entries, got {keys}")
    args = ckpt["args"]
    model_string = args.get("model") if isinstance(args, dict) else getattr(args, "model", args)
    if not isinstance(model_string, str):
        raise ValueError(f"{path}: 'args' holds no model constructor string")
    class_name, kwargs = parse_constructor_call(model_string)
    return Checkpoint(config=kwargs, state_dict=ckpt["model"], class_name=class_name, source=str(path))


def load_pretrained(
    name_or_path: PathLike,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool | None = None,
) -> Checkpoint:
    """Read a checkpoint from a local official `.pth`, a local directory or a Hugging Face repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix not in _TORCH_SUFFIXES:
            raise ValueError(f"{path}: expected a directory, a repo id or a {'/'.join(_TORCH_SUFFIXES)} file")
        return _load_torch_checkpoint(path)
    from safetensors.torch import load_file

    files = resolve_files(
        name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    config_file = files[CONFIG_NAME]
    try:
        config = json.loads(config_file.read_text())  # accepts the bare Infinity / -Infinity the hub files hold
    except ValueError as err:
        raise ValueError(f"{config_file}: not a valid JSON config: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object of constructor arguments, got {type(config).__name__}")
    try:
        state_dict = load_file(str(files[WEIGHTS_NAME]))
    except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{files[WEIGHTS_NAME]}: cannot read the weights (truncated or corrupt?): {err}") from err
    return Checkpoint(config=config, state_dict=state_dict, source=str(config_file))


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of `cls(...)`, following `**kwargs` up the class hierarchy."""
    parameters: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__)
        for name, parameter in list(signature.parameters.items())[1:]:
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                parameters.setdefault(name, parameter)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return parameters


def _fits(value: Any, parameter: inspect.Parameter) -> bool:
    """Whether a JSON value can be the argument whose default is `parameter.default`."""
    default, annotation = parameter.default, str(parameter.annotation)
    if value is None:
        return default is None or "None" in annotation
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(default, float) or isinstance(value, int))
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) or (isinstance(value, int) and annotation.startswith("int"))
    return True


def validate_config(cls: type, config: dict[str, Any], source: str) -> None:
    """Raise ValueError naming `source` and the key when `config` has a key or a value type `cls(...)` cannot take."""
    parameters = _constructor_parameters(cls)
    for key, value in config.items():
        if key not in parameters:
            raise ValueError(f"{source}: unknown key {key!r} for {cls.__name__} (accepted: {', '.join(parameters)})")
        if not _fits(value, parameters[key]):
            raise ValueError(
                f"{source}: key {key!r} has the wrong type ({type(value).__name__} {value!r}; "
                f"default {parameters[key].default!r})"
            )


def save_pretrained(state_dict: dict[str, torch.Tensor], config: dict[str, Any], save_directory: PathLike) -> None:
    """Write `config.json` (constructor kwargs) and `model.safetensors`, as huggingface_hub's mixin does."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def _key_list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], assign: bool = False, source: str = "checkpoint"
) -> None:
    """Load `state_dict` into `module`; raise ValueError naming missing / unexpected / mis-shaped keys."""
    try:
        result = module.load_state_dict(state_dict, strict=False, assign=assign)
    except RuntimeError as err:  # size mismatches are reported even with strict=False
        raise ValueError(f"{source} does not fit {type(module).__name__}: {err}") from err
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys: {_key_list(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys: {_key_list(result.unexpected_keys)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# preparing an offline machine


def _record(path: Path, source: str, **extra: str) -> dict[str, str]:
    entry = {"path": str(path), "sha256": file_sha256(path), "source": source, **extra}
    logger.info("%s: %s (sha256 %s)", source, path, entry["sha256"])
    return entry


def download_weights(
    backbone: str = "mast3r",
    use_norm: bool = True,
    cache_dir: PathLike | None = None,
    revision: str | None = None,
) -> dict[str, dict[str, str]]:
    """Fetch every file the default MEt3R needs into the caches it loads from; returns what was fetched.

    Args:
        backbone: "mast3r" or "dust3r": the geometry repo of `DEFAULT_REPO_IDS` (both of its files are
            taken from one commit, recorded as "revision").
        use_norm: which of FeatUp's two dino16 checkpoints (each has its own cache file name).
        cache_dir: as `MEt3R(cache_dir=...)`: the Hugging Face cache and the torch hub checkpoint folder
            both; default: `HF_HUB_CACHE` and `<torch hub dir>/checkpoints`.
        revision: branch, tag or commit of the geometry repo (default "main").

    Returns:
        {"backbone_config" | "backbone_weights" | "featup" [| "dino"]: {"path", "sha256", "source"
        [, "revision"]}}; DINO's own ViT-S/16 file only when the FeatUp checkpoint holds no backbone.
        Raises FileNotFoundError (quickly when offline) naming what could not be fetched.
    """
    if backbone not in DEFAULT_REPO_IDS:
        raise ValueError(f"backbone must be one of {tuple(DEFAULT_REPO_IDS)}, got {backbone!r}")
    from .models.featup import DINO_CHECKPOINT_URL, featup_checkpoint

    repo_id = DEFAULT_REPO_IDS[backbone]
    files = resolve_files(repo_id, revision=revision, cache_dir=cache_dir)
    commits = {p.parent.name for p in files.values()}  # <cache>/models--*/snapshots/<commit>/<file>
    if len(commits) != 1:
        raise FileNotFoundError(f"{repo_id}: {', '.join(files)} resolved to different commits {sorted(commits)}; retry")
    commit = commits.pop()
    fetched = {
        "backbone_config": _record(files[CONFIG_NAME], f"hf://{repo_id}/{CONFIG_NAME}", revision=commit),
        "backbone_weights": _record(files[WEIGHTS_NAME], f"hf://{repo_id}/{WEIGHTS_NAME}", revision=commit),
    }
    url, file_name = featup_checkpoint(use_norm)
    featup_path = cached_download(url, file_name, cache_dir, "FeatUp")
    fetched["featup"] = _record(featup_path, url)
    checkpoint = load_torch_file(featup_path)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    if not any(k.startswith(("model.0.model.", "model.model.")) for k in state_dict):
        fetched["dino"] = _record(cached_download(DINO_CHECKPOINT_URL, None, cache_dir, "DINO ViT-S/16"),
                                  DINO_CHECKPOINT_URL)
    return fetched
