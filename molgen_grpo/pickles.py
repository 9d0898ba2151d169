"""Restricted loading of pickles that come from outside: GEOM molecule pickles and split ``.npy`` files.

``pickle.load`` runs whatever callable a file names, so a downloaded pickle is code. The unpickler
here resolves only the globals that the data needs (checked by disassembling real pickles):

- ``rdkit.Chem.rdchem.Mol`` (and ``RWMol``): RDKit pickles a molecule as ``Mol(<binary>)``, with
  conformers and properties inside the binary; no other RDKit global is referenced.
- ``_codecs.encode``: how protocol 2 pickles (Python-2 compatible) store ``bytes``, e.g. that binary.
- ``builtins.set`` / ``frozenset`` (``__builtin__`` in protocol 2): the only containers that need a
  global; dicts, lists, tuples, str, int, float, bool and None have their own opcodes.
- numpy ``ndarray`` / ``dtype`` / ``_reconstruct`` / ``scalar`` (as ``numpy.core.multiarray`` from
  numpy 1 and ``numpy._core.multiarray`` from numpy 2): the split file is an object array of index
  arrays, and a numpy scalar can stand in for a float. They only rebuild arrays from bytes.

Everything else raises :class:`ForbiddenGlobalError` naming the global and the file before it is
called. Every opcode that imports (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through
``find_class``, so nothing outside the list can reach REDUCE.
"""

from __future__ import annotations

import codecs
import os
import pickle
from typing import IO, Any

import numpy as np
from rdkit import Chem

from elign.engine.errors import DataFormatError

__all__ = ["ForbiddenGlobalError", "SafeUnpickler", "load_npy", "load_pickle"]

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's own names, whatever its version calls them
_SCALAR = np.float64(0.0).__reduce__()[0]

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("rdkit.Chem.rdchem", "Mol"): Chem.Mol,
    ("rdkit.Chem.rdchem", "RWMol"): Chem.RWMol,
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
}


class ForbiddenGlobalError(DataFormatError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing in it was called."""

    def __init__(self, path: str, global_name: str) -> None:
        super().__init__(path, None, f"refused to load global {global_name!r}: only RDKit molecules, plain "
                         "containers and numpy arrays may be unpickled from outside (the file may be corrupt "
                         "or malicious)")
        self.global_name = global_name


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`; ``path`` names the file in errors."""

    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(self._path, f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataFormatError(self._path, None, "persistent references are not allowed in this pickle")


def _unpickle(handle: IO[bytes], where: str) -> Any:
    try:
        return SafeUnpickler(handle, where).load()
    except DataFormatError:
        raise
    except Exception as err:  # the pickle machinery raises many types on malformed input
        raise DataFormatError(where, None, f"not a readable pickle ({type(err).__name__}: {err})") from None


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`.

    Raises:
        ForbiddenGlobalError: the pickle names a global outside the allow-list.
        DataFormatError: the file is not a readable pickle.
    """
    with open(path, "rb") as handle:
        return _unpickle(handle, str(path))


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ``.npy`` file; an object array (pickled inside the file) goes through :class:`SafeUnpickler`.

    ``np.load(..., allow_pickle=True)``, which torsional-diffusion and 3DMolGen use for the split
    file, would run any pickle; plain numeric arrays are read by numpy with pickles disallowed.

    Raises:
        ForbiddenGlobalError: the embedded pickle names a global outside the allow-list.
        DataFormatError: not a ``.npy`` file, or the embedded pickle is not the array the header describes.
    """
    where = str(path)
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as err:
            raise DataFormatError(where, None, f"not a readable .npy file ({err})") from None
        if not dtype.hasobject:
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        array = _unpickle(handle, where)
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        got = getattr(array, "shape", type(array).__name__)
        raise DataFormatError(where, None, f"header promises an object array of shape {shape}, pickle holds {got}")
    return array
