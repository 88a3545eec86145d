"""Which tensor each state key of a ``GradientStabilizer`` stands for.

The state is keyed by parameter name (``apply(module)``) or position (an optimizer, a list), so
two targets whose names or positions collide would silently share one (m, v, k): ``apply(gen)``
then ``apply(disc)`` of two ``nn.Sequential`` would feed ``0.weight`` of both into one
statistic, and ``apply(model)`` then ``apply(optimizer)`` would keep two states for each
parameter. ``Bindings`` remembers, weakly, the tensor each key was given for and refuses a key
that now names another live tensor, a tensor whose statistics were built for another shape, or a
tensor that already has state under another key.

A parameter that was replaced (``model.to_empty()``, ``load_state_dict(assign=True)``) is not
an error: its old tensor is gone, and the key moves to the new one if the shape is the same.

Cost: a step that passes the same tensors under the same keys as the last verified one is
recognized from their ids (two list comparisons at C speed); the per-key checks run only when
the tensors change, or after a bound tensor was freed (a weak-reference callback notes it).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor

from gradstab._warn import user_stacklevel

Key = str | int

RESET_ADVICE = "stab.reset() forgets all statistics and starts over"


class Bindings:
    """The tensor (weakly) and shape each state key was last given for; see the module doc."""

    def __init__(self) -> None:
        self._of_key: dict[Key, tuple[weakref.ref, tuple[int, ...]]] = {}
        self._key_of: dict[int, tuple[weakref.ref, Key]] = {}  # by id(tensor)
        self._verified_ids: list[int] | None = None
        self._verified_keys: list[Key] | None = None
        self._kinds: set[type] = set()
        self._warned_mix = False

    def _forget_verified(self, _ref: Any = None) -> None:
        """A bound tensor was freed: its id may come back for another tensor."""
        self._verified_ids = None

    def check(
        self,
        keys: list[Key],
        tensors: list[Tensor],
        ids: list[int],
        label: Callable[[int], str],
        has_state: Callable[[Key], bool],
    ) -> None:
        """Binds ``keys[i]`` to ``tensors[i]`` or raises ``RuntimeError`` naming the parameter.

        ``ids``: ``id`` of each tensor; ``label(i)``: how errors name parameter i;
        ``has_state(key)``: whether per-parameter statistics exist for ``key`` (a replaced
        parameter of another shape is refused only then).
        """
        if ids == self._verified_ids and keys == self._verified_keys:
            return
        for i, (key, tensor) in enumerate(zip(keys, tensors)):
            self._check_one(key, tensor, label(i), has_state)
        kinds = set(map(type, keys))
        if not self._warned_mix and len(self._kinds | kinds) > 1:
            self._warned_mix = True
            warnings.warn(
                "gradstab: this GradientStabilizer now keeps state keyed by parameter name (from "
                "apply(module)) and by position (from apply(optimizer) or a list of tensors); "
                "positions are not stable names, so give each kind of target its own "
                "GradientStabilizer",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        self._kinds |= kinds
        for key, tensor in zip(keys, tensors):
            ref = weakref.ref(tensor, self._forget_verified)
            self._of_key[key] = (ref, tuple(tensor.shape))
            self._key_of[id(tensor)] = (ref, key)
        self._verified_ids, self._verified_keys = ids, list(keys)

    def _check_one(
        self, key: Key, tensor: Tensor, label: str, has_state: Callable[[Key], bool]
    ) -> None:
        bound = self._of_key.get(key)
        if bound is not None:
            ref, shape = bound
            old = ref()
            if old is not None and old is not tensor:
                raise RuntimeError(
                    f"gradstab: {label} is not the tensor whose statistics this "
                    f"GradientStabilizer keeps under the key {key!r}: another tensor of that "
                    "name or position was stabilized before and still exists (two models or "
                    "modules applied in turn?). Their statistics must not be shared: use one "
                    "GradientStabilizer (or callback) per model you apply it to, or apply it to "
                    "a module that contains both, so that their names differ by a prefix; "
                    f"{RESET_ADVICE}"
                )
            if tuple(tensor.shape) != shape and has_state(key):
                raise RuntimeError(
                    f"gradstab: the statistics under the key {key!r} were built for a tensor of "
                    f"shape {shape}, but {label} has shape {tuple(tensor.shape)} (was the "
                    "parameter replaced?); statistics of another tensor do not carry over: "
                    f"{RESET_ADVICE}, or use a new GradientStabilizer"
                )
        owner = self._key_of.get(id(tensor))
        if owner is not None and owner[0]() is tensor and owner[1] != key:
            raise RuntimeError(
                f"gradstab: {label} already has statistics under the key {owner[1]!r}, from an "
                "earlier apply() that named it differently (apply(model) and then "
                "apply(optimizer), or a module and one of its submodules?): it would be "
                "stabilized with two states. Pass the same kind of target to apply() every "
                f"step, or use one GradientStabilizer per target; {RESET_ADVICE}"
            )
