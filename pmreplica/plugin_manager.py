"""Building the plugin manager a pool set uses: hook specs, entry-point plugins, host plugins."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import Iterable

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _entry_point_plugins() -> tuple[tuple[str, object], ...]:
    # pluggy's load_setuptools_entrypoints walks every installed distribution on each call;
    # pool sets are opened often, so the group is resolved once per process here.
    found = []
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        try:
            found.append((ep.name, ep.load()))
        except Exception as e:  # a broken third-party plugin must not stop pools opening
            log.warning("pmreplica plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
    return tuple(found)


def notify(pm: pluggy.PluginManager, hook: str, **kwargs: object) -> None:
    """Call the host application's notification hook ``hook``; one that raises is logged,
    never propagated: an application's bug must not break the pool or the write path."""
    try:
        getattr(pm.hook, hook)(**kwargs)
    except Exception:
        log.exception("%s hook raised", hook)


def make_plugin_manager(plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """A manager with the entry-point plugins, then ``plugins``; later ones are asked first,
    so a host application's plugin can take over a replica from a built-in."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, plugin in _entry_point_plugins():
        if pm.get_plugin(name) is None and not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    for plugin in plugins:
        if not pm.is_registered(plugin):
            pm.register(plugin)
    return pm
