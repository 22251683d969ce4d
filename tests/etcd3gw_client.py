"""Drives PyPI's etcd3gw (a real client of etcd's HTTP/JSON gateway) against one endpoint and
prints what it observed, one JSON line per step, so tests/gateway_etcd3gw.rs can run it
against etcd and against etcd-fanout and compare.

Usage: python3 tests/etcd3gw_client.py PORT [CA_CERT CLIENT_CERT CLIENT_KEY]
(with the three files: https, the CA verifying the server and a client certificate)
Lease ids and TTL countdowns differ between clusters and are reduced to stable facts.
"""

import json
import queue
import sys
import threading

import etcd3gw


def out(step, value):
    print(json.dumps({"step": step, "value": value}, sort_keys=True), flush=True)


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def main():
    port = int(sys.argv[1])
    if len(sys.argv) > 4:
        c = etcd3gw.client(
            host="127.0.0.1",
            port=port,
            protocol="https",
            ca_cert=sys.argv[2],
            cert_cert=sys.argv[3],
            cert_key=sys.argv[4],
            timeout=10,
        )
    else:
        c = etcd3gw.client(host="127.0.0.1", port=port, timeout=10)
    out("api_path", c.api_path)

    # put / get / prefix get
    out("put1", c.put("/apisix/routes/1", '{"uri":"/a"}'))
    out("put2", c.put("/apisix/routes/2", '{"uri":"/b"}'))
    out("put_other", c.put("/other/x", "o"))
    out("get1", [text(v) for v in c.get("/apisix/routes/1")])
    out("get_missing", c.get("/apisix/routes/none"))
    vals = c.get("/apisix/routes/1", metadata=True)
    out("get1_meta", [[text(v), {k: text(x) for k, x in m.items()}] for v, m in vals])
    pre = c.get_prefix("/apisix/routes/")
    out("get_prefix", [[text(v), text(m["key"]), m["mod_revision"]] for v, m in pre])
    out("get_all_sorted", [text(v) for v, _ in c.get_all()])

    # watch: a prefix watch sees a put and a delete
    events, cancel = c.watch_prefix("/apisix/routes/")
    got = queue.Queue()

    def reader():
        for ev in events:
            got.put(ev)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    import time

    time.sleep(0.5)
    c.put("/apisix/routes/3", '{"uri":"/c"}')
    c.delete("/apisix/routes/2")
    seen = []
    for _ in range(2):
        ev = got.get(timeout=10)
        kv = ev["kv"]
        seen.append(
            [ev.get("type", "PUT"), text(kv["key"]), text(kv.get("value", "")), kv["mod_revision"]]
        )
    cancel()
    out("watch_events", seen)

    # watch from a past revision replays history
    events, cancel = c.watch("/apisix/routes/1", start_revision=1)
    ev = next(events)
    out("watch_history", [text(ev["kv"]["key"]), text(ev["kv"]["value"]), ev["kv"]["mod_revision"]])
    cancel()

    # transactions
    out("replace_ok", c.replace("/apisix/routes/1", '{"uri":"/a"}', '{"uri":"/a2"}'))
    out("replace_stale", c.replace("/apisix/routes/1", '{"uri":"/a"}', '{"uri":"/a3"}'))
    out("create_exists", c.create("/apisix/routes/1", "x"))
    out("create_new", c.create("/apisix/routes/4", "y"))

    # leases: grant, attach, ttl, keepalive, keys, revoke
    lease = c.lease(ttl=30)
    out("lease_ttl_range", 0 < lease.ttl() <= 30)
    out("lease_put", c.put("/apisix/data_plane/server_info/1", "{}", lease=lease))
    out("lease_keys", [text(k) for k in lease.keys()])
    out("lease_refresh", lease.refresh())
    out("lease_revoke", lease.revoke())
    out("after_revoke", c.get("/apisix/data_plane/server_info/1"))

    out("delete", c.delete("/apisix/routes/4"))
    out("delete_missing", c.delete("/apisix/routes/4"))
    out("delete_prefix", c.delete_prefix("/other/"))
    out("members", len(c.members()))
    out("status_version", c.status()["version"])


if __name__ == "__main__":
    main()
