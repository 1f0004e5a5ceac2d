#!/usr/bin/env python3
"""User-space instructions per cached Duplicati /refresh, counted by callgrind.

    python3 benches/scripts/callgrind-refresh.py target/release/latchkey OUT [N]

Starts `latchkey serve` under `valgrind --tool=callgrind` with the
configuration `loadtest product` gives it (`loadtest operator-config`, found
beside the latchkey binary: sled in a temporary directory, the default
request log to a file, `[limits]` raised), with a stand-in provider in this
script; logs in once the way a browser does;
sends 200 requests to fill the cache; then zeroes callgrind's counters, sends N
(default 5000) `GET /refresh` with `X-AuthID` on one keep-alive connection,
and dumps the counters to OUT.1. Prints the instructions per request.

Callgrind counts instructions, not time: the same binary gives the same count
within about 1 % whatever else the machine is doing (the log writer's idle
polls, which follow the wall clock, are counted too), so two builds can be
compared on a busy or noisy machine. It does not count the kernel's work, and under valgrind
sha2 takes its portable path (no SHA extensions), so SHA-256 weighs about ten
times what it does on the real CPU. `callgrind_annotate --inclusive=yes OUT.1`
shows where the instructions go. Needs valgrind, Python 3 (standard library) and `loadtest`
(`cargo build --release -p latchkey-benches --bins`).
"""

import http.client
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import parse_qs, urlencode, urlparse


class Provider(http.server.BaseHTTPRequestHandler):
    """Answers every token request with a token that lasts an hour."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"] or 0))
        body = json.dumps(
            {"access_token": "at-" + "x" * 40, "refresh_token": "rt-1", "expires_in": 3600, "token_type": "bearer"}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def request(port, method, target, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, target, body=body, headers=headers or {})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, response.headers, text


def hidden_fields(html, action):
    start = html.index(f'action="{action}"')
    form = html[start : start + html[start:].index("</form>")]
    fields = []
    for field in form.split("<input type=hidden name=")[1:]:
        name, rest = field.split(' value="', 1)
        fields.append((name, rest.split('"', 1)[0].replace("&amp;", "&")))
    return fields


def main():
    binary, out = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    provider = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    provider_url = f"http://127.0.0.1:{provider.server_address[1]}"
    work = tempfile.mkdtemp(prefix="latchkey-callgrind-")
    with http.server.socketserver.TCPServer(("127.0.0.1", 0), None) as probe:
        port = probe.server_address[1]
    loadtest = os.path.join(os.path.dirname(binary), "loadtest")
    config = subprocess.run(
        [loadtest, "operator-config", "--listen", f"127.0.0.1:{port}", "--provider", provider_url, "--data", f"{work}/data"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with open(f"{work}/latchkey.toml", "w") as f:
        f.write(config)
    env = {k: v for k, v in os.environ.items() if k != "LATCHKEY_LOG"}
    broker = subprocess.Popen(
        # --fair-sched: sled starts its thread pool behind a spin-wait, which
        # valgrind's default scheduler can leave spinning for minutes.
        [
            "valgrind",
            "--tool=callgrind",
            "--fair-sched=yes",
            f"--callgrind-out-file={out}",
            binary,
            "serve",
            "--config",
            f"{work}/latchkey.toml",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(f"{work}/latchkey.log", "w"),
        env=env,
    )
    try:
        for _ in range(600):
            try:
                if request(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit(f"latchkey did not answer /healthz in 2 minutes; see {work}/latchkey.log")
        # A browser's login: the confirmation page, its form, the provider
        # (stood in for: straight back with a code), the callback.
        _, headers, page = request(port, "GET", "/login?id=fake")
        cookie = next(c for c in headers.get_all("set-cookie") if "latchkey-login=" in c).split(";")[0]
        base = f"http://127.0.0.1:{port}"
        form = urlencode(hidden_fields(page, "/login"))
        _, headers, _ = request(
            port,
            "POST",
            "/login",
            {"Cookie": cookie, "Origin": base, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/x-www-form-urlencoded"},
            form,
        )
        query = parse_qs(urlparse(headers["location"]).query)
        callback = urlparse(query["redirect_uri"][0]).path + "?" + urlencode({"code": "c1", "state": query["state"][0]})
        status, headers, page = request(port, "GET", callback, {"Cookie": cookie})
        for _ in range(10):
            if status not in (301, 302, 303, 307):
                break
            status, headers, page = request(port, "GET", urlparse(headers["location"]).path or "/", {"Cookie": cookie})
        authid = page.split('data-authid="')[1].split('"')[0]

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def refresh():
            conn.request("GET", "/refresh", headers={"X-AuthID": authid})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body)

        for _ in range(200):
            refresh()
        subprocess.run(["callgrind_control", "-z", str(broker.pid)], check=True, stdout=subprocess.DEVNULL)
        for _ in range(n):
            refresh()
        subprocess.run(["callgrind_control", "-d", str(broker.pid)], check=True, stdout=subprocess.DEVNULL)
    finally:
        broker.terminate()
        broker.wait()
    annotated = subprocess.run(["callgrind_annotate", f"{out}.1"], capture_output=True, text=True).stdout
    total = next(line for line in annotated.splitlines() if "PROGRAM TOTALS" in line).split()[0].replace(",", "")
    print(f"{int(total) / n:.0f} instructions per request ({total} for {n} requests); details: callgrind_annotate --inclusive=yes {out}.1")


if __name__ == "__main__":
    main()
