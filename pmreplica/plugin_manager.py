"""Building the plugin manager a pool set uses: hook specs, entry-point plugins, host plugins."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from typing import Any, Iterable

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _entry_point_plugins() -> tuple[tuple[str, object], ...]:
    # pluggy's load_setuptools_entrypoints walks every installed distribution on each call;
    # pool sets are opened often, so the group is resolved once per process here.
    # Each is registered under its entry point's name; one whose name another took (two
    # distributions each naming theirs "local", say) is registered too, under the name
    # qualified by its distribution's, and said so once: none is left out or taken over.
    found: list[tuple[str, object]] = []
    owners: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must not stop pools opening
            log.warning("pmreplica plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if any(p is plugin for _, p in found):
            continue  # the same module, listed again
        dist = ep.dist.name if ep.dist is not None else ep.value
        name = ep.name
        if name in owners:
            name = f"{dist}:{ep.name}"
            log.warning("pmreplica plugin %r of %s: the name is taken by %s's; registered as "
                        "%r", ep.name, dist, owners[ep.name], name)
        owners.setdefault(ep.name, dist)
        found.append((name, plugin))
    return tuple(found)


def each_implementation(pm: pluggy.PluginManager, hook: str, **kwargs: object
                        ) -> Iterator[tuple[object, Callable[[], Any]]]:
    """``hook``'s implementations in the order pluggy calls them, each as its plugin and a
    call of it alone with ``kwargs``. pluggy calls them as one: the first to raise ends the
    call, and a firstresult hook does not say whose answer it took."""
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        yield impl.plugin, functools.partial(
            impl.function, *(kwargs[name] for name in impl.argnames))


def notify(pm: pluggy.PluginManager, hook: str, **kwargs: object) -> None:
    """Call every plugin's implementation of the notification hook ``hook``, in pluggy's
    order; one that raises is logged, never propagated: an application's bug must not
    break the pool or the write path, nor keep the other plugins from being told (a hook
    call stops at the first exception, so each implementation is called on its own)."""
    for plugin, call in each_implementation(pm, hook, **kwargs):
        try:
            call()
        except Exception:
            log.exception("%s hook raised (%s)", hook,
                          getattr(plugin, "__name__", None) or type(plugin).__name__)


def make_plugin_manager(plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """A manager with the entry-point plugins, then ``plugins``; later ones are asked first,
    so a host application's plugin can take over a replica from a built-in."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, plugin in _entry_point_plugins():
        if not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    for plugin in plugins:
        if not pm.is_registered(plugin):
            pm.register(plugin)
    return pm
