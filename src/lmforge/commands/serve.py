"""`lmforge serve`: checkpoints behind an OpenAI-compatible HTTP API and a chat page.

Owns the command's checks and start-up: the host is local unless an API key is given (or
`--insecure` says the network is trusted), the serving packages are installed, each
checkpoint loads under a distinct name; then the socket is bound, the URL printed, and the
server runs until Ctrl-C / SIGTERM, which let the requests in flight finish.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import TextIO

from lmforge.inference.checks import check_count

LOCAL_NAMES = {"localhost", "ip6-localhost"}
API_KEY_VARIABLE = "LMFORGE_API_KEY"


def is_local(host: str) -> bool:
    """True for a loopback address or name (only this machine can connect)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    if not is_local(host) and not api_key and not insecure:
        raise ValueError(f"--host {host} lets other machines connect: give an --api-key (or set {API_KEY_VARIABLE}), "
                         "or pass --insecure if the network is trusted")


def _require_serving_packages() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ValueError(f"lmforge serve needs the serving packages ({err.name} is missing): "
                         "pip install 'lmforge[serve]'") from None


def serve_command(models: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  insecure: bool = False, max_batch: int = 16, max_tokens: int = 1024, device: str = "auto",
                  threads: int | None = None, access_log: bool = False, out: TextIO | None = None) -> int:
    """Serve `models` (checkpoint or run folders, each optionally NAME=PATH) until interrupted.

    `threads` sets torch's CPU threads for the process: a decode step is many small operators, and
    on a CPU other programs keep busy each one waits at its barrier for a descheduled thread."""
    out = sys.stdout if out is None else out
    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_VARIABLE) or None)
    check_exposure(host, api_key, insecure)
    check_count(max_batch, "--max-batch")
    check_count(max_tokens, "--max-tokens")
    if threads is not None:
        check_count(threads, "--threads")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be from 0 to 65535 (0 picks a free one)")
    _require_serving_packages()
    from lmforge.serve.served import load_served, split_spec
    from lmforge.serve.server import bind, serve, url_of
    from lmforge.serve.state import ServerState

    names = [split_spec(spec)[0] for spec in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"two models would be named {repeated[0]!r}; name them with NAME=PATH")
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    sock = bind(host, port)
    served = {}
    try:
        for spec in models:
            model = load_served(spec, device, max_batch)
            served[model.name] = model
    except BaseException:
        sock.close()
        for model in served.values():
            model.close()
        raise
    state = ServerState(models=served, max_tokens=max_tokens, api_key=api_key)
    url = url_of(sock)
    for model in served.values():
        print(f"model {model.name}: {model.kind} from {model.loaded.path} ({', '.join(model.abilities)})", file=out)
    print(f"serving on {url}  (chat page: {url}/  API: {url}/v1"
          f"{', API key required' if api_key else ''}; Ctrl-C to stop)", file=out, flush=True)
    serve(state, sock, access_log=access_log)
    return 0
