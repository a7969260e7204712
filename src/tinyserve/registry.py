"""A registry: the implementations of one engine knob by name, each added with one decorator.

mini-sglang's shape: what registers is usually a small factory that imports its implementation when
called, so listing the names (a flag's choices and help) imports nothing heavy. `auto` is never an
entry: the registry's owner resolves it, in one function next to the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, knob: str) -> None:
        self.knob = knob  # the EngineConfig field (or the file field) whose values name the entries
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.knob} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> T:
        """The entry called `name`; a ValueError naming the knob and its choices for any other name."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"{self.knob} must be one of {', '.join(self._entries)}; got {name!r}") from None

    def check(self, name: str) -> None:
        """A ValueError naming the knob and its choices unless `name` is registered."""
        self[name]

    def help(self) -> str:
        """`name: the first line of its docstring`, for every entry: a flag's help lists what each choice does."""
        return "; ".join(f"{name}: {(entry.__doc__ or '').strip().splitlines()[0]}" if entry.__doc__ else name
                         for name, entry in self._entries.items())
