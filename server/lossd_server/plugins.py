"""Bring your own loss: a torch function in your package, served like every built-in.

::

    # mypkg/losses.py
    import torch
    from lossd_server.plugins import register

    def charbonnier(input: torch.Tensor, target: torch.Tensor, *, eps: float) -> torch.Tensor:
        return torch.sqrt((input - target) ** 2 + eps ** 2)  # elementwise: reduction='none'

    register("charbonnier", charbonnier, options={"eps": 1e-3}, targets="values",
             description="Charbonnier (smooth L1) loss")

A registered loss gets what a built-in gets (the built-ins register through this same
:func:`register`): validation, the per-sample rule and exact aggregates, ``nan_policy``,
weights, streams and split batches, gradients (torch autograd through ``fn``), shared
memory, the Open Inference Protocol endpoint, ListLosses, metrics labels, the GPU.

Loading, in every server process (``app.create_server``): the modules of ``lossd serve
--plugin MODULE`` (repeatable; ``LOSSD_PLUGINS``, comma-separated), then every installed
entry point of group ``lossd.losses`` (``--no-entry-points`` turns that off)::

    [project.entry-points."lossd.losses"]
    mypkg = "mypkg.losses"            # a module: importing it registers its losses
    # or "mypkg.losses:setup"         # a function called with no arguments

Each is loaded once per process. A plugin that fails to import, registers a name that is
taken or declares an option of an unsupported type raises :class:`PluginError`, naming the
plugin and the problem: the server refuses to start (``lossd serve`` exits 2).

At evaluation, a loss function that raises, or returns something other than a tensor of
the compute dtype on the device with N first, makes the call INTERNAL with a message
naming the loss and what was wrong (never the function's exception text; the traceback is
in the server log), and the server goes on serving.

What a plugin's function may rely on:

- **Its arguments are its own.** It gets copies of the request's tensors, so nothing it
  writes (in place, through ``.data`` or ``.numpy()``) reaches the caller's memory (a
  request's bytes, a shared-memory region) or the accuracy, diagnostics and per-class
  analyses, which read the originals. Writing in place through torch is still reported
  as a bad function (INTERNAL): it is a bug in the loss. The copies cost one pass over
  the batch; the built-ins, which never write, get the request's tensors.
- **One call at a time, unless it says otherwise.** The server computes from several
  threads at once (``--slots``); a function registered as it is takes turns (a lock per
  loss), so state it keeps needs no care. ``register(..., thread_safe=True)`` (or
  ``@loss(..., thread_safe=True)``) lets the slots run it side by side: right for a pure
  torch function, which is thread-safe as torch is.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import lossd_server.losses as _builtins  # the built-ins register first: their names are taken
from lossd_server.catalogue import (
    LOSSES,
    Check,
    Input,
    Loss,
    Option,
    Targets,
    TargetsName,
    register,
    registering_for,
)
from lossd_server.errors import PluginError, RegistrationError, RequestError

__all__ = ["ENTRY_POINT_GROUP", "LOSSES", "Input", "Loss", "Option", "Plugin", "PluginError",
           "RegistrationError", "RequestError", "Targets", "load", "loss", "register"]

log = logging.getLogger("lossd.plugins")
ENTRY_POINT_GROUP = "lossd.losses"
BUILTINS = _builtins.BUILTINS

FnT = TypeVar("FnT", bound=Callable[..., Any])


def loss(name: str | None = None, *, options: dict[str, Any], targets: TargetsName | Targets,
         description: str = "",
         inputs: dict[str, Input | Literal["values", "float", "int"]] | None = None,
         check: Check | None = None, sum_class_dim: bool = False, samplewise: bool = True,
         min_prediction_dims: int = 1, max_prediction_dims: int | None = None,
         prediction_shapes: tuple[str, ...] | None = None,
         target_shapes: tuple[str, ...] | None = None,
         thread_safe: bool = False) -> Callable[[FnT], FnT]:
    """:func:`register` as a decorator; the name defaults to the function's::

        @loss(options={"eps": 1e-3}, targets="values")
        def charbonnier(input, target, *, eps): ...
    """
    def decorate(fn: FnT) -> FnT:
        register(name or fn.__name__, fn, options=options, targets=targets,
                 description=description or (fn.__doc__ or "").strip().split("\n")[0],
                 inputs=inputs, check=check, sum_class_dim=sum_class_dim,
                 samplewise=samplewise,
                 min_prediction_dims=min_prediction_dims,
                 max_prediction_dims=max_prediction_dims,
                 prediction_shapes=prediction_shapes, target_shapes=target_shapes,
                 thread_safe=thread_safe)
        return fn
    return decorate


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: what was loaded (``module`` or ``module:function``), from where,
    and the losses it registered."""

    target: str
    origin: str
    losses: tuple[str, ...]


_loaded: dict[str, Plugin] = {}
_lock = threading.Lock()


def load(modules: Sequence[str] = (), *, entry_points: bool = True) -> list[Plugin]:
    """Load the plugin ``modules`` (``module`` or ``module:function``), then, with
    ``entry_points``, every entry point of group ``lossd.losses``; returns those loaded by
    this call (each is loaded once per process). Raises :class:`PluginError`."""
    todo = [(m.strip(), "--plugin") for m in modules if m.strip()]
    if entry_points:
        found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(found, key=lambda e: (_dist(e), e.name)):
            todo.append((ep.value, f"entry point {ep.name!r} of {_dist(ep)}"))
    loaded: list[Plugin] = []
    with _lock:
        for target, origin in todo:
            if target in _loaded:
                continue
            plugin = _load_one(target, origin)
            _loaded[target] = plugin
            loaded.append(plugin)
    return loaded


def _dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def _load_one(target: str, origin: str) -> Plugin:
    module_name, _, attr = target.partition(":")
    where = f"plugin {target!r} ({origin})"
    before = set(LOSSES)
    try:
        with registering_for(f"{target} ({origin})"):
            obj = _step(where, f"cannot import {module_name!r}:",
                        lambda: importlib.import_module(module_name))
            if attr:
                for part in attr.split("."):
                    obj = getattr(obj, part, None)
                    if obj is None:
                        raise PluginError(f"{where}: module {module_name!r} has no {attr!r}")
                if not callable(obj):
                    raise PluginError(f"{where}: {attr!r} is a {type(obj).__name__}, not a "
                                      "function to call")
                _step(where, f"{attr}() raised", obj)
    except RegistrationError as exc:
        _forget_new(before)
        raise PluginError(f"{where}: {exc}") from exc
    except PluginError:
        _forget_new(before)
        raise
    added = tuple(name for name in LOSSES if name not in before)
    if added:
        log.info("plugin loaded", extra={"plugin": target, "origin": origin,
                                         "losses": list(added)})
    else:
        log.warning("plugin registered no loss (loaded before, or it registers nothing)",
                    extra={"plugin": target, "origin": origin})
    return Plugin(target, origin, added)


def _step(where: str, failed: str, step: Callable[[], Any]) -> Any:
    """``step()``; a declaration it registers that cannot be served stays a
    RegistrationError, any other exception becomes a PluginError (traceback in the log)."""
    try:
        return step()
    except RegistrationError:
        raise
    except Exception as exc:
        log.error("plugin failed to load", exc_info=True, extra={"plugin": where})
        raise PluginError(f"{where}: {failed} {type(exc).__name__}: {exc}") from exc


def _forget_new(before: set[str]) -> None:
    """Take back what a plugin registered before it failed: it is not loaded at all."""
    for name in [n for n in LOSSES if n not in before]:
        LOSSES.remove(name)
