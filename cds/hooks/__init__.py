"""cds as a CDS Hooks 2.0 service (extra ``cds[hooks]``: starlette, uvicorn, PyJWT[crypto], httpx).

::

    from cds.hooks import Settings, create_app
    app = create_app(Settings.from_file("cds-hooks.toml"))   # any ASGI server

or ``cds serve --config cds-hooks.toml``. See ``cds/hooks/README.md`` for the services, the
configuration, the security model and what "no card" means.

This package imports its web dependencies lazily, so ``cds.hooks.cli`` (the ``cds serve`` command)
can be registered in the ``cds`` command line without them and explain what to install.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IssuerConfig", "Settings", "SettingsError", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("Settings", "IssuerConfig", "SettingsError"):
        from cds.hooks import settings

        return getattr(settings, name)
    if name == "create_app":
        from cds.hooks.app import create_app

        return create_app
    raise AttributeError(f"module 'cds.hooks' has no attribute {name!r}")
