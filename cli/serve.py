"""``greenroute serve``: the HTTP service under uvicorn (imports no build or bench code; a
missing ladder is built first, importing :mod:`cli.build` only then)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import uvicorn

from app.main import create_app
from app.settings import Settings


def _exit_zero(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    overrides = {"ladder_dir": Path(args.ladder)} if args.ladder else {}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if not (settings.ladder_dir / "manifest.json").is_file():
        print(f"no ladder in {settings.ladder_dir}; building the default ladder there first",
              file=sys.stderr)
        from cli import build
        from cli.main import build_parser

        code = build.run(build_parser().parse_args(["build", "--out",
                                                    str(settings.ladder_dir)]))
        if code:
            return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    from app.settings import open_binding_warning
    from models.runtime.engine.session import share_pool_if_uniform
    from models.runtime.manifest import Manifest

    warning = open_binding_warning(args.host, settings)
    if warning:
        logging.getLogger("greenroute").warning(warning)

    try:  # the manifest's measured threads, unless the settings name some
        manifest: Manifest | None = Manifest.load(settings.ladder_dir)
    except (OSError, ValueError):  # start-up reports a broken manifest
        manifest = None
    share_pool_if_uniform(settings.threads, settings.threads_by_variant(manifest).values())
    # uvicorn drains in-flight requests on SIGTERM, restores this handler and re-raises the
    # signal into it: a drained shutdown then exits 0 instead of "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _exit_zero)
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                timeout_graceful_shutdown=int(settings.shutdown_grace_s),
                log_level=args.log_level)
    return 0
