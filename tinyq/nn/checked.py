"""Validate-once bookkeeping for modules that check their weight tensors once instead of on every
call (an eager decode-sized linear's host cost is mostly Python)."""
from __future__ import annotations

import weakref


class CheckedTensors:
    """The tensor objects a module validated last, as weak references. Not ``id()``s: once a
    replaced tensor is freed, a new tensor can get its id and would pass unchecked."""

    __slots__ = ("_refs",)

    def __init__(self):
        self._refs = None

    def same(self, tensors) -> bool:
        """Whether ``tensors`` (a sequence, ``None`` entries allowed) are the objects last remembered."""
        refs = self._refs
        if refs is None or len(refs) != len(tensors):
            return False
        for ref, t in zip(refs, tensors):
            if (t is None) != (ref is None) or (ref is not None and ref() is not t):
                return False
        return True

    def remember(self, tensors) -> None:
        self._refs = tuple(None if t is None else weakref.ref(t) for t in tensors)

    def __reduce__(self):  # pickling or copying a module forgets: its tensors are checked again
        return (CheckedTensors, ())


def module_tensors(module, names) -> tuple:
    """``module``'s tensors ``names``, read from its buffer dict: ``nn.Module.__getattr__`` costs about
    half a microsecond a name, on every eager call. A name that is no buffer (a bias of ``None``, kept
    as a plain attribute) is read as an attribute."""
    buffers = module._buffers
    return tuple(buffers[n] if n in buffers else getattr(module, n) for n in names)
