// k6: gRPC watch streams against etcd, etcd grpc-proxy or etcd-fanout.
//
//   k6 run -e TARGET=127.0.0.1:23790 -e PREFIX=/apisix/ -e WATCHERS=200 loadtest/k6/grpc_watch.js
//
// Each watcher VU opens one connection and one Watch stream carrying WATCHES_PER_STREAM
// watches on PREFIX (created one after another, like etcd's Go client), all starting at the
// revision read in setup() + 1. A writer scenario puts RATE values/s under
// PREFIX + 'k6/<run>/' (one new key per put, value {"t": send time ms}). Every watcher checks
// each event (key inside the prefix, PUT, mod_revision strictly increasing per watch) and, at
// the end (the writer stops 7 s before), counts the run's keys: any key it did not receive is
// missing, so a watcher that fell behind fails the run. teardown() deletes the run's keys.
//
// Environment: TARGET (host:port, watchers), WRITE_TARGET (host:port, writer; default TARGET),
// PREFIX, WATCHERS, WATCHES_PER_STREAM, HOLD_SECONDS (how long each stream stays open),
// RATE (puts/s), P99_MS (latency threshold), PROTO_DIR (default ../../proto).
// Thresholds fail the run on any error, missing event, or p99 above P99_MS.
import grpc from 'k6/net/grpc';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { setTimeout } from 'k6/timers';

const TARGET = __ENV.TARGET || '127.0.0.1:23790';
const WRITE_TARGET = __ENV.WRITE_TARGET || TARGET;
const PREFIX = __ENV.PREFIX || '/apisix/';
const WATCHERS = parseInt(__ENV.WATCHERS || '100', 10);
const PER_STREAM = parseInt(__ENV.WATCHES_PER_STREAM || '1', 10);
const HOLD = parseInt(__ENV.HOLD_SECONDS || '30', 10);
const RATE = parseInt(__ENV.RATE || '10', 10);
const P99_MS = __ENV.P99_MS || '500';
const PROTO_DIR = __ENV.PROTO_DIR || '../../proto';

const watchErrors = new Counter('watch_errors');
const watchCreated = new Counter('watch_created');
const watchEvents = new Counter('watch_events');
const watchMissing = new Counter('watch_missing');
const putErrors = new Counter('put_errors');
const latency = new Trend('fanout_latency_ms', true);

export const options = {
  scenarios: {
    watchers: {
      executor: 'per-vu-iterations',
      vus: WATCHERS,
      iterations: 1,
      maxDuration: `${HOLD + 60}s`,
      exec: 'watcher',
    },
    writer: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      startTime: '5s',
      duration: `${Math.max(HOLD - 12, 1)}s`,
      preAllocatedVUs: 4,
      maxVUs: 32,
      exec: 'writer',
    },
  },
  thresholds: {
    watch_errors: ['count==0'],
    watch_missing: ['count==0'],
    put_errors: ['count==0'],
    watch_created: [`count==${WATCHERS * PER_STREAM}`],
    watch_events: ['count>0'],
    checks: ['rate==1'],
    fanout_latency_ms: [`p(99)<${P99_MS}`],
  },
};

const client = new grpc.Client();
client.load([PROTO_DIR], 'etcdserverpb/rpc.proto');

function prefixEnd(p) {
  const last = p.charCodeAt(p.length - 1);
  return p.slice(0, -1) + String.fromCharCode(last + 1);
}

const b64 = (s) => encoding.b64encode(s, 'std');
const unb64 = (s) => encoding.b64decode(s || '', 'std', 's');
// k6 renders responses with protojson: camelCase names, int64 as strings.
const field = (o, snake, camel) => (o[snake] !== undefined ? o[snake] : o[camel]);
const int = (v) => parseInt(v || '0', 10);

export function setup() {
  client.connect(WRITE_TARGET, { plaintext: true, timeout: '10s' });
  const r = client.invoke('etcdserverpb.KV/Range', { key: b64(PREFIX), range_end: b64(prefixEnd(PREFIX)), count_only: true });
  client.close();
  if (r.status !== grpc.StatusOK) {
    throw new Error(`setup range failed: ${JSON.stringify(r.error)}`);
  }
  return { run: `${Date.now()}`, rev: int(r.message.header.revision) };
}

let writerConnected = false;
export function writer(data) {
  if (!writerConnected) {
    client.connect(WRITE_TARGET, { plaintext: true, timeout: '10s' });
    writerConnected = true;
  }
  const key = `${PREFIX}k6/${data.run}/${__VU}-${__ITER}`;
  const value = JSON.stringify({ t: Date.now() });
  const r = client.invoke('etcdserverpb.KV/Put', { key: b64(key), value: b64(value) }, { timeout: '10s' });
  if (!check(r, { 'put ok': (x) => x && x.status === grpc.StatusOK })) {
    putErrors.add(1);
  }
}

export function watcher(data) {
  client.connect(TARGET, { plaintext: true, timeout: '10s' });
  const runPrefix = `${PREFIX}k6/${data.run}/`;
  const watches = new Map(); // watch id -> {lastRev, keys}
  let next = 0;
  const stream = new grpc.Stream(client, 'etcdserverpb.Watch/Watch');
  const create = () => stream.write({
    create_request: { key: b64(PREFIX), range_end: b64(prefixEnd(PREFIX)), start_revision: `${data.rev + 1}` },
  });
  stream.on('data', (resp) => {
    const id = int(field(resp, 'watch_id', 'watchId'));
    if (resp.created) {
      watches.set(id, { lastRev: 0, keys: new Set() });
      watchCreated.add(1);
      next += 1;
      if (next < PER_STREAM) create();
    }
    if (resp.canceled) {
      watchErrors.add(1);
      console.error(`watch ${id} canceled: ${JSON.stringify(resp)}`);
    }
    const events = resp.events || [];
    if (events.length === 0) return;
    const w = watches.get(id);
    if (!w) {
      watchErrors.add(1);
      return;
    }
    const now = Date.now();
    for (const ev of events) {
      const kv = ev.kv || {};
      const key = unb64(kv.key);
      const rev = int(field(kv, 'mod_revision', 'modRevision'));
      const ok = key.startsWith(PREFIX) && (!ev.type || ev.type === 'PUT') && rev > w.lastRev;
      if (!ok) {
        watchErrors.add(1);
        console.error(`bad event on watch ${id}: ${key} rev ${rev} after ${w.lastRev}`);
      }
      w.lastRev = Math.max(w.lastRev, rev);
      if (key.startsWith(runPrefix)) {
        if (w.keys.has(key)) watchErrors.add(1);
        w.keys.add(key);
        watchEvents.add(1);
        try {
          latency.add(now - JSON.parse(unb64(kv.value)).t);
        } catch (e) {
          watchErrors.add(1);
        }
      }
    }
  });
  let closing = false;
  stream.on('error', (e) => {
    if (closing) return;
    watchErrors.add(1);
    console.error(`watch stream error: ${e.message}`);
  });
  create();
  setTimeout(() => {
    closing = true;
    // The writer stopped at least 7 s ago: every key of the run must have arrived by now (a
    // watcher that fell behind counts its undelivered events as missing).
    const r = client.invoke('etcdserverpb.KV/Range', {
      key: b64(runPrefix), range_end: b64(prefixEnd(runPrefix)), count_only: true,
    });
    if (r.status !== grpc.StatusOK) {
      watchErrors.add(1);
      console.error(`count range failed: ${JSON.stringify(r.error)}`);
    } else {
      for (const [id, w] of watches) {
        const missing = int(r.message.count) - w.keys.size;
        if (missing !== 0) console.error(`watch ${id}: ${missing} missing events`);
        watchMissing.add(Math.abs(missing));
      }
    }
    stream.end();
    client.close();
  }, HOLD * 1000);
}

export function teardown(data) {
  client.connect(WRITE_TARGET, { plaintext: true, timeout: '10s' });
  const runPrefix = `${PREFIX}k6/${data.run}/`;
  client.invoke('etcdserverpb.KV/DeleteRange', { key: b64(runPrefix), range_end: b64(prefixEnd(runPrefix)) });
  client.close();
}
