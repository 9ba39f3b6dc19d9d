"""Serving throughput: `lmforge serve` against `transformers serve` on the exported copy of the same model.

The workload's GPT (4 layers, 4 heads, 256 wide, vocabulary 8192, context 256), random weights
from the benchmark seed, saved as an lmforge checkpoint and exported with `lmforge export
--format hf`; `transformers serve FOLDER` runs offline on that folder, in its default mode and
with `--continuous-batching` (its paged cache given a size, `CB_CACHE`). Every server is a
process of its own, started once; the client (this process, asyncio + httpx) streams `POST
/v1/completions` with greedy decoding, a 16-token prompt from the tiny Shakespeare validation
split (a different one per request) and 32 new tokens (`BENCH_SERVE_TOKENS`). With C
concurrent clients (1, 4, 16), each client sends its requests (4) one after the other; the rate is
the completion tokens the servers report (`usage`) over the wall time from the first request to
the last answer. Also measured: the time to first token of each request (its first text chunk)
and each server's CPU time per token (its process and those under it, all threads, from /proc:
the serving work itself, less disturbed by other jobs than the wall time). The sides run
interleaved, round after round; the ratio is the median of per-round ratios against the better
transformers mode.

    python bench/serve.py      # BENCH_ROUNDS=3; BENCH_SERVE_CLIENTS=1,4,16; BENCH_SERVE_TOKENS=32;
                               # BENCH_SERVE_CAP=90 (s); BENCH_SERVE_THREADS=1 (every server's torch threads);
                               # BENCH_SERVE_REQUESTS=1:4,4:4,16:4 (clients:requests each)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, ROUNDS, SEED, WORKLOAD, log, machine, median, shakespeare_data, write_summary

CLIENTS = [int(c) for c in os.environ.get("BENCH_SERVE_CLIENTS", "1,4,16").split(",")]
PROMPT, NEW = 16, int(os.environ.get("BENCH_SERVE_TOKENS", "32"))
CAP = float(os.environ.get("BENCH_SERVE_CAP", "90"))  # seconds: a run's wall-time limit per side
# torch threads of every server (OMP_NUM_THREADS). On a CPU shared with other work, a decode
# step's small operators split over 2 threads wait for a descheduled thread at every barrier
# (a 16-row step measured 1.8 s instead of 36 ms under a load average of 18), whoever serves.
THREADS = os.environ.get("BENCH_SERVE_THREADS", "1")
# requests each client sends one after the other, per concurrency: a run measures clients that come
# back (requests leaving and joining the batch), not one burst of a fraction of a second
REQUESTS = {int(c): int(n) for c, n in (pair.split(":") for pair in
                                         os.environ.get("BENCH_SERVE_REQUESTS", "1:4,4:4,16:4").split(","))}
FOLDER = BENCH_DIR / "serve"
# Its paged cache sized for this workload (16 requests of up to 16 + 256 tokens, and room to spare): by default it sizes
# the cache from the machine's memory, and on a shared 23 GB machine the OOM killer stopped it.
CB_CACHE = ["--cb-block-size", "32", "--cb-num-blocks", "256"]


def model_folders() -> tuple[Path, Path]:
    """(lmforge checkpoint, its transformers export), built once."""
    ckpt, hf = FOLDER / "ckpt", FOLDER / "hf"
    if (hf / "config.json").exists():
        return ckpt, hf
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.commands.interop import export_hf
    from lmforge.models.gpt import GPT, GPTConfig

    data = shakespeare_data()
    torch.manual_seed(SEED)
    arch = {k: WORKLOAD[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd", "context")}
    model = GPT(GPTConfig(**arch))
    save_checkpoint(ckpt, model_state=model.state_dict(), model_config={"model_type": "gpt", **model.config.to_dict()},
                    tokenizer_file=data / "tokenizer.json")
    export_hf(ckpt, hf, overwrite=True)
    return ckpt, hf


def prompts(count: int) -> list[str]:
    """`count` different 16-token prompts from the validation split, as text."""
    from lmforge.base.tokenizer import load_tokenizer
    from lmforge.data.store import TokenStore

    data = shakespeare_data()
    tokens = TokenStore(data, "val").tokens
    tok = load_tokenizer(data / "tokenizer.json")
    return [tok.decode([int(t) for t in tokens[i * 97:i * 97 + PROMPT]]) for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port; `model` is the name requests carry."""

    def __init__(self, name: str, command: list[str], model: str) -> None:
        self.name, self.model, self.port = name, model, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_file = open(FOLDER / f"{name.split()[0]}-{self.port}.log", "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": THREADS}
        self.proc = subprocess.Popen([*command, "--port", str(self.port)], stdout=log_file, stderr=subprocess.STDOUT,
                                     env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {FOLDER}/*.log")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout:.0f} s")

    def cpu_seconds(self) -> float:
        """CPU time so far of the server process and of every process under it (a model may run in
        a child), all threads: Linux's /proc, NaN elsewhere. Per token it measures the serving work
        itself, which other jobs on the machine disturb far less than they disturb the wall time."""
        stats = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name
            except OSError:  # a process that just ended
                continue
            stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
        tree = {self.proc.pid}
        while True:  # the server's descendants, level by level
            more = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
            if not more:
                break
            tree |= more
        ticks = sum(stats[pid][1] for pid in tree if pid in stats)
        return ticks / os.sysconf("SC_CLK_TCK") if self.proc.pid in stats else float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one(client, server: Server, prompt: str, got: dict) -> None:
    """Stream one completion into `got`: completion tokens (the server's usage, else the text
    chunks received when the run's time cap cut it), seconds to the first text, the text."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    got.update(tokens=0, ttft=None, text="")
    async with client.stream("POST", server.url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    got["ttft"] = got["ttft"] or time.perf_counter() - start
                    got["text"] += choice["text"]
                    got["tokens"] += 1
            if event.get("usage"):
                got["tokens"] = event["usage"]["completion_tokens"]


async def _run(server: Server, clients: int, texts: list[str]) -> dict:
    """`clients` clients, each sending its requests one after the other, until done or CAP seconds."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    answers: list[dict] = []
    async with httpx.AsyncClient(limits=limits) as client:
        async def one_client(c: int) -> None:
            for i in range(REQUESTS[clients]):
                answers.append({})
                await _one(client, server, texts[(c * REQUESTS[clients] + i) % len(texts)], answers[-1])

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one_client(c)) for c in range(clients)]
        done, late = await asyncio.wait(tasks, timeout=CAP)
        seconds = time.perf_counter() - start
        for task in late:  # the cap: what was not answered by then is cut off (the client disconnects)
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in done:
            task.result()
    return {"tokens_per_s": sum(a.get("tokens", 0) for a in answers) / seconds, "seconds": seconds,
            "ttft": [a["ttft"] if a.get("ttft") is not None else float("inf") for a in answers],
            "texts": [a.get("text", "") for a in answers], "tokens": sum(a.get("tokens", 0) for a in answers),
            "capped": bool(late)}


def run(server: Server, clients: int, texts: list[str]) -> dict:
    cpu = server.cpu_seconds()
    result = asyncio.run(_run(server, clients, texts))
    result["cpu_ms_per_token"] = (server.cpu_seconds() - cpu) * 1000 / max(result["tokens"], 1)
    return result


def _ms(seconds: float) -> str:
    return f"> {CAP:.0f} s (unanswered at the cap)" if seconds == float("inf") else f"{seconds * 1000:,.0f} ms"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    ckpt, hf = model_folders()
    texts = prompts(16)
    bin_dir = Path(sys.executable).parent
    servers = [
        Server("lmforge serve", [str(bin_dir / "lmforge"), "serve", f"bench={ckpt}", "--max-batch", "16",
                                 "--max-tokens", str(NEW)], "bench"),
        Server("transformers serve", [str(bin_dir / "transformers"), "serve", str(hf)], str(hf)),
        Server("transformers serve --continuous-batching",
               [str(bin_dir / "transformers"), "serve", str(hf), "--continuous-batching", *CB_CACHE], str(hf)),
    ]
    try:
        for server in servers:
            server.wait_ready()
        log(f"bench serve | {machine()} | {ROUNDS} rounds | clients {CLIENTS} | {PROMPT}-token prompts, {NEW} new "
            "tokens, greedy, streamed")
        for server in servers:  # warm-up, not counted
            run(server, 1, texts[:1])
        results = {(s.name, c): [] for s in servers for c in CLIENTS}
        for r in range(1, ROUNDS + 1):
            for clients in CLIENTS:
                for server in servers:
                    result = run(server, clients, texts)
                    results[(server.name, clients)].append(result)
                    log(f"{server.name}, {clients} client(s): {result['tokens_per_s']:,.1f} tokens/s, "
                        f"{result['tokens']} tokens in {result['seconds']:.1f} s, "
                        f"server CPU {result['cpu_ms_per_token']:.2f} ms a token"
                        f"{' (cut at the cap)' if result['capped'] else ''} (round {r}/{ROUNDS})")
    finally:
        for server in servers:
            server.stop()
    write_summary("serve", summary(results, [s.name for s in servers]))


def summary(results: dict, names: list[str]) -> list[str]:
    ours, peers = names[0], names[1:]
    lines = [f"## serve: streamed completions, {PROMPT}-token prompts, {NEW} new tokens, greedy, fp32",
             "| clients | server | tokens/s (median) | ratio to the better transformers mode | TTFT median | "
             "TTFT p95 | server CPU a token (median) |", "|---|---|---|---|---|---|---|"]
    for clients in CLIENTS:
        rates = {n: [x["tokens_per_s"] for x in results[(n, clients)]] for n in names}
        best = max(peers, key=lambda n: median(rates[n]))
        per_round = [a / max(b, c) for a, b, c in zip(rates[ours], *(rates[p] for p in peers))]
        for name in names:
            ttft = [t for x in results[(name, clients)] for t in x["ttft"]]
            ratio = f"{median(per_round):.2f}x" if name == ours else ("(better)" if name == best else "")
            cpu = median([x["cpu_ms_per_token"] for x in results[(name, clients)]])
            lines.append(f"| {clients} | {name} | {median(rates[name]):,.0f} | {ratio} | "
                         f"{_ms(median(ttft))} | {_ms(percentile(ttft, 0.95))} | {cpu:.2f} ms |"
                         + (" cut at the cap" if any(x["capped"] for x in results[(name, clients)]) else ""))
    first = CLIENTS[0]
    best = max(peers, key=lambda n: median([x["tokens_per_s"] for x in results[(n, first)]]))
    pairs = list(zip(results[(ours, first)][-1]["texts"], results[(best, first)][-1]["texts"]))
    lines += [f"same greedy text as {best} at {first} client(s): {sum(a == b for a, b in pairs)} of {len(pairs)} "
              "answers (float rounding may flip a near tie)", f"machine: {machine()}",
              f"each run: {', '.join(f'{c} client(s) x {REQUESTS[c]} request(s)' for c in CLIENTS)}; a side's run "
              f"stops at {CAP:.0f} s (its rate is then the tokens streamed by then over {CAP:.0f} s)",
              f"every server with OMP_NUM_THREADS={THREADS}; server CPU: the CPU time of the server process and "
              "the processes under it (all threads, from /proc) over a run, per completion token",
              f"lmforge: lmforge serve {FOLDER / 'ckpt'} --max-batch 16; peer: transformers serve {FOLDER / 'hf'} "
              f"[--continuous-batching {' '.join(CB_CACHE)}]"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
