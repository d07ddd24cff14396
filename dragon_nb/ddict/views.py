"""Live views of a DDict: ``keys()``, ``values()``, ``items()`` and their
``local_*`` twins, plus the read-only ``mapping`` proxy.

A view holds no data: ``len`` asks the managers, and every iteration asks them
again (keys one manager at a time, values in batches), so a view always shows
the DDict as it is now. Like Dragon's (and unlike a dict's), they have no
order and cannot be reversed; deleting keys while iterating is allowed.
"""
from __future__ import annotations

from collections.abc import ItemsView, KeysView, Mapping, ValuesView

_MISSING = object()


class _Scoped:
    """The managers a view covers: all of them, one (``manager(i)``), or this
    node's (``local_*``)."""

    __slots__ = ()

    def _setup(self, ddict, mids, local):
        self._mapping = ddict
        self._mids = list(mids)
        self._local = local

    def _covers(self, key) -> bool:
        return not self._local or self._mapping.which_manager(key) in self._mids

    def __len__(self):
        return self._mapping._length(self._mids)

    def __reversed__(self):
        raise TypeError("DDict keys have no order, so a view cannot be reversed")

    @property
    def mapping(self) -> "DDictMappingProxy":
        """A read-only proxy of the whole DDict."""
        return DDictMappingProxy(self._mapping)

    def __repr__(self):
        where = "local " if self._local else ""
        return (f"<{type(self).__name__} of {self._mapping!r}, {where}managers "
                f"{self._mids}>")


class DDictKeysView(_Scoped, KeysView):
    __slots__ = ("_mids", "_local")

    def __init__(self, ddict, managers, local: bool = False):
        self._setup(ddict, managers, local)

    def __iter__(self):
        return self._mapping._iter_keys(self._mids)

    def __contains__(self, key):
        return self._covers(key) and key in self._mapping


class DDictValuesView(_Scoped, ValuesView):
    __slots__ = ("_mids", "_local")

    def __init__(self, ddict, managers, local: bool = False):
        self._setup(ddict, managers, local)

    def __iter__(self):
        return (v for _, v in self._mapping._iter_items(self._mids))

    def __contains__(self, value):
        return any(v is value or v == value for v in self)


class DDictItemsView(_Scoped, ItemsView):
    __slots__ = ("_mids", "_local")

    def __init__(self, ddict, managers, local: bool = False):
        self._setup(ddict, managers, local)

    def __iter__(self):
        return self._mapping._iter_items(self._mids)

    def __contains__(self, item):
        key, value = item
        if not self._covers(key):
            return False
        v = self._mapping.get(key, _MISSING)
        return v is not _MISSING and (v is value or v == value)


class DDictMappingProxy(Mapping):
    """A read-only view of a DDict, like ``types.MappingProxyType`` of a dict."""

    __slots__ = ("_ddict",)

    def __init__(self, ddict):
        self._ddict = ddict

    def __getitem__(self, key):
        return self._ddict[key]

    def __contains__(self, key):
        return key in self._ddict

    def __iter__(self):
        return iter(self._ddict)

    def __len__(self):
        return len(self._ddict)

    def get(self, key, default=None):
        return self._ddict.get(key, default)

    def keys(self):
        return self._ddict.keys()

    def values(self):
        return self._ddict.values()

    def items(self):
        return self._ddict.items()

    def __hash__(self):
        raise TypeError("unhashable type: 'DDictMappingProxy'")

    def __repr__(self):
        return f"<DDictMappingProxy of {self._ddict!r}>"
