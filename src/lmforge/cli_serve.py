"""`lmforge serve`'s arguments (a group of cli.py, kept beside it)."""

from __future__ import annotations

import argparse


def add(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and a chat page over checkpoints",
                       description="Serve checkpoints over HTTP: /v1/chat/completions, /v1/completions, "
                                   "/v1/embeddings, /v1/classify, /v1/models, and a chat page at /.")
    p.add_argument("models", nargs="+", metavar="RUN_OR_CHECKPOINT",
                   help="run or checkpoint folders; NAME=PATH names one (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY, else none)")
    p.add_argument("--insecure", action="store_true", help="allow a non-local --host without an API key")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per model")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens one request may ask for")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads (default: torch's choice; 1 on a CPU busy with other work)")
    p.add_argument("--access-log", action="store_true", help="print a line per request")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from lmforge.commands.serve import serve_command
    return serve_command(args.models, host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure,
                         max_batch=args.max_batch, max_tokens=args.max_tokens, device=args.device,
                         threads=args.threads, access_log=args.access_log)
