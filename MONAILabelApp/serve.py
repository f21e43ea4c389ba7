#!/usr/bin/env python
"""Serve the RadDiag MONAI Label app to a team: token auth with roles, CORS limited to listed
origins, validated inputs, inference off the event loop behind a bounded queue, crash-safe
datastore writes. Wraps MONAI Label (its app, datastore and tasks) without changing it.

    python MONAILabelApp/serve.py add-user --auth-config auth.json --name alice --role admin
    python MONAILabelApp/serve.py remove-user --auth-config auth.json --name alice
    python MONAILabelApp/serve.py --app MONAILabelApp --studies DIR|http://host:8042/dicom-web \
        --conf models raddiagseg --auth-config auth.json [--host 127.0.0.1 --port 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from server.auth import ROLES, AuthConfigError, TokenStore, add_user, remove_user  # `server` sits next to this script
from server.validation import Limits

HERE = os.path.dirname(os.path.abspath(__file__))


def start_parser():
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--app", default=HERE, help="MONAI Label app folder (default: this folder)")
    p.add_argument("--studies", required=True, help="image folder, or a DICOMweb URL such as http://127.0.0.1:8042/dicom-web")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[], help="app config, repeatable")
    p.add_argument("--auth-config", required=True, help="JSON file of users, roles and token hashes (see add-user)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; use a TLS proxy for a network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cors-origin", action="append", default=[], help="browser origin allowed to call the API, repeatable")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--ssl-certfile")
    p.add_argument("--max-queue", type=int, default=16, help="inference requests running + waiting before 503")
    p.add_argument("--max-queue-per-user", type=int, default=None,
                   help="of those, the most one user may hold before 429 (default: half of --max-queue, rounded up)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest request body (upload) accepted")
    p.add_argument("--max-decoded-mb", type=float, default=1024,
                   help="largest pixel data an upload may declare (after decompression); checked before inflating")
    p.add_argument("--max-question-chars", type=int, default=2000)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def user_parser(command="add-user"):
    what = {"add-user": "create or replace a user; prints the new token once (a running server uses it within seconds)",
            "remove-user": "delete a user; a running server refuses their token within seconds"}[command]
    p = argparse.ArgumentParser(prog=f"serve.py {command}", description=what)
    p.add_argument("--auth-config", required=True)
    p.add_argument("--name", required=True)
    if command == "add-user":
        p.add_argument("--role", required=True, choices=ROLES)
    return p


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["add-user"], ["remove-user"]):
        args = user_parser(argv[0]).parse_args(argv[1:])
        try:
            if argv[0] == "remove-user":
                remove_user(args.auth_config, args.name)
            else:
                print(add_user(args.auth_config, args.name, args.role))
        except AuthConfigError as e:
            return fail(str(e))
        return 0

    args = start_parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.app, "main.py")):
        return fail(f"--app {args.app} has no main.py; point it at the MONAILabelApp folder")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        return fail("give both --ssl-keyfile and --ssl-certfile, or neither")
    if args.max_queue < 1:
        return fail("--max-queue must be at least 1")
    if args.max_queue_per_user is not None and not 1 <= args.max_queue_per_user <= args.max_queue:
        return fail("--max-queue-per-user must be between 1 and --max-queue")
    try:
        TokenStore.load(args.auth_config)
    except AuthConfigError as e:
        return fail(str(e))
    for origin in args.cors_origin:
        if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
            return fail(f"--cors-origin {origin!r} must look like https://host[:port] (no trailing slash)")

    import uvicorn

    from server.application import ServeOptions, build_app, prepare_datastore
    from server.middleware import RedactingFilter

    options = ServeOptions(
        app_dir=args.app, studies=args.studies, auth_config=args.auth_config, conf=dict(args.conf),
        cors_origins=args.cors_origin, max_queue=args.max_queue, max_queue_per_user=args.max_queue_per_user,
        limits=Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_question_chars=args.max_question_chars,
                      max_decoded_bytes=int(args.max_decoded_mb * 1024 * 1024)),
    )
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] [%(levelname)s] (%(name)s) %(message)s")
    app = build_app(options)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile, timeout_graceful_shutdown=5,
        # keep idle connections longer than a client waits after a 503 (Retry-After) or between status polls;
        # uvicorn's default of 5 s races clients that reuse a connection after a 5 s wait
        timeout_keep_alive=75,
    )  # configures uvicorn's loggers; the filters go on afterwards
    redact = RedactingFilter()
    for name in ("uvicorn.access", "uvicorn.error", ""):
        logging.getLogger(name).addFilter(redact)
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(redact)
    prepare_datastore(options)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
