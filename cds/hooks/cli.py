"""``cds serve``: run the CDS Hooks service with uvicorn.

::

    cds serve [--host 127.0.0.1] [--port 8080] [--config FILE] [--insecure-dev-no-auth]

This module imports only the standard library at import time, so the ``cds`` command can always
register ``serve``; the web dependencies (extra ``cds[hooks]``) are imported when it runs.
``python -m cds.hooks serve ...`` works too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

EXIT_BAD_INPUT = 2


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on an ``argparse`` subparsers object (``cds/cli.py`` calls this)."""
    p = sub.add_parser("serve", help="run the CDS Hooks 2.0 service (needs the cds[hooks] extra)",
                       description="Serve cds as CDS Hooks services: discovery at /cds-services, "
                                   "patient-view, encounter-start and order-select, with card feedback.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--config", metavar="FILE", help="settings file, TOML (.toml) or JSON; see cds/hooks/README.md")
    p.add_argument("--insecure-dev-no-auth", action="store_true",
                   help="accept calls WITHOUT a JWT: local development only, never on a network")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from cds.hooks.app import create_app
        from cds.hooks.settings import Settings, SettingsError
    except ImportError as exc:
        print(f"cds serve: missing dependency ({exc.name}); install the extra: pip install 'cds[hooks]'",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    overrides: dict[str, Any] = {}
    if args.insecure_dev_no_auth:
        overrides["insecure_dev_no_auth"] = True
    try:
        settings = Settings.from_file(args.config, **overrides) if args.config else \
            Settings.from_mapping({}, **overrides)
    except SettingsError as exc:
        print(f"cds serve: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not 0 < args.port < 65536:
        print("cds serve: --port must be between 1 and 65535", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # access_log off: uvicorn's access log prints query strings; cds.hooks logs method, path and status.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                server_header=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cds.hooks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
