"""Reading PyTorch checkpoints without PyTorch and without running code from the file.

Everything here returns NumPy arrays (``bfloat16`` as ``ml_dtypes.bfloat16``); nothing imports
torch. Pickle streams are read with a *restricted* unpickler: every global the stream names is
looked up in an explicit allow-list of inert stand-ins written here (tensor rebuilders that
produce NumPy arrays, dict types, storage-type markers, placeholder objects for ``torch.nn``
layers). Any other global (``os.system``, ``builtins.eval``, an unknown class, ...) stops the
load with an :class:`UnsafePickleError` that names it, before anything is called.

Formats
-------
:func:`load_state_dict` reads

* ``.safetensors`` (through ``safetensors.numpy``);
* ``torch.save`` zip archives (``.pt``/``.pth``/``.bin``: ``<dir>/data.pkl`` + ``<dir>/data/<key>``
  storages + ``<dir>/byteorder``), the equivalent of ``torch.load(weights_only=True)``: only
  tensors, (ordered) dicts, lists, tuples, numbers, strings, torch dtypes/devices/sizes;
* the legacy (pre-1.6, ``_use_new_zipfile_serialization=False``) torch.save stream, with the same
  allow-list (the ancient tar-based format is not supported and is reported as such).

The format is detected from the content (zip magic, legacy magic number, safetensors header), not
from the suffix.

Nested containers are flattened with dotted names: ``{"model": {"a": {"w": T}}, "step": 3}``
gives ``{"model.a.w": array}``. Only array leaves are kept (numbers, strings and ``None`` are
dropped); list/tuple elements are indexed (``name.0``). ``key="model"`` keeps just the entries
under ``model.`` and strips that prefix.

Official TVM checkpoints
------------------------
:func:`read_official_pickle` reads the released checkpoints: plain Python pickles of a dict such
as ``{"net": <TVMWrapper>, "ema": <TVMWrapper>, ...}`` written with EDM-style persistence. A
persistent module pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}``; here that call builds an inert
:class:`PersistentObject` that keeps ``state`` and keeps ``module_src`` as a string that is never
compiled or run. Plain ``torch.nn`` layers (and timm's ``PatchEmbed``/``Mlp``) are rebuilt as
:class:`ModuleStandIn` objects that only store their ``__dict__``. Tensors arrive through
``torch._utils._rebuild_parameter``/``_rebuild_tensor_v2`` and their storages through
``torch.storage._load_from_bytes(bytes)``; those bytes are a complete ``torch.save`` stream of
their own and are decoded by the weights-only reader above (never by an unrestricted pickle).

The official code's own module classes (``training.dit.Attention`` is not persistent, so every
snapshot names it by reference; the other ``training.dit``/``training.wrapper`` classes too, for
snapshots written without the decorator), timm's ``Mlp``/``PatchEmbed`` under ``timm.layers`` and
``timm.models.layers`` are stand-ins as well. A ``torch.compile``'d network (``OptimizedModule``,
as the official configs train) keeps its module as the ``_orig_mod`` child; its compiler context
and OmegaConf config objects become :class:`OpaqueObject` records (``torch._dynamo.*``,
``torch._inductor.*``, ``omegaconf.*``: never imported, never called). ``training-state-*.pt``
(``torch.save`` of such modules) is read the same way.

Bounds: a storage must be exactly as large as its zip entry (checked before reading, then read in
bounded chunks) or fit in the legacy file's remaining bytes; copies of tensor views may not exceed
twice the storage bytes read plus :data:`VIEW_ALLOWANCE_BYTES`. The allow-listed objects are
immutable: a ``BUILD`` opcode aimed at one is refused.

The DiT's state dict (official names: ``blocks.0.attn.qkv.weight``, ...) is taken from
``entry._modules["model"]`` (the TVMWrapper's network; also through ``_orig_mod``/``module``
wrappers) or from ``entry`` itself when it holds ``blocks`` directly, with
``torch.nn.Module.state_dict`` semantics (parameters, then persistent buffers, then children;
``None`` entries skipped). A top-level entry that is already a dict of
arrays (a plain state dict) counts as a network too. When several networks are present the
caller chooses; the default is ``ema`` (the evaluation weights) if present, else ``net``.

Classes that the official code may pickle by reference but this module does not know can be
allowed explicitly (``allow_classes=["training.dit.DiTBlock"]`` or a ``"training.dit.*"``
pattern): they are rebuilt as inert :class:`ModuleStandIn` objects as well, never imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

__all__ = [
    "UnsafePickleError",
    "CheckpointFormatError",
    "PickledObject",
    "ModuleStandIn",
    "PersistentObject",
    "OfficialCheckpoint",
    "detect_format",
    "read_torch_file",
    "load_state_dict",
    "flatten_arrays",
    "module_state_dict",
    "OpaqueObject",
    "network_recipe",
    "read_official_object",
    "holds_modules",
    "official_checkpoint",
    "read_official_pickle",
    "load_official_pickle",
]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle stream names a global (function/class) that the reader refuses to load."""


class CheckpointFormatError(ValueError):
    """The file is not in a format this module reads, or its content is inconsistent."""


# ----------------------------------------------------------------------------- storages / tensors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A legacy torch.save stream starts with the protocol-2 pickle of the magic number.
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")

_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}


class _Frozen:
    """Base of the reader's own allow-listed values (storage-type markers, tensor-type markers,
    wrapped functions). They are shared by every load, so a pickle must not be able to alter them:
    attributes cannot be set and a ``BUILD`` opcode aimed at one is refused."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"refusing to modify the reader's allow-listed object {self!r}")

    def __setstate__(self, state):
        raise UnsafePickleError(f"refusing a pickle BUILD on the allow-listed object {self!r} (it would alter the "
                                "reader's own objects)")


class _StorageType(_Frozen):
    """Stands for ``torch.FloatStorage`` & co. inside persistent ids; cannot be called."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(_STORAGE_DTYPES[name]))

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _AllowedFunction(_Frozen):
    """An allow-listed function as the unpickler sees it: callable, immutable."""

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable, name: str):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "name", name)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- memory bounds

# A tensor view may materialise more elements than its storage holds (torch.save keeps views, e.g.
# expanded stride-0 tensors, as views; this reader copies them): per file at most twice the storage
# bytes read plus this allowance.
VIEW_ALLOWANCE_BYTES = 64 << 20
# Deflate cannot inflate more than ~1032:1; a zip entry claiming more is not a real storage.
_MAX_INFLATE_RATIO = 1100
_READ_CHUNK = 16 << 20


class _MemoryBudget:
    """What one file may make the reader allocate: storages are bounded by the bytes the file
    really holds (checked where they are read); copies of tensor views by the storages read."""

    def __init__(self):
        self.storage_bytes = 0
        self.view_bytes = 0

    def charge_view(self, nbytes: int, describe: Callable[[], str]) -> None:
        allowed = 2 * self.storage_bytes + VIEW_ALLOWANCE_BYTES
        if self.view_bytes + nbytes > allowed:
            raise CheckpointFormatError(
                f"{describe()} would materialise {nbytes:,} bytes, more than the file's storages can account for "
                f"({self.storage_bytes:,} bytes of storage read; a view may not expand beyond 2x that + "
                f"{VIEW_ALLOWANCE_BYTES >> 20} MiB): damaged or malicious file")
        self.view_bytes += nbytes


_BUDGET: contextvars.ContextVar[_MemoryBudget | None] = contextvars.ContextVar("torch_io_budget", default=None)


@contextlib.contextmanager
def _budget_scope():
    """One budget per file read; nested loads (``_load_from_bytes`` payloads) share the outer one."""
    if _BUDGET.get() is not None:
        yield _BUDGET.get()
        return
    budget = _MemoryBudget()
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _budget() -> _MemoryBudget:
    budget = _BUDGET.get()
    return budget if budget is not None else _MemoryBudget()


def _read_bounded(f, n: int, where: str, what: str) -> bytearray:
    """Exactly ``n`` bytes from ``f``, read in bounded chunks (never more than ``n``)."""
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        chunk = f.read(min(_READ_CHUNK, n - pos))
        if not chunk:
            raise CheckpointFormatError(f"{where}: {what} is truncated (wanted {n} bytes, got {pos})")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return buf


class _Storage:
    """A loaded (or, in the legacy format, not yet loaded) storage: a flat NumPy array."""

    __slots__ = ("dtype", "numel", "array")

    def __init__(self, dtype: np.dtype, numel: int, array: np.ndarray | None = None):
        self.dtype, self.numel, self.array = dtype, numel, array


class _PendingTensor:
    """A tensor whose storage bytes come later in the stream (legacy format only)."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        if self.storage.array is None:
            raise CheckpointFormatError("a tensor refers to a storage whose data is missing from the file")
        return _strided_copy(self.storage.array, self.offset, self.size, self.stride)


def _strided_copy(flat: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """``torch.as_strided(storage, size, stride, offset)`` as an owned, C-contiguous array."""
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if offset < 0 or last >= flat.shape[0]:
        raise CheckpointFormatError(
            f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element {last} of a "
            f"storage with {flat.shape[0]} elements")
    count = math.prod(size)
    _budget().charge_view(count * flat.dtype.itemsize,
                          lambda: f"a tensor view of size {size} (stride {stride}) on a {flat.shape[0]}-element storage")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(st * item for st in stride))
    return np.array(view, copy=True, order="C")


def _as_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(int(v) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored_v1):
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"a tensor's storage is a {type(storage).__name__}, not a storage record")
    size, stride = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size) != len(stride) or not isinstance(storage_offset, int):
        raise CheckpointFormatError(
            f"inconsistent tensor layout: offset {storage_offset!r}, size {size}, stride {stride}")
    if storage.array is None:
        return _PendingTensor(storage, storage_offset, size, stride)
    return _strided_copy(storage.array, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if metadata:
        raise CheckpointFormatError(
            f"tensor metadata {sorted(metadata)} (e.g. conjugate/negative bits) is not supported")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class _Marker(_Frozen):
    """A named, inert value for a global such as ``torch.Tensor`` (never callable)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __repr__(self) -> str:
        return self.name


_TENSOR_TYPES = {
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
}
_REBUILDERS = {name: _AllowedFunction(fn, f"torch._utils.{name}") for name, fn in (
    ("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor_v2),
    ("_rebuild_parameter", _rebuild_parameter), ("_rebuild_parameter_with_state", _rebuild_parameter_with_state))}


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS.values() or new_type not in _TENSOR_TYPES.values():
        raise UnsafePickleError(f"torch._tensor._rebuild_from_type_v2 with {func!r} / {new_type!r} is not allowed")
    return func(*args)


# ----------------------------------------------------------------------------- other safe globals


_MISSING = object()


def _refuse_class_build(cls_or_state) -> None:
    # ``BUILD`` aimed at an allow-listed *class* calls ``Class.__setstate__(state)`` unbound.
    raise UnsafePickleError("refusing a pickle BUILD on an allow-listed class (it would alter the reader's own "
                            "classes)")


class _OrderedDict(dict):
    """``collections.OrderedDict`` (and dict subclasses such as EasyDict) as read from a file.
    A ``BUILD`` with instance attributes (``state_dict._metadata``) is kept in ``pickle_state``."""

    def __setstate__(self, state=_MISSING):
        if state is _MISSING:
            _refuse_class_build(self)
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"unexpected dict state of type {type(state).__name__}")
        self.pickle_state = state


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(<latin-1 text>, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got encoding {encoding!r}")
    return obj.encode("latin-1")


def _bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise UnsafePickleError("builtins.bytes is only allowed with no argument or a bytes argument")


def _torch_size(dims=()):
    return _as_int_tuple(tuple(dims), "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise CheckpointFormatError(f"bad torch.device({kind!r}, {index!r})")
    return kind if index is None else f"{kind}:{index}"


def _enum_value(value):
    # timm's ``Format`` enum pickles as Format("NCHW"): keep the value.
    if not isinstance(value, str):
        raise CheckpointFormatError(f"unexpected enum value {value!r}")
    return value


_TORCH_DTYPES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
    "int16", "short", "int8", "uint8", "bool", "complex64", "cfloat", "complex128", "cdouble",
)

def _allowed(module: str, name: str, fn: Callable) -> dict[tuple[str, str], _AllowedFunction]:
    return {(module, name): _AllowedFunction(fn, f"{module}.{name}")}


# Globals that a weights-only stream (tensors inside dicts/lists) may name. Every value is immutable
# (a type, a string, or a _Frozen object): the unpickler's BUILD cannot alter them.
_WEIGHTS_GLOBALS: dict[tuple[str, str], Any] = {
    **{("torch._utils", name): fn for name, fn in _REBUILDERS.items()},
    **_allowed("torch._tensor", "_rebuild_from_type_v2", _rebuild_from_type_v2),
    ("collections", "OrderedDict"): _OrderedDict,
    **_allowed("_codecs", "encode", _codecs_encode),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **_allowed("builtins", "bytes", _bytes),
    **_allowed("torch", "Size", _torch_size),
    **_allowed("torch", "device", _torch_device),
    **_TENSOR_TYPES,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **{("torch.cuda", name): _StorageType(name) for name in _STORAGE_DTYPES if name != "UntypedStorage"},
    **{("torch", name): f"torch.{name}" for name in _TORCH_DTYPES},
}


# ----------------------------------------------------------------------------- module stand-ins


class PickledObject:
    """Base of the inert objects a module pickle turns into: a qualified class name and the
    object's pickled ``__dict__`` (``state``). Torch modules keep their tensors in
    ``state["_parameters"]``/``state["_buffers"]`` and children in ``state["_modules"]``."""

    qualname: str = "?"
    state: dict

    def children(self) -> dict[str, Any]:
        return dict(self.state.get("_modules") or {})

    @property
    def is_module(self) -> bool:
        state = getattr(self, "state", None)
        return isinstance(state, dict) and ("_parameters" in state or "_modules" in state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.qualname}>"


class ModuleStandIn(PickledObject):
    """Stands for an allowed class pickled by reference (``torch.nn.Linear``, ...). Instances come
    only from ``cls.__new__`` (NEWOBJ) followed by ``BUILD`` with the ``__dict__``; calling the
    class (a REDUCE with arguments) is refused."""

    def __init__(self, *args, **kwargs):
        raise UnsafePickleError(f"{self.qualname}: refusing to construct it from call arguments "
                                "(module objects are only rebuilt from their __dict__)")

    def __setstate__(self, state=_MISSING):
        if state is _MISSING:
            _refuse_class_build(self)
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{self.qualname}: unexpected object state of type {type(state).__name__}")
        self.state = state


class OpaqueObject(ModuleStandIn):
    """Stands for a non-module object that an official pickle carries along but that holds no
    weights: ``torch.compile``'s context (``OptimizeContext``, its compiler wrappers and hooks) and
    OmegaConf containers (``DictConfig`` and its nodes, the training config's ``model_kwargs``).
    Calling one records the arguments, nothing else; no attribute of the real class exists here."""

    def __init__(self, *args, **kwargs):
        self.state = {"args": args, "kwargs": kwargs}


_STANDIN_CLASSES: dict[tuple[str, type], type] = {}


def _standin_class(qualname: str, base: type = ModuleStandIn) -> type:
    cls = _STANDIN_CLASSES.get((qualname, base))
    if cls is None:
        cls = type(qualname.rsplit(".", 1)[-1], (base,), {"qualname": qualname})
        _STANDIN_CLASSES[(qualname, base)] = cls
    return cls


_OPTIMIZED_MODULE = "torch._dynamo.eval_frame.OptimizedModule"


def _optimized_module(orig_mod, dynamo_ctx=None):
    # torch.compile's OptimizedModule pickles as OptimizedModule(orig_mod, dynamo_ctx): keep the
    # module as the ``_orig_mod`` child (as in torch's own state dict), drop the compiler context.
    if not (isinstance(orig_mod, PickledObject) and orig_mod.is_module):
        raise UnsafePickleError(f"{_OPTIMIZED_MODULE} expects a module stand-in, got {type(orig_mod).__name__}")
    module = _standin_class(_OPTIMIZED_MODULE).__new__(_standin_class(_OPTIMIZED_MODULE))
    module.state = {"_parameters": {}, "_buffers": {}, "_modules": {"_orig_mod": orig_mod}}
    return module


def _opaque_getattr(*args):
    # A bound method of a compiler-context object pickles as getattr(obj, "name").
    if len(args) != 2 or not isinstance(args[0], OpaqueObject) or not isinstance(args[1], str):
        raise UnsafePickleError("refusing to call builtins.getattr: it is only allowed as "
                                "getattr(<torch.compile context stand-in>, name)")
    return _standin_class(f"{args[0].qualname}.{args[1]}", OpaqueObject)()


def _defaultdict(default_factory=None, *items):
    # collections.defaultdict(factory) in OmegaConf metadata: a plain dict (the factory is dropped).
    return _OrderedDict(*items)


# Opaque objects, by module prefix (torch.compile context) or exact name.
_OPAQUE_PREFIXES = ("torch._dynamo.", "torch._inductor.", "omegaconf.")
_OPAQUE_NAMES = ("torch._TorchCompileInductorWrapper", "contextlib.nullcontext")


def _copyreg_reconstructor(cls, base, state):
    # Protocol 0/1 pickles of plain objects: copyreg._reconstructor(cls, object, None).
    if not (isinstance(cls, type) and issubclass(cls, ModuleStandIn)) or base is not object or state is not None:
        raise UnsafePickleError(f"copyreg._reconstructor({cls!r}, {base!r}, ...) is not allowed")
    return cls.__new__(cls)


class PersistentObject(PickledObject):
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` describes, left inert.

    ``module_src`` is the pickled class's module source, kept as text: it is never compiled or
    executed. ``class_name``/``version`` are as recorded; ``state`` is the object's ``__dict__``."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise CheckpointFormatError(f"persistent object meta must be a dict, got {type(meta).__name__}")
        if meta.get("type") != "class":
            raise UnsafePickleError(f"persistent object of type {meta.get('type')!r} is not supported (only 'class')")
        class_name, module_src = meta.get("class_name"), meta.get("module_src")
        if not isinstance(class_name, str) or not isinstance(module_src, (str, type(None))):
            raise CheckpointFormatError("persistent object meta needs a str class_name and module_src")
        state = meta.get("state")
        if state is None:
            state = {}
        if not isinstance(state, dict):
            raise CheckpointFormatError(
                f"persistent object {class_name}: state must be a dict, got {type(state).__name__}")
        self.class_name = class_name
        self.qualname = f"<persistent>.{class_name}"
        self.module_src = module_src
        self.version = meta.get("version")
        self.state = state

    def __setstate__(self, state):
        raise CheckpointFormatError(f"persistent object {self.class_name}: unexpected extra object state")


def _reconstruct_persistent_obj(meta) -> PersistentObject:
    # A function (not the class) so that the stream cannot NEWOBJ an empty PersistentObject.
    return PersistentObject(meta)


_MODULE_CLASSES = (
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.activation.SiLU",
    "torch.nn.modules.activation.GELU",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Tanh",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.normalization.RMSNorm",
    "torch.nn.modules.normalization.LayerNorm",
    "torch.nn.modules.normalization.GroupNorm",
    "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.flatten.Flatten",
    "torch.nn.parallel.distributed.DistributedDataParallel",
    # timm layers as the official DiT uses them (``from timm.models.vision_transformer import
    # PatchEmbed, Mlp``), under the module paths of recent (timm.layers) and older timm releases
    "timm.layers.patch_embed.PatchEmbed",
    "timm.models.layers.patch_embed.PatchEmbed",
    "timm.layers.mlp.Mlp",
    "timm.models.layers.mlp.Mlp",
    # The official code's own module classes (training/dit.py, training/wrapper.py). All but
    # ``Attention`` are EDM-persistent (pickled with their source) in the official code; Attention
    # is a plain nn.Module and every snapshot names it by reference. The others are listed for
    # snapshots written without the persistence decorator.
    *(f"training.dit.{name}" for name in ("Attention", "TimestepEmbedder", "LabelEmbedder", "DiTBlock",
                                          "FinalLayer", "DiT", "DiT_XL_2", "DiT_XL_2_18h", "DiT_L_2", "DiT_B_2",
                                          "DiT_S_2")),
    "training.wrapper.TVMWrapper",
)

# ----------------------------------------------------------------------------- the unpickler


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict[tuple[str, str], Any], *, where: str,
                 allow_classes: Iterable[str] = (), persistent_load: Callable | None = None, opaque: bool = False):
        super().__init__(file, encoding="utf-8")
        self._allowed = allowed
        self._where = where
        self._patterns = tuple(allow_classes)
        self._persistent = persistent_load
        self._opaque = opaque

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)  # what pickle's own find_class does for protocol < 3
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        qualname = f"{module}.{name}"
        if any(fnmatch.fnmatchcase(qualname, p) for p in self._patterns):
            return _standin_class(qualname)
        if self._opaque and (qualname in _OPAQUE_NAMES or qualname.startswith(_OPAQUE_PREFIXES)):
            return _standin_class(qualname, OpaqueObject)
        raise UnsafePickleError(
            f"{self._where}: refusing to load global '{qualname}': it is not on the allow-list of this "
            "code-execution-free reader (if it is a harmless module class of the checkpoint's own code, "
            "pass it in allow_classes / --allow_class to rebuild it as an inert stand-in)")

    def load(self):
        try:
            return super().load()
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except MemoryError:
            raise CheckpointFormatError(f"{self._where}: the pickle stream declares an object larger than the memory "
                                        "available (damaged or malicious file)") from None
        except Exception as e:  # truncated or malformed streams raise many kinds of errors
            raise CheckpointFormatError(f"{self._where}: malformed pickle stream ({type(e).__name__}: {e})") from e

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError(f"{self._where}: unexpected persistent id {pid!r} in this stream")
        return self._persistent(pid)


def _pid_name(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_record(pid, length: int, where: str):
    """``(storage type, key, numel)`` of a ``("storage", type, key, location, numel, ...)`` id."""
    if not isinstance(pid, tuple) or len(pid) != length or _pid_name(pid[0]) != "storage":
        raise CheckpointFormatError(f"{where}: unexpected persistent id {pid!r}")
    stype, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
        raise CheckpointFormatError(f"{where}: bad storage record {pid!r}")
    return stype, str(key), numel


def _load_zip(source, *, allowed, where: str, allow_classes: Iterable[str] = (), opaque: bool = False):
    """``torch.save`` zip archive (path or file object) -> the unpickled object."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFormatError(f"{where}: damaged zip archive ({e})") from e
    with zf, _budget_scope() as budget:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointFormatError(
                f"{where}: a zip file, but not a torch.save archive (expected one <dir>/data.pkl, found {len(pkls)})")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            with zf.open(prefix + "byteorder") as f:
                byteorder = f.read(16).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{where}: unknown byteorder record {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def read_storage(key: str, dtype: np.dtype, numel: int) -> bytearray:
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise CheckpointFormatError(f"{where}: storage record {name} is missing") from None
            need = numel * dtype.itemsize
            # Bounded by what the archive really holds, before anything is read or allocated.
            if info.file_size != need:  # torch.save writes each storage as exactly its bytes
                raise CheckpointFormatError(f"{where}: storage {key} has {info.file_size} bytes, expected "
                                            f"{numel} x {dtype.itemsize}")
            stored = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_INFLATE_RATIO)
            if need > stored:
                raise CheckpointFormatError(f"{where}: storage {key} declares {need:,} bytes but its zip entry stores "
                                            f"only {info.compress_size:,} (damaged or malicious file)")
            with zf.open(info) as f:
                raw = _read_bounded(f, need, where, f"storage {key}")
            budget.storage_bytes += need
            return raw

        def persistent_load(pid):
            stype, key, numel = _storage_record(pid, 5, where)
            if key in storages:
                if storages[key].dtype != stype.dtype:
                    raise CheckpointFormatError(f"{where}: storage {key} is used with two dtypes")
                return storages[key]
            dtype = stype.dtype.newbyteorder(">") if byteorder == "big" else stype.dtype
            array = np.frombuffer(read_storage(key, dtype, numel), dtype, count=numel)
            if byteorder == "big":
                array = array.astype(stype.dtype)
            storages[key] = _Storage(stype.dtype, numel, array)
            return storages[key]

        with zf.open(pkls[0]) as f:
            return _RestrictedUnpickler(f, allowed, where=where, allow_classes=allow_classes,
                                        persistent_load=persistent_load, opaque=opaque).load()


def _read_exact(f, n: int, where: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CheckpointFormatError(f"{where}: truncated (wanted {n} bytes, got {len(data)})")
    return data


def _remaining(f) -> int:
    pos = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return end - pos


def _load_legacy(f, *, allowed, where: str, allow_classes: Iterable[str] = (), opaque: bool = False):
    """Legacy (non-zip) ``torch.save`` stream from a seekable binary file object -> the unpickled object."""
    with _budget_scope() as budget:
        return _load_legacy_stream(f, budget, allowed=allowed, where=where, allow_classes=allow_classes, opaque=opaque)


def _load_legacy_stream(f, budget: _MemoryBudget, *, allowed, where, allow_classes, opaque):
    plain = lambda: _RestrictedUnpickler(f, {}, where=where).load()  # noqa: E731  (no globals at all)
    if plain() != _LEGACY_MAGIC:
        raise CheckpointFormatError(f"{where}: not a torch.save file (bad magic number)")
    version = plain()
    if version != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{where}: unsupported legacy torch.save protocol {version!r}")
    sys_info = plain()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointFormatError(f"{where}: unexpected persistent id {pid!r}")
        kind = _pid_name(pid[0])
        if kind == "module" and len(pid) >= 2 and isinstance(pid[1], type) and issubclass(pid[1], ModuleStandIn):
            return pid[1]  # a class record (its class was vetted by find_class); source is ignored
        stype, key, numel = _storage_record(pid, 6, where)
        if pid[5] is not None:
            raise CheckpointFormatError(f"{where}: storage views of the pre-1.0 legacy format are not supported")
        if key not in storages:
            storages[key] = _Storage(stype.dtype, numel)
        elif storages[key].dtype != stype.dtype:
            raise CheckpointFormatError(f"{where}: storage {key} is used with two dtypes")
        return storages[key]

    obj = _RestrictedUnpickler(f, allowed, where=where, allow_classes=allow_classes,
                               persistent_load=persistent_load, opaque=opaque).load()
    keys = plain()
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{where}: bad storage key list")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointFormatError(f"{where}: data for unknown storage {key!r}")
        (count,) = struct.unpack("<q" if little else ">q", _read_exact(f, 8, where))
        if count != storage.numel:
            raise CheckpointFormatError(f"{where}: storage {key} has {count} elements, expected {storage.numel}")
        dtype = storage.dtype if little else storage.dtype.newbyteorder(">")
        need = count * dtype.itemsize
        left = _remaining(f)
        if need > left:  # checked before allocating: the file must really hold the declared data
            raise CheckpointFormatError(f"{where}: storage {key} declares {count:,} elements ({need:,} bytes) but only "
                                        f"{left:,} bytes are left in the file (damaged or malicious file)")
        array = np.frombuffer(_read_bounded(f, need, where, f"storage {key}"), dtype)
        budget.storage_bytes += need
        storage.array = array if little else array.astype(storage.dtype)
    missing = [k for k, s in storages.items() if s.array is None]
    if missing:
        raise CheckpointFormatError(f"{where}: no data for storage(s) {missing}")
    return _materialize(obj)


def _materialize(obj, memo: dict | None = None):
    """Replaces every :class:`_PendingTensor` in a loaded object tree by its array."""
    memo = {} if memo is None else memo
    if isinstance(obj, _PendingTensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.materialize()
        return memo[id(obj)]
    if isinstance(obj, (np.ndarray, str, bytes, int, float, type(None))) or id(obj) in memo:
        return obj
    memo[id(obj)] = obj
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _materialize(obj[k], memo)
    elif isinstance(obj, list):
        obj[:] = [_materialize(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_materialize(v, memo) for v in obj)
    elif isinstance(obj, PickledObject) and isinstance(getattr(obj, "state", None), dict):
        _materialize(obj.state, memo)
    return obj


def _load_from_bytes(data) -> Any:
    """``torch.storage._load_from_bytes``: a whole torch.save stream, read weights-only."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointFormatError(f"torch.storage._load_from_bytes expects bytes, got {type(data).__name__}")
    where = "torch.storage._load_from_bytes payload"
    if data[:4] == b"PK\x03\x04":
        return _load_zip(io.BytesIO(data), allowed=_WEIGHTS_GLOBALS, where=where)
    return _load_legacy(io.BytesIO(data), allowed=_WEIGHTS_GLOBALS, where=where)


# Globals an official (EDM-persistence) pickle or a torch.save of official modules may name, on top
# of the weights-only ones (plus the opaque torch.compile/OmegaConf objects, see OpaqueObject).
_OFFICIAL_GLOBALS: dict[tuple[str, str], Any] = {
    **_WEIGHTS_GLOBALS,
    **_allowed("torch_utils.persistence", "_reconstruct_persistent_obj", _reconstruct_persistent_obj),
    **_allowed("torch.storage", "_load_from_bytes", _load_from_bytes),
    **_allowed("copyreg", "_reconstructor", _copyreg_reconstructor),
    ("builtins", "object"): object,
    ("dnnlib.util", "EasyDict"): _OrderedDict,
    **_allowed("timm.layers.format", "Format", _enum_value),
    **_allowed("timm.models.layers.format", "Format", _enum_value),
    **_allowed("torch._dynamo.eval_frame", "OptimizedModule", _optimized_module),
    **_allowed("builtins", "getattr", _opaque_getattr),
    **_allowed("collections", "defaultdict", _defaultdict),
    ("builtins", "dict"): _Marker("builtins.dict"),
    ("typing", "Any"): _Marker("typing.Any"),
    **{tuple(name.rsplit(".", 1)): _standin_class(name) for name in _MODULE_CLASSES},
}


# ----------------------------------------------------------------------------- public readers


def detect_format(path: str) -> str:
    """``"torch-zip"``, ``"torch-legacy"``, ``"safetensors"``, ``"pickle"`` (a plain Python pickle,
    e.g. an official checkpoint) or ``"unknown"``, from the file's first bytes."""
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head.startswith(_LEGACY_PREFIX):
        return "torch-legacy"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: not a regular file")


def read_torch_file(path: str, *, modules: bool = False, allow_classes: Iterable[str] = ()) -> Any:
    """The object stored by ``torch.save`` (zip or legacy format), with tensors as NumPy arrays,
    read weights-only (see the module docstring for the allow-list). ``modules=True`` also admits
    the official checkpoints' module classes as inert stand-ins (a ``training-state-*.pt``)."""
    fmt = detect_format(path)
    allowed = _OFFICIAL_GLOBALS if modules else _WEIGHTS_GLOBALS
    if fmt == "torch-zip":
        return _load_zip(path, allowed=allowed, where=path, allow_classes=allow_classes, opaque=modules)
    if fmt == "torch-legacy":
        with open(path, "rb") as f:
            return _load_legacy(f, allowed=allowed, where=path, allow_classes=allow_classes, opaque=modules)
    if fmt == "pickle":
        raise CheckpointFormatError(f"{path}: a plain Python pickle, not a torch.save file (official TVM checkpoints "
                                    "are read with read_official_pickle / load_official_pickle)")
    if fmt == "safetensors":
        raise CheckpointFormatError(f"{path}: a safetensors file (use load_state_dict)")
    with open(path, "rb") as f:
        is_tar = f.read(512)[257:262] == b"ustar"
    if is_tar:
        raise CheckpointFormatError(f"{path}: the tar-based torch.save format (PyTorch < 0.4) is not supported")
    raise CheckpointFormatError(f"{path}: unrecognised format (not a torch.save zip or legacy stream, not safetensors)")


def flatten_arrays(obj, prefix: str = "") -> dict[str, np.ndarray]:
    """Dotted-name dict of every array in a loaded object tree (see the module docstring)."""
    out: dict[str, np.ndarray] = {}

    def put(name: str, value: np.ndarray) -> None:
        if name in out:
            raise CheckpointFormatError(f"two entries flatten to the same name {name!r}")
        out[name] = value

    def walk(value, name: str, depth: int) -> None:
        if depth > 100:
            raise CheckpointFormatError(f"object tree nested too deeply at {name!r}")
        if isinstance(value, np.ndarray):
            put(name, value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}.{k}" if name else str(k), depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}.{i}" if name else str(i), depth + 1)
        elif isinstance(value, PickledObject) and value.is_module:
            for k, v in module_state_dict(value).items():
                put(f"{name}.{k}" if name else k, v)

    walk(obj, prefix.rstrip("."), 0)
    return out


def _select_key(flat: dict[str, np.ndarray], key: str | None, where: str) -> dict[str, np.ndarray]:
    if key is None:
        return flat
    key = key.rstrip(".")
    sub = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
    if not sub:
        top = sorted({k.split(".", 1)[0] for k in flat})
        raise KeyError(f"{where}: no entries under {key!r}; top-level names are {top}")
    return sub


def load_state_dict(path: str, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Flat ``{dotted name: array}`` from a ``.safetensors`` file or a ``torch.save`` file (zip or
    legacy format), without torch and without running code from the file. Nested dicts are
    flattened with dotted names; ``key`` keeps one sub-tree (its prefix stripped)."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        try:
            flat = dict(load_file(path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointFormatError(f"{path}: cannot read safetensors file: {e}") from e
    else:
        flat = flatten_arrays(read_torch_file(path))
    return _select_key(flat, key, path)


def module_state_dict(module: PickledObject, prefix: str = "") -> dict[str, np.ndarray]:
    """``torch.nn.Module.state_dict()`` of a loaded module stand-in: parameters, persistent
    buffers, then children, recursively; ``None`` entries are skipped."""
    if not isinstance(module, PickledObject) or not module.is_module:
        raise CheckpointFormatError(f"{prefix or 'object'}: {module!r} is not a torch module")
    state = module.state
    out: dict[str, np.ndarray] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, np.ndarray):
                raise CheckpointFormatError(f"{prefix}{name}: expected a tensor, found {type(value).__name__}")
            out[prefix + name] = value
    for name, child in module.children().items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


# ----------------------------------------------------------------------------- official checkpoints

_DIT_ANCHOR = "x_embedder.proj.weight"


def _find_dit(obj: PickledObject, depth: int = 0) -> PickledObject | None:
    """The DiT inside a network entry: the object itself if it has ``blocks``, else the first DiT
    found through wrapper children named ``model`` (the TVMWrapper's network), ``_orig_mod``
    (torch.compile) or ``module`` (DDP)."""
    if not obj.is_module or depth > 4:
        return None
    children = obj.children()
    if "blocks" in children:
        return obj
    for name in _WRAPPER_CHILDREN:
        inner = children.get(name)
        if isinstance(inner, PickledObject):
            found = _find_dit(inner, depth + 1)
            if found is not None:
                return found
    return None


_WRAPPER_CHILDREN = ("model", "_orig_mod", "module")


def _dict_network(value) -> dict[str, np.ndarray] | None:
    """A plain state dict (possibly under a prefix such as ``model.``) holding one DiT."""
    flat = flatten_arrays(value)
    roots = {k[: -len(_DIT_ANCHOR)] for k in flat if k == _DIT_ANCHOR or k.endswith("." + _DIT_ANCHOR)}
    if len(roots) != 1:
        return None
    (root,) = roots
    return {k[len(root):]: v for k, v in flat.items() if k.startswith(root)}


class _NotPlain(Exception):
    pass


def _plain(value, depth: int = 0):
    """``value`` if it is plain data (numbers, strings, arrays, containers of those); OmegaConf
    containers (the official training config's ``DictConfig``/``ListConfig``) become dicts/lists."""
    if depth > 100:
        raise _NotPlain
    if isinstance(value, (type(None), bool, int, float, complex, str, bytes, np.ndarray)):
        return value
    if isinstance(value, dict):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_plain(v, depth + 1) for v in value)
    if isinstance(value, OpaqueObject) and value.qualname.startswith("omegaconf.") and isinstance(value.state, dict):
        if "_content" in value.state:  # DictConfig / ListConfig
            return _plain(value.state["_content"], depth + 1)
        if "_val" in value.state:  # AnyNode, StringNode, ...
            return _plain(value.state["_val"], depth + 1)
    raise _NotPlain


def _class_name(obj: PickledObject) -> str:
    return obj.class_name if isinstance(obj, PersistentObject) else obj.qualname.rsplit(".", 1)[-1]


def _scalar(state: dict, key: str):
    value = state.get(key)
    return value if isinstance(value, (bool, int, float, str)) else None


def _child(obj, *path):
    for name in path:
        if not isinstance(obj, PickledObject) or not obj.is_module:
            return None
        obj = obj.children().get(name)
    return obj if isinstance(obj, PickledObject) else None


_RECIPE_WRAPPER_FIELDS = ("img_resolution", "img_channels", "label_dim", "do_scale_param", "detach_jvp")


def network_recipe(entry: PickledObject) -> dict[str, Any]:
    """What an official network object records about its recipe, beyond its weights.

    From the TVMWrapper's state (``training/wrapper.py``): ``img_resolution``, ``img_channels``,
    ``label_dim``, ``do_scale_param``, ``detach_jvp``, ``dtype``, ``model_kwargs`` and the
    persistence decorator's ``_init_kwargs`` (``model_type``, ``data_type``). From the modules
    themselves (``training/dit.py``), which is what the network really computes: ``model_type``
    (the DiT's class name), ``num_heads``, ``patch_size``, ``in_channels``, ``learn_guidance``,
    ``do_mod_norm`` (the blocks'), ``qk_norm`` (whether ``attn.q_norm`` is an RMSNorm) and ``norm``
    (the blocks' pre-norm: ``rms`` or ``layer``). Absent fields are left out."""
    recipe: dict[str, Any] = {}
    wrapper = entry
    for _ in range(4):  # through torch.compile / DDP wrappers to the TVMWrapper or the DiT
        children = wrapper.children() if wrapper.is_module else {}
        inner = next((children[n] for n in ("_orig_mod", "module") if isinstance(children.get(n), PickledObject)), None)
        if "model" in children or "blocks" in children or inner is None:
            break
        wrapper = inner
    dit = _find_dit(entry)
    if wrapper is not dit and isinstance(getattr(wrapper, "state", None), dict):
        state = wrapper.state
        recipe["wrapper"] = _class_name(wrapper)
        recipe.update({k: _scalar(state, k) for k in _RECIPE_WRAPPER_FIELDS if _scalar(state, k) is not None})
        if isinstance(state.get("dtype"), str):
            recipe["dtype"] = state["dtype"]
        for key in ("model_kwargs", "_init_kwargs"):
            try:
                value = _plain(state.get(key))
            except _NotPlain:
                continue
            if isinstance(value, dict):
                recipe["model_kwargs" if key == "model_kwargs" else "init_kwargs"] = value
        for key in ("model_type", "data_type"):
            value = recipe.get("init_kwargs", {}).get(key)
            if isinstance(value, str):
                recipe[key] = value
    if dit is None:
        return recipe
    recipe["model_type"] = _class_name(dit)
    recipe.update({k: _scalar(dit.state, k) for k in ("num_heads", "patch_size", "in_channels", "learn_guidance")
                   if _scalar(dit.state, k) is not None})
    block = _child(dit, "blocks", "0")
    if block is not None:
        if isinstance(block.state.get("do_mod_norm"), bool):
            recipe["do_mod_norm"] = block.state["do_mod_norm"]
        norm = _child(block, "norm1")
        if norm is not None:
            kind = _class_name(norm)
            recipe["norm"] = {"RMSNorm": "rms", "LayerNorm": "layer"}.get(kind, kind)
        attn = _child(block, "attn")
        if attn is not None:
            if isinstance(attn.state.get("num_heads"), int):
                recipe.setdefault("num_heads", attn.state["num_heads"])
            q_norm = _child(attn, "q_norm")
            if q_norm is not None:
                recipe["qk_norm"] = _class_name(q_norm) == "RMSNorm"
    return recipe


@dataclasses.dataclass
class OfficialCheckpoint:
    """What :func:`read_official_pickle` found in an official checkpoint.

    ``networks``: top-level entries holding a DiT (``"net"``, ``"ema"``, ...), each as the DiT's
    state dict with official names; ``recipes``: for the same entries, what
    :func:`network_recipe` read from the network objects (empty for plain state dicts).
    ``metadata``: the top-level entries that are plain data. ``other_entries``: names of the
    remaining entries (e.g. a persistent ``loss_fn`` object)."""

    path: str
    networks: dict[str, dict[str, np.ndarray]]
    metadata: dict[str, Any]
    other_entries: list[str]
    recipes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def default_weights(self) -> str:
        """``"ema"`` if present (the evaluation weights), else ``"net"``, else the only network."""
        for name in ("ema", "net"):
            if name in self.networks:
                return name
        if len(self.networks) == 1:
            return next(iter(self.networks))
        raise CheckpointFormatError(f"{self.path}: several networks {sorted(self.networks)} and neither 'ema' nor "
                                    "'net'; choose one")

    def state_dict(self, weights: str | None = None) -> dict[str, np.ndarray]:
        """The chosen network's DiT state dict (default: :attr:`default_weights`)."""
        name = self.default_weights if weights is None else weights
        if name not in self.networks:
            raise KeyError(f"{self.path}: no network {name!r} in the checkpoint; it holds {sorted(self.networks)}")
        return self.networks[name]


def read_official_object(path: str, *, allow_classes: Iterable[str] = ()) -> Any:
    """The object stored in an official checkpoint file (a pickle or a ``torch.save`` file), with
    module classes as inert stand-ins (see the module docstring); nothing from the file runs."""
    fmt = detect_format(path)
    if fmt == "pickle":
        with open(path, "rb") as f, _budget_scope():
            return _RestrictedUnpickler(f, _OFFICIAL_GLOBALS, where=path, allow_classes=allow_classes,
                                        opaque=True).load()
    if fmt in ("torch-zip", "torch-legacy"):
        return read_torch_file(path, modules=True, allow_classes=allow_classes)
    raise CheckpointFormatError(f"{path}: not an official checkpoint (a pickle or a torch.save file); "
                                f"detected format: {fmt}")


def holds_modules(obj) -> bool:
    """Whether a loaded checkpoint object is (or holds at its top level) pickled module objects."""
    values = obj.values() if isinstance(obj, dict) else [obj]
    return any(isinstance(v, PickledObject) for v in values)


def official_checkpoint(obj, path: str) -> OfficialCheckpoint:
    """Sorts a loaded official checkpoint object into networks, recipes and metadata."""
    if isinstance(obj, PickledObject):
        obj = {"net": obj}
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a pickled dict such as {{'net': ..., 'ema': ...}}, "
                                    f"got {type(obj).__name__}")
    networks: dict[str, dict[str, np.ndarray]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    metadata: dict[str, Any] = {}
    others: list[str] = []
    for name, value in obj.items():
        name = str(name)
        if isinstance(value, PickledObject):
            dit = _find_dit(value)
            if dit is not None:
                networks[name] = module_state_dict(dit)
                recipes[name] = network_recipe(value)
            else:
                others.append(name)
            continue
        if isinstance(value, dict):
            net = _dict_network(value)
            if net is not None:
                networks[name] = net
                recipes[name] = {}
                continue
        try:
            metadata[name] = _plain(value)
        except _NotPlain:
            others.append(name)
    if not networks:
        raise CheckpointFormatError(f"{path}: no DiT network found among the entries {sorted(map(str, obj))} "
                                    "(expected e.g. 'net' whose model has 'blocks')")
    return OfficialCheckpoint(path=path, networks=networks, metadata=metadata, other_entries=others, recipes=recipes)


def read_official_pickle(path: str, *, allow_classes: Iterable[str] = ()) -> OfficialCheckpoint:
    """Reads an official TVM checkpoint without torch, without the official code and without
    executing anything from it (see the module docstring): a snapshot pickle
    (``network-snapshot-*.pkl``, ``pickle.dump(dict(net=ema, dataset_kwargs=...))``) or a
    ``torch.save`` file of official modules (``training-state-*.pt``: ``net``, ``ema``,
    ``ema_target``, optimiser and scaler state)."""
    return official_checkpoint(read_official_object(path, allow_classes=allow_classes), path)


def load_official_pickle(path: str, weights: str | None = None, *,
                         allow_classes: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The DiT state dict (official names) of an official checkpoint; ``weights`` picks the entry
    (default ``"ema"`` if present, else ``"net"``). :func:`read_official_pickle` gives all of it."""
    return read_official_pickle(path, allow_classes=allow_classes).state_dict(weights)
