#!/usr/bin/env python3
"""Measures cluster mode on a running examples/cluster/run.sh (same directory and
ports): what HAProxy and the shared registry cost, and how fast a re-key reaches
every replica. Only the standard library.

    examples/cluster/run.sh &          # wait for "kframe cluster: ..."
    python3 examples/cluster/bench.py [--json]

1. Generation: the same total load (CLIENTS concurrent clients, each completing
   MAX_TOKENS tokens for its own tenant) sent to one replica directly, then to the
   three through HAProxy; aggregate generated tokens/s, alternating, median of PAIRS.
2. Authenticated requests/s and latency of GET /v1/models (authentication from the
   replica's registry cache, no model work), directly and through HAProxy: the
   router's extra latency at p50 and p99.
3. Re-key propagation: REKEYS re-keys through replica a, each timed until replicas
   b and c list the new epoch (their admin API, polled every millisecond).
"""
import http.client, json, os, statistics, sys, threading, time

DIR = os.environ.get("KFRAME_CLUSTER_DIR", "target/cluster")
FRONT = int(os.environ.get("KFRAME_CLUSTER_PORT", "8090"))
REPLICAS = [FRONT + 2, FRONT + 3, FRONT + 4]
CLIENTS, MAX_TOKENS, PAIRS, REKEYS, AUTH_SECONDS = 6, 32, 3, 50, 3.0
ADMIN = open(os.path.join(DIR, "secrets", "admin.token")).read().strip()


def call(conn, method, path, token, body=None):
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body)
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status >= 300:
        raise RuntimeError(f"{method} {path}: {resp.status} {payload[:200]!r}")
    return json.loads(payload) if payload else None


def connect(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=300)


def tenants(n):
    conn, keys = connect(FRONT), []
    stamp = int(time.time())
    for i in range(n):
        keys.append(call(conn, "POST", "/admin/tenants", ADMIN, {"name": f"bench-{stamp}-{i}"})["api_key"])
    return keys


def generation(port, keys, seconds=8.0):
    """Aggregate generated tokens/s of len(keys) clients on `port` for `seconds`."""
    done, stop = [0] * len(keys), time.monotonic() + seconds

    def client(i):
        conn = connect(port)
        while time.monotonic() < stop:
            r = call(conn, "POST", "/v1/completions", keys[i],
                     {"prompt": f"user secret of rosa {1000 + i} . query secret of rosa", "max_tokens": MAX_TOKENS,
                      "temperature": 1.0, "seed": i})
            done[i] += r["usage"]["completion_tokens"]

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - start)


def auth_latency(port, key, seconds=AUTH_SECONDS):
    conn, times, stop = connect(port), [], time.monotonic() + seconds
    while time.monotonic() < stop:
        t = time.perf_counter()
        call(conn, "GET", "/v1/models", key)
        times.append(time.perf_counter() - t)
    return times


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def rekey_delays(name):
    a = connect(REPLICAS[0])
    others = [connect(p) for p in REPLICAS[1:]]
    delays = []
    for _ in range(REKEYS):
        t = time.perf_counter()
        epoch = call(a, "POST", f"/admin/tenants/{name}/rekey", ADMIN, {})["epoch"]
        for conn in others:
            while True:
                listed = call(conn, "GET", "/admin/tenants", ADMIN)["tenants"]
                if next(x["epoch"] for x in listed if x["name"] == name) >= epoch:
                    break
                time.sleep(0.001)
        delays.append(time.perf_counter() - t)
    return delays


def main():
    keys = tenants(CLIENTS)
    time.sleep(1.0)  # every replica has heard of them
    one, three = [], []
    for _ in range(PAIRS):
        one.append(generation(REPLICAS[0], keys))
        time.sleep(1.0)
        three.append(generation(FRONT, keys))
        time.sleep(1.0)
    direct = auth_latency(REPLICAS[0], keys[0])
    routed = auth_latency(FRONT, keys[0])
    name = f"bench-rekey-{int(time.time())}"
    call(connect(FRONT), "POST", "/admin/tenants", ADMIN, {"name": name})
    time.sleep(0.5)
    delays = rekey_delays(name)
    out = {
        "clients": CLIENTS,
        "max_tokens": MAX_TOKENS,
        "cores": os.cpu_count(),
        "tok_s_one_replica": statistics.median(one),
        "tok_s_three_via_haproxy": statistics.median(three),
        "three_over_one": statistics.median(three) / statistics.median(one),
        "auth_req_s_direct": len(direct) / AUTH_SECONDS,
        "auth_req_s_via_haproxy": len(routed) / AUTH_SECONDS,
        "auth_p50_ms_direct": pct(direct, 50) * 1e3,
        "auth_p99_ms_direct": pct(direct, 99) * 1e3,
        "haproxy_extra_p50_ms": (pct(routed, 50) - pct(direct, 50)) * 1e3,
        "haproxy_extra_p99_ms": (pct(routed, 99) - pct(direct, 99)) * 1e3,
        "rekey_propagation_p50_ms": pct(delays, 50) * 1e3,
        "rekey_propagation_p99_ms": pct(delays, 99) * 1e3,
    }
    if "--json" in sys.argv:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:28} {v:.3f}" if isinstance(v, float) else f"{k:28} {v}")


if __name__ == "__main__":
    main()
