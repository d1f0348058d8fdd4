"""`alignkit serve` under a slowloris attack: real clients' latency with and without slow sockets.

    python benchmarks/bench_serve_slowloris.py                      # 50 slow sockets, 20 real requests
    python benchmarks/bench_serve_slowloris.py --slow 200 --real 100

A nano Llama with a small BPE tokenizer (untrained weights: only the server is measured) is served
with the default Config except `read_deadline_s` (--deadline). Two phases in one run: `--real`
chat requests (max_tokens 2, 4 clients at a time) alone, then the same while `--slow` sockets each
send one byte of a request line every 0.1 s. Reported per phase: how many real requests got 200,
p50 / p99 / max latency; and how many slow sockets were cut (408 or closed) at the deadline.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import save_model, tiny_llama
from alignkit.serve import Config, start


def _real(url: str, n: int) -> list[tuple[int, float]]:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}).encode()

    def one(_):
        t = time.monotonic()
        req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        return status, time.monotonic() - t

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def _summary(results: list[tuple[int, float]]) -> dict:
    lat = sorted(t for _, t in results)
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 4)  # noqa: E731
    return {"ok": sum(s == 200 for s, _ in results), "n": len(results), "p50_s": pick(0.5), "p99_s": pick(0.99),
            "max_s": round(lat[-1], 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--real", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=3.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_bpe_tokenizer(["hello there, how are you today?"] * 50, vocab_size=300)
        save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, f"{tmp}/model")
        with start(Config(model=f"{tmp}/model", port=0, read_deadline_s=args.deadline)) as srv:
            _real(srv.url, 4)  # warm-up
            alone = _summary(_real(srv.url, args.real))
            host, port = srv.host, srv.port
            slow = [socket.create_connection((host, port)) for _ in range(args.slow)]
            stop = threading.Event()

            def trickle():
                while not stop.wait(0.1):
                    for s in slow:
                        try:
                            s.send(b"P")
                        except OSError:
                            pass

            dripper = threading.Thread(target=trickle)
            dripper.start()
            time.sleep(0.3)
            attacked = _summary(_real(srv.url, args.real))
            time.sleep(args.deadline + 0.5)
            cut = 0
            for s in slow:
                s.settimeout(2.0)
                try:
                    data = s.recv(64)
                    cut += data == b"" or data.startswith(b"HTTP/1.1 408")
                except OSError:
                    cut += 1
            stop.set()
            dripper.join()
            for s in slow:
                s.close()
    print(f"{'phase':<24}{'ok':>8}{'p50 s':>10}{'p99 s':>10}{'max s':>10}")
    for name, r in (("real alone", alone), (f"real + {args.slow} slow", attacked)):
        print(f"{name:<24}{r['ok']:>5}/{r['n']:<2}{r['p50_s']:>10}{r['p99_s']:>10}{r['max_s']:>10}")
    print(f"slow sockets cut at the {args.deadline:g} s deadline: {cut}/{args.slow}")
    print(json.dumps({"alone": alone, "with_slow": attacked, "slow": args.slow, "slow_cut": cut,
                      "deadline_s": args.deadline}))  # fmt: skip


if __name__ == "__main__":
    main()
