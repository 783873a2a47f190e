"""PyTorch state dicts (`.pth`, `.safetensors`) without torch, and their
conversion to flax.

`read_state_dict(path)` reads both formats `torch.save` writes:

* the zip format (torch >= 1.6): `<archive>/data.pkl` plus one raw file per
  storage, `<archive>/data/<key>`;
* the legacy format: five pickles in a row (magic number, protocol version,
  system info, the object, the list of storage keys) followed by each
  storage's bytes, an int64 element count then the raw data.

Only plain data is unpickled: a restricted `pickle.Unpickler` accepts
`collections.OrderedDict`, the typed storage classes and the tensor
rebuilders, and refuses every other global, like `torch.load(...,
weights_only=True)`. Tensors come back as numpy arrays with the same dtype,
shape and values (strides and storage offsets are honoured; the arrays are
C-contiguous copies).

`read_safetensors(path)` reads Hugging Face's `.safetensors` files.

`convert_state_dict` then fills a flax variables template from a state
dict, checking that every key is used exactly once and every flax leaf is
filled with an array of the right shape.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping

import ml_dtypes
import numpy as np
from flax import traverse_util

StateDict = dict[str, np.ndarray]

# Typed storage class name (as pickled by torch.save) -> numpy dtype.
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
}

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named in the pickle; its bytes are read afterwards."""
  key: str
  dtype: np.dtype
  numel: int
  # Legacy storage views: (root key, element offset into the root).
  view_of: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """What `_rebuild_tensor_v2` was asked to build."""
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                    tuple(int(s) for s in stride))


def _rebuild_parameter(tensor, unused_requires_grad, *unused_hooks):
  return tensor


class _StorageType:
  """Stands in for `torch.FloatStorage` etc. inside persistent ids."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds state dicts only: refuses every global not listed here."""

  _ALLOWED = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  }

  def __init__(self, file: BinaryIO, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[module, name]
    if module == 'torch' and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f'{self._path}: refusing to unpickle {module}.{name}; only plain '
        'state dicts (tensors in (Ordered)dicts) can be read without torch.')

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(
          f'{self._path}: unsupported persistent id {pid!r}.')
    storage_type, key, unused_location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(
          f'{self._path}: unsupported storage type {storage_type!r}.')
    if len(pid) > 5 and pid[5] is not None:
      # Legacy views: ('storage', type, root_key, location, root_numel,
      # (view_key, offset, view_numel)); tensors name the view's key.
      view_key, view_offset, view_numel = pid[5]
      return _StorageRef(str(view_key), storage_type.dtype, int(view_numel),
                         (str(key), int(view_offset)))
    return _StorageRef(str(key), storage_type.dtype, int(numel))


def _materialize(tensor: _TensorRef, storages: Mapping[str, np.ndarray],
                 path: str, name: str) -> np.ndarray:
  """A C-contiguous copy of the strided view `tensor` describes."""
  ref = tensor.storage
  if ref.view_of is not None:
    root_key, view_offset = ref.view_of
    flat = storages[root_key][view_offset:view_offset + ref.numel]
  else:
    flat = storages[ref.key]
  if len(tensor.shape) != len(tensor.stride):
    raise ValueError(f'{path}: tensor {name!r} has shape {tensor.shape} but '
                     f'strides {tensor.stride}.')
  if any(s < 0 for s in tensor.shape + tensor.stride) or tensor.offset < 0:
    raise ValueError(f'{path}: tensor {name!r} has negative sizes or strides.')
  if 0 in tensor.shape:
    return np.zeros(tensor.shape, flat.dtype)
  last = tensor.offset + sum((n - 1) * s
                             for n, s in zip(tensor.shape, tensor.stride))
  if last >= flat.size:
    raise ValueError(
        f'{path}: tensor {name!r} (shape {tensor.shape}, strides '
        f'{tensor.stride}, offset {tensor.offset}) reads past the end of its '
        f'storage of {flat.size} elements.')
  view = np.lib.stride_tricks.as_strided(
      flat[tensor.offset:], tensor.shape,
      tuple(s * flat.itemsize for s in tensor.stride), writeable=False)
  return np.array(view, order='C')


def _resolve(obj: Any, storages: Mapping[str, np.ndarray], path: str,
             name: str = '') -> Any:
  if isinstance(obj, _TensorRef):
    return _materialize(obj, storages, path, name)
  if isinstance(obj, Mapping):
    return {k: _resolve(v, storages, path, f'{name}.{k}' if name else str(k))
            for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages, path, name) for v in obj)
  return obj


def _collect_storages(obj: Any, found: dict[str, _StorageRef]) -> None:
  if isinstance(obj, _TensorRef):
    ref = obj.storage
    key = ref.view_of[0] if ref.view_of else ref.key
    found.setdefault(key, ref)
  elif isinstance(obj, Mapping):
    for value in obj.values():
      _collect_storages(value, found)
  elif isinstance(obj, (list, tuple)):
    for value in obj:
      _collect_storages(value, found)


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')
               or n == 'data.pkl']
    if len(pickles) != 1:
      raise ValueError(f'{path}: a zip but not a torch.save archive '
                       f'(data.pkl entries: {pickles}).')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if (byteorder in archive.namelist()
        and archive.read(byteorder).strip() != b'little'):
      raise ValueError(f'{path}: big-endian archives are not supported.')
    obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])),
                               path).load()
    refs: dict[str, _StorageRef] = {}
    _collect_storages(obj, refs)
    storages = {}
    for key, ref in refs.items():
      if ref.view_of is not None:
        raise ValueError(f'{path}: storage views only exist in legacy files.')
      raw = archive.read(f'{prefix}data/{key}')
      if len(raw) != ref.numel * ref.dtype.itemsize:
        raise ValueError(
            f'{path}: storage {key} holds {len(raw)} bytes, expected '
            f'{ref.numel} x {ref.dtype.itemsize}.')
      storages[key] = np.frombuffer(raw, ref.dtype)
  return _resolve(obj, storages, path)


def _read_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    # Even these small header pickles go through the restricted unpickler:
    # a plain pickle.load would run whatever a malicious file asks for.
    try:
      magic = _RestrictedUnpickler(f, path).load()
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f'{path}: neither a zip nor a legacy torch.save '
                       f'file ({error}).') from error
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path}: not a torch.save file (bad magic number; '
                       'tar-format checkpoints from torch < 0.4 are not '
                       'supported).')
    protocol = _RestrictedUnpickler(f, path).load()
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f'{path}: unsupported legacy protocol {protocol}.')
    sys_info = _RestrictedUnpickler(f, path).load()
    if not isinstance(sys_info, dict):
      raise ValueError(f'{path}: malformed legacy header {sys_info!r}.')
    if not sys_info.get('little_endian', True):
      raise ValueError(f'{path}: big-endian files are not supported.')
    obj = _RestrictedUnpickler(f, path).load()
    storage_keys = _RestrictedUnpickler(f, path).load()
    refs: dict[str, _StorageRef] = {}
    _collect_storages(obj, refs)
    storages = {}
    for key in storage_keys:
      header = f.read(8)
      if len(header) != 8:
        raise ValueError(f'{path}: truncated file (storage {key}).')
      (numel,) = struct.unpack('<q', header)
      if key not in refs:  # its dtype is unknown, so its size is too
        raise ValueError(f'{path}: storage {key} is not used by any tensor.')
      dtype = refs[key].dtype
      raw = f.read(numel * dtype.itemsize)
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f'{path}: truncated file (storage {key}).')
      storages[key] = np.frombuffer(raw, dtype)
    missing = sorted(set(refs) - set(storages))
    if missing:
      raise ValueError(f'{path}: storages {missing} are missing.')
  return _resolve(obj, storages, path)


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
  """Reads a PyTorch state dict saved with `torch.save`, without torch.

  Args:
    path: a `.pth`/`.pt` file in the zip or the legacy format.

  Returns:
    `{name: array}` in the file's order; arrays are numpy, C-contiguous,
    with the tensors' dtypes and shapes (PyTorch layout, e.g. conv weights
    `[O, I, kh, kw]`).

  Raises:
    ValueError: the file is not a `torch.save` file, holds something other
      than a flat mapping of tensors, or is inconsistent.
    pickle.UnpicklingError: it references a global a state dict never needs.
  """
  path = os.fspath(path)
  obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(
      obj['state_dict'], Mapping):
    obj = obj['state_dict']  # training checkpoints that wrap the weights
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: holds a {type(obj).__name__}, not a state dict.')
  not_arrays = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if not_arrays:
    raise ValueError(f'{path}: entries {not_arrays[:5]} are not tensors.')
  return dict(obj)


# safetensors (Hugging Face): an 8-byte little-endian header size, a JSON
# header `{name: {dtype, shape, data_offsets: [begin, end]}}` (offsets into
# the bytes after the header), then the raw little-endian tensors.
SAFETENSORS_DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'),
    'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'), 'I8': np.dtype('i1'),
    'U8': np.dtype('u1'), 'BOOL': np.dtype(np.bool_),
}


def read_safetensors(path: str | os.PathLike[str]) -> StateDict:
  """Reads a `.safetensors` file into `{name: array}` (PyTorch layout).

  Raises:
    ValueError: the header is malformed, names an unknown dtype, or a
      tensor's byte range does not fit its shape or the file.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f'{path}: too short for a safetensors file.')
  header_size = struct.unpack('<Q', raw[:8])[0]
  if 8 + header_size > len(raw):
    raise ValueError(f'{path}: header of {header_size} bytes overruns the '
                     f'{len(raw)}-byte file; not a safetensors file?')
  try:
    header = json.loads(raw[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f'{path}: unreadable safetensors header: {error}') from error
  data = memoryview(raw)[8 + header_size:]
  arrays = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    dtype = SAFETENSORS_DTYPES.get(entry.get('dtype'))
    if dtype is None:
      raise ValueError(f'{path}: tensor {name!r} has unknown dtype '
                       f'{entry.get("dtype")!r}.')
    shape = tuple(entry['shape'])
    begin, end = entry['data_offsets']
    if end > len(data) or end - begin != dtype.itemsize * math.prod(shape):
      raise ValueError(f'{path}: tensor {name!r} of shape {shape} has byte '
                       f'range [{begin}, {end}), which does not fit.')
    arrays[name] = np.frombuffer(data[begin:end], dtype).reshape(shape).copy()
  return arrays


# ----------------------------------------------------------------------------
# State dict -> flax variables.

def _torch_leaf(collection: str, leaf: str) -> str | None:
  """The PyTorch parameter name for a flax leaf of a conv/dense/BN layer."""
  if collection == 'params':
    return {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
            'embedding': 'weight'}.get(leaf)
  if collection == 'batch_stats':
    return {'mean': 'running_mean', 'var': 'running_var'}.get(leaf)
  return None


def torch_to_flax_array(value: np.ndarray, flax_leaf: str,
                        flax_ndim: int) -> np.ndarray:
  """PyTorch layout -> flax layout for one array.

  Conv kernels `[O, I/groups, kh, kw]` become `[kh, kw, I/groups, O]`, which
  is what `nn.Conv` expects, depthwise (`feature_group_count=C`: `[C, 1,
  kh, kw] -> [kh, kw, 1, C]`) included. Dense kernels `[out, in]` become
  `[in, out]`. Everything else is unchanged.
  """
  if flax_leaf == 'kernel' and value.ndim == 4 and flax_ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if flax_leaf == 'kernel' and value.ndim == 2 and flax_ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    torch_prefix: Callable[[tuple[str, ...]], str],
    *,
    ignore: Callable[[str], bool] = lambda key: key.endswith(
        '.num_batches_tracked'),
    dtype: Any = np.float32,
) -> dict[str, Any]:
  """Fills a flax variables template from a PyTorch state dict.

  Each flax leaf `collection/<module path>/<leaf>` is looked up as
  `torch_prefix(module_path) + '.' + name`, with `kernel -> weight` (conv or
  dense), `scale -> weight`, `bias -> bias`, `embedding -> weight`
  (`nn.Embed`), `mean -> running_mean` and
  `var -> running_var` (BatchNorm), and converted with
  `torch_to_flax_array`.

  Args:
    state_dict: `{name: array}` as `read_state_dict` returns.
    template: the flax variables (arrays or `jax.ShapeDtypeStruct`s, e.g.
      from `jax.eval_shape(module.init, ...)`).
    torch_prefix: flax module path (e.g. `('blocks_3', 'depthwise_bn')`) ->
      PyTorch module name (e.g. `'_blocks.3._bn1'`).
    ignore: state-dict keys that are deliberately left unused (by default
      BatchNorm's `num_batches_tracked` counters).
    dtype: the dtype of the floating-point outputs.

  Returns:
    Variables with the template's structure, as numpy arrays.

  Raises:
    ValueError: naming the key, when a flax leaf has no state-dict entry,
      two leaves claim the same entry, shapes differ, or state-dict entries
      are left unused.
  """
  flat_template = traverse_util.flatten_dict(dict(template))
  converted = {}
  used: dict[str, str] = {}
  for flax_path, leaf_template in flat_template.items():
    collection, *module_path, leaf = flax_path
    flax_name = '/'.join(flax_path)
    shape = tuple(leaf_template.shape)
    torch_leaf = _torch_leaf(collection, leaf)
    if torch_leaf is None:
      raise ValueError(f'No PyTorch equivalent for flax variable {flax_name}.')
    prefix = torch_prefix(tuple(module_path))
    key = f'{prefix}.{torch_leaf}' if prefix else torch_leaf
    if key in used:
      raise ValueError(f'State-dict key {key!r} is claimed by both '
                       f'{used[key]} and {flax_name}.')
    if key not in state_dict:
      raise ValueError(f'State-dict key {key!r} (for flax variable '
                       f'{flax_name}, shape {shape}) is missing.')
    used[key] = flax_name
    value = torch_to_flax_array(np.asarray(state_dict[key]), leaf, len(shape))
    if value.shape != shape:
      raise ValueError(
          f'State-dict key {key!r} has shape {tuple(state_dict[key].shape)} '
          f'(-> {value.shape} in flax layout) but flax variable {flax_name} '
          f'needs {shape}.')
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(dtype)
    converted[flax_path] = value
  unused = [k for k in state_dict if k not in used and not ignore(k)]
  if unused:
    raise ValueError(f'State-dict keys left unused by the flax model: '
                     f'{unused[:10]}{" ..." if len(unused) > 10 else ""}')
  return traverse_util.unflatten_dict(converted)

