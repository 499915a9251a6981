"""OC20 S2EF LMDBs: read (lazily, without torch_geometric) and write.

Layout (fairchem / ocpmodels ``LmdbDataset``): one ``*.lmdb`` file (``subdir=False``) or a folder of
them; keys are ASCII integers ``b"0"``, ``b"1"``, ... and an optional ``b"length"`` key holds the
record count (without it, the file's entry count is the length); each value is a pickled
torch_geometric ``Data`` with ``pos`` (n, 3), ``cell`` (1, 3, 3), ``atomic_numbers`` (n,),
``natoms``, ``tags`` (n,), ``fixed`` (n,), ``y`` (energy, eV), ``force`` (n, 3) (eV/Å), ``sid``,
``fid``. Two pickle layouts exist: torch_geometric >= 2 keeps the attributes in ``Data._store``
(a ``GlobalStorage``), torch_geometric 1.x in the object's ``__dict__`` directly; both are read.
A folder may hold ``metadata.npz`` with a ``natoms`` array (fairchem writes it), which gives the atom
counts without decoding records.

**Security.** A pickle can run arbitrary code when loaded. Records are therefore decoded with a
restricted unpickler that resolves only an allow-list: torch_geometric's ``Data`` and storage
classes (mapped to plain containers here, so torch_geometric is not needed and none of its code
runs), torch's tensor and storage rebuild functions (storage bytes are loaded with
``torch.load(weights_only=True)``), numpy's array reconstruction, and a few builtins. Anything
else is refused with ``pickle.UnpicklingError`` naming the class. This makes reading an
untrusted LMDB no more dangerous than ``torch.load(weights_only=True)``.

Needs the ``lmdb`` package (``pip install 'scn_fast[lmdb]'``). Writing torch_geometric >= 2
``Data`` records (``layout="pyg"``) needs torch_geometric; ``layout="legacy"`` writes the 1.x
layout without it.
"""

from __future__ import annotations

import codecs
import copyreg
import io
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from ase import Atoms

from .readers import Sample, StructureDataset, list_files

# ----------------------------------------------------------------------------- safe unpickling


class PlainData:
    """Stands in for torch_geometric ``Data`` / ``Batch`` when unpickling: the pickled state as
    attributes (``_store`` for the torch_geometric >= 2 layout, the fields themselves for 1.x)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, Mapping):
            raise pickle.UnpicklingError(
                f"unexpected torch_geometric object state {type(state).__name__}"
            )
        self.__dict__.update(state)


class PlainStorage(PlainData):
    """Stands in for torch_geometric's ``GlobalStorage`` / ``BaseStorage`` (fields in ``_mapping``)."""


def _safe_load_from_bytes(data: bytes) -> Any:
    """torch's storage unpickling (``torch.storage._load_from_bytes``) with ``weights_only=True``."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _safe_rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"refusing to rebuild a tensor of type {new_type!r}")
    from torch._tensor import _rebuild_from_type_v2

    return _rebuild_from_type_v2(func, new_type, args, state)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if base is not object or not (isinstance(cls, type) and issubclass(cls, PlainData)):
        raise pickle.UnpicklingError(f"refusing copyreg._reconstructor({cls!r}, {base!r})")
    return copyreg._reconstructor(cls, base, state)


_PYG_DATA = {"Data", "Batch", "DataBatch"}
_PYG_STORAGE = {"GlobalStorage", "BaseStorage", "NodeStorage", "EdgeStorage"}
_PYG_ATTRS = {"DataEdgeAttr", "DataTensorAttr"}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import torch._utils as tu

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): tu._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): tu._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): tu._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("torch._tensor", "_rebuild_from_type_v2"): _safe_rebuild_from_type_v2,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "object"): object,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray as _ma
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _ma._reconstruct
        allowed[(mod, "scalar")] = _ma.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = np.frombuffer
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    for name in ("FloatStorage", "DoubleStorage", "LongStorage", "IntStorage", "BoolStorage"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles OC20 records: torch_geometric classes become ``PlainData`` / ``PlainStorage``,
    only the allow-listed globals of ``_allowed_globals`` resolve, anything else is an
    ``UnpicklingError`` (see the module docstring)."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch_geometric."):
            if name in _PYG_DATA:
                return PlainData
            if name in _PYG_STORAGE:
                return PlainStorage
            if name in _PYG_ATTRS:
                return PlainData
        cls = type(self)
        if cls._allowed is None:
            cls._allowed = _allowed_globals()
        value = cls._allowed.get((module, name))
        if value is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: OC20 LMDB records may only hold "
                "torch_geometric Data, tensors, numpy arrays and plain Python values"
            )
        return value


def safe_loads(data: bytes) -> Any:
    """``pickle.loads`` through ``RestrictedUnpickler``."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def record_fields(obj: Any) -> dict[str, Any]:
    """The attributes of an unpickled record: a ``PlainData`` in either torch_geometric layout, or a
    plain dict. ValueError for anything else."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, PlainData):
        store = obj.__dict__.get("_store")
        if isinstance(store, PlainData):  # torch_geometric >= 2: Data._store._mapping
            mapping = store.__dict__.get("_mapping")
            return dict(mapping) if isinstance(mapping, Mapping) else {}
        return {k: v for k, v in obj.__dict__.items() if not k.startswith("_")}
    raise ValueError(f"a {type(obj).__name__}, not a torch_geometric Data or a dict")


# ----------------------------------------------------------------------------- conversion


def _array(value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _scalar(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        flat = _array(value, None).reshape(-1)
        return flat[0].item() if flat.size == 1 else flat.tolist()
    return value


REQUIRED_FIELDS = ("pos", "atomic_numbers", "cell")


def sample_from_fields(fields: Mapping[str, Any], where: str) -> Sample:
    """A ``Sample`` from an OC20 record's fields (``y`` or ``energy``, ``force`` or ``forces`` are
    the labels; ``pbc`` defaults to all periodic as in OC20). ValueError listing missing structure
    fields or disagreeing sizes."""
    missing = [k for k in REQUIRED_FIELDS if fields.get(k) is None]
    if missing:
        raise ValueError(
            f"{where} is missing the field(s) {missing}; an OC20 S2EF record needs pos, "
            f"atomic_numbers and cell (and y, force for training), it has {sorted(fields)}"
        )
    pos = _array(fields["pos"], np.float64).reshape(-1, 3)
    n = len(pos)
    numbers = _array(fields["atomic_numbers"], np.float64).reshape(-1)
    if numbers.shape != (n,) or (numbers != np.round(numbers)).any():
        raise ValueError(f"{where}: atomic_numbers {numbers.shape} must be {n} whole numbers")
    natoms = fields.get("natoms")
    if natoms is not None and int(_scalar(natoms)) != n:
        raise ValueError(f"{where}: natoms is {int(_scalar(natoms))} but pos has {n} atoms")
    cell = _array(fields["cell"], np.float64).reshape(-1)
    if cell.size != 9:
        raise ValueError(f"{where}: cell has {cell.size} entries, expected 9")

    def per_atom(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        value = fields.get(name)
        if value is None:
            return None
        arr = _array(value, dtype)
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
        return arr.reshape(shape)

    fixed = per_atom("fixed", np.float64, (n,))
    energy = fields.get("y", fields.get("energy"))
    force_key = "force" if fields.get("force") is not None else "forces"
    forces = fields.get(force_key)
    pbc = fields.get("pbc")
    return Sample(
        numbers=numbers.astype(np.int64),
        positions=pos,
        cell=cell.reshape(3, 3),
        pbc=np.ones(3, dtype=bool) if pbc is None else _array(pbc, bool).reshape(3),
        energy=None if energy is None else float(_array(energy, np.float64).reshape(-1)[0]),
        forces=None if forces is None else per_atom(force_key, np.float64, (n, 3)),
        fixed=None if fixed is None else fixed != 0,
        tags=per_atom("tags", np.int64, (n,)),
        sid=_scalar(fields.get("sid")),
        fid=_scalar(fields.get("fid")),
    )


# ----------------------------------------------------------------------------- reading


def require_lmdb() -> Any:
    """The ``lmdb`` module, or ImportError naming the extra that provides it."""
    try:
        import lmdb
    except ImportError as exc:
        raise ImportError(
            "reading or writing OC20 .lmdb files needs the lmdb package: "
            "pip install 'scn_fast[lmdb]'"
        ) from exc
    return lmdb


_ENVS: dict[tuple[int, str], Any] = {}


def open_readonly_env(path: str) -> Any:
    """A read-only, lock-free LMDB environment of the file ``path``, shared by every reader of
    the file in this process (lmdb allows one environment per file and process) and opened anew
    after a fork."""
    lmdb = require_lmdb()
    key = (os.getpid(), os.path.realpath(path))
    env = _ENVS.get(key)
    if env is None:
        try:
            env = lmdb.open(
                path,
                subdir=False,
                readonly=True,
                lock=False,
                readahead=False,
                meminit=False,
                max_readers=64,
            )
        except lmdb.Error as exc:
            raise ValueError(f"cannot open {path} as an LMDB file: {exc}") from exc
        _ENVS[key] = env
    return env


def close_envs() -> None:
    """Close every environment ``open_readonly_env`` opened in this process (e.g. before the
    file is rewritten)."""
    for key in [k for k in _ENVS if k[0] == os.getpid()]:
        _ENVS.pop(key).close()


class OC20LmdbDataset(StructureDataset):
    """An OC20 S2EF LMDB file or a folder of ``*.lmdb`` files (module docstring). Opening reads only
    each file's length; ``dataset[i]`` reads and decodes record i alone. Environments are opened
    read-only, without locks, and reopened after a fork (so DataLoader workers can share it)."""

    def __init__(self, path: str) -> None:
        self.lmdb = require_lmdb()
        self.source = path
        if os.path.isdir(path):
            self.files = list_files(path, ".lmdb")
            if not self.files:
                raise ValueError(f"no *.lmdb files in the folder {path}")
        else:
            self.files = [path]
        lengths = [self._length(k) for k in range(len(self.files))]
        self._offsets = np.cumsum([0, *lengths])
        if self._offsets[-1] == 0:
            raise ValueError(f"{path} holds no structures")
        self._natoms_meta = self._read_metadata(path)

    def _env(self, k: int) -> Any:
        return open_readonly_env(self.files[k])

    def _length(self, k: int) -> int:
        env = self._env(k)
        with env.begin() as txn:
            raw = txn.get(b"length")
        if raw is not None:
            try:
                return int(safe_loads(raw))
            except Exception as exc:
                raise ValueError(f"{self.files[k]}: cannot read its 'length' entry: {exc}") from exc
        return int(env.stat()["entries"])

    def _read_metadata(self, path: str) -> np.ndarray | None:
        meta = os.path.join(path, "metadata.npz") if os.path.isdir(path) else None
        if meta is None or not os.path.exists(meta):
            return None
        with np.load(meta) as npz:
            natoms = npz["natoms"] if "natoms" in npz.files else None
        if natoms is None or len(natoms) != len(self):
            return None
        return np.asarray(natoms, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def raw(self, index: int) -> bytes:
        """The stored bytes of record ``index`` (0 <= index < len)."""
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        j = index - int(self._offsets[k])
        with self._env(k).begin() as txn:
            raw = txn.get(str(j).encode("ascii"))
        if raw is None:
            raise ValueError(f"{self.files[k]} has no record with key {j!r}")
        return bytes(raw)

    def _get(self, index: int) -> Sample:
        where = f"record {index} of {self.source}"
        try:
            obj = safe_loads(self.raw(index))
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        try:
            fields = record_fields(obj)
        except ValueError as exc:
            raise ValueError(f"{where} is {exc}") from exc
        return sample_from_fields(fields, where)

    def _natoms(self, index: int) -> int:
        if self._natoms_meta is not None:
            return int(self._natoms_meta[index])
        return len(self[index])


# ----------------------------------------------------------------------------- writing


def data_fields(sample: Sample) -> dict[str, Any]:
    """The OC20 record fields of ``sample`` as tensors (pos float32 as fairchem stores it would
    lose precision: positions, cell, energy and forces are kept in float64 here; pbc is stored as
    an extra field so non-periodic directions survive the round trip)."""
    n = len(sample)
    fields: dict[str, Any] = {
        "pos": torch.as_tensor(sample.positions, dtype=torch.float64),
        "cell": torch.as_tensor(sample.cell, dtype=torch.float64).view(1, 3, 3),
        "atomic_numbers": torch.as_tensor(sample.numbers, dtype=torch.float64),
        "natoms": n,
        "tags": torch.as_tensor(
            sample.tags if sample.tags is not None else np.zeros(n), dtype=torch.long
        ),
        "fixed": torch.as_tensor(sample.fixed, dtype=torch.float64),
        "pbc": torch.as_tensor(sample.pbc, dtype=torch.bool).view(1, 3),
    }
    if sample.energy is not None:
        fields["y"] = float(sample.energy)
    if sample.forces is not None:
        fields["force"] = torch.as_tensor(sample.forces, dtype=torch.float64)
    if sample.sid is not None:
        fields["sid"] = sample.sid
    if sample.fid is not None:
        fields["fid"] = sample.fid
    return fields


def _legacy_data_pickle(fields: Mapping[str, Any]) -> bytes:
    """A torch_geometric 1.x ``Data`` pickle (attributes in ``__dict__``), written without
    torch_geometric: GLOBAL torch_geometric.data.data.Data, NEWOBJ, then the attribute dict
    as its state (BUILD)."""
    state = pickle.dumps(dict(fields), protocol=2)
    assert state[:2] == b"\x80\x02" and state[-1:] == pickle.STOP
    return (
        b"\x80\x02"
        + pickle.GLOBAL
        + b"torch_geometric.data.data\nData\n"
        + pickle.EMPTY_TUPLE
        + pickle.NEWOBJ
        + state[2:-1]
        + pickle.BUILD
        + pickle.STOP
    )


def encode_record(sample: Sample, layout: str = "pyg") -> bytes:
    """One LMDB value. layout "pyg": a pickled torch_geometric >= 2 ``Data`` (needs
    torch_geometric); "legacy": the torch_geometric 1.x layout; "dict": a plain dict."""
    fields = data_fields(sample)
    if layout == "pyg":
        try:
            from torch_geometric.data import Data
        except ImportError as exc:
            raise ImportError(
                "writing torch_geometric Data records needs torch_geometric: pip install "
                "'scn_fast[lmdb]' (or write layout='legacy', which does not)"
            ) from exc
        return pickle.dumps(Data(**fields), protocol=pickle.HIGHEST_PROTOCOL)
    if layout == "legacy":
        return _legacy_data_pickle(fields)
    if layout == "dict":
        return pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)
    raise ValueError(f"unknown LMDB record layout {layout!r}: use 'pyg', 'legacy' or 'dict'")


def write_oc20_lmdb(
    path: str,
    structures: Iterable[Atoms | Sample],
    layout: str = "pyg",
    map_size: int = 1 << 32,
) -> int:
    """Write ``structures`` (``ase.Atoms`` with a calculator's results, or ``Sample``) to the OC20 LMDB
    file ``path`` (keys "0", "1", ..., plus "length"); returns the count. sid defaults to the
    index, fid to 0. ``map_size``: the largest the file may grow (reserved address space only)."""
    lmdb = require_lmdb()
    _ENVS.pop((os.getpid(), os.path.realpath(path)), None)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it first")
    env = lmdb.open(path, subdir=False, map_size=map_size, meminit=False, map_async=True)
    count = 0
    try:
        with env.begin(write=True) as txn:
            for structure in structures:
                sample = (
                    structure if isinstance(structure, Sample) else Sample.from_atoms(structure)
                )
                if sample.sid is None:
                    sample.sid = count
                if sample.fid is None:
                    sample.fid = 0
                txn.put(str(count).encode("ascii"), encode_record(sample, layout))
                count += 1
            txn.put(b"length", pickle.dumps(count, protocol=pickle.HIGHEST_PROTOCOL))
        env.sync()
    finally:
        env.close()
    return count
