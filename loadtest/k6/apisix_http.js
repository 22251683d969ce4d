// k6: the HTTP/JSON (grpc-gateway) flow of APISIX 3.x workers against etcd or etcd-fanout.
//
//   k6 run -e TARGET=http://127.0.0.1:23790 -e PREFIX=/apisix/ -e WORKERS=200 loadtest/k6/apisix_http.js
//
// setup(): GET /version (etcdcluster must be >= 3.4, as APISIX checks). Each worker VU then
// does what an APISIX worker does: POST /v3/kv/range of the whole prefix, then
// POST /v3/watch from header.revision + 1, and closes and reopens the watch every
// RECONNECT_SECONDS from the last seen revision + 1. A writer scenario puts RATE values/s under
// PREFIX + 'k6/<run>/' through POST /v3/kv/put (one new key per put).
//
// k6's HTTP client hands over a response body only when the request ends, so each watch
// request ends by its own timeout (RECONNECT_SECONDS; k6 keeps the body received so far) and
// the chunked lines are checked then: the first is `created`, every other one has events,
// keys are inside the prefix, mod_revision strictly increases across reconnects, and
// header.revision never goes down. After each watch the run's keys are counted at the last
// revision seen: any not received is missing. Fan-out latency cannot be measured this way
// (use loadgen's --http-watchers for that).
//
// Environment: TARGET (http://host:port), WRITE_TARGET (default TARGET), PREFIX, WORKERS,
// DURATION_SECONDS, RECONNECT_SECONDS (APISIX: 50), RATE (puts/s).
// Thresholds fail the run on any error or missing event.
import http from 'k6/http';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const TARGET = (__ENV.TARGET || 'http://127.0.0.1:23790').replace(/\/$/, '');
const WRITE_TARGET = (__ENV.WRITE_TARGET || TARGET).replace(/\/$/, '');
const PREFIX = __ENV.PREFIX || '/apisix/';
const WORKERS = parseInt(__ENV.WORKERS || '100', 10);
const DURATION = parseInt(__ENV.DURATION_SECONDS || '60', 10);
const RECONNECT = parseInt(__ENV.RECONNECT_SECONDS || '10', 10);
const RATE = parseInt(__ENV.RATE || '10', 10);

const watchErrors = new Counter('watch_errors');
const watchCreated = new Counter('watch_created');
const watchEvents = new Counter('watch_events');
const watchMissing = new Counter('watch_missing');
const putErrors = new Counter('put_errors');

export const options = {
  scenarios: {
    workers: {
      executor: 'constant-vus',
      vus: WORKERS,
      duration: `${DURATION}s`,
      gracefulStop: `${RECONNECT + 30}s`,
      exec: 'worker',
    },
    writer: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      startTime: '3s',
      duration: `${Math.max(DURATION - 6, 1)}s`,
      preAllocatedVUs: 4,
      maxVUs: 32,
      exec: 'writer',
    },
  },
  thresholds: {
    watch_errors: ['count==0'],
    watch_missing: ['count==0'],
    put_errors: ['count==0'],
    watch_created: [`count>=${WORKERS}`],
    watch_events: ['count>0'],
    'http_req_failed{name:range}': ['rate==0'],
    'http_req_failed{name:version}': ['rate==0'],
    checks: ['rate==1'],
  },
};

function prefixEnd(p) {
  const last = p.charCodeAt(p.length - 1);
  return p.slice(0, -1) + String.fromCharCode(last + 1);
}
const b64 = (s) => encoding.b64encode(s, 'std');
const unb64 = (s) => encoding.b64decode(s || '', 'std', 's');
const int = (v) => parseInt(v || '0', 10);

function post(base, path, body, name, timeout) {
  return http.post(`${base}${path}`, JSON.stringify(body), { tags: { name }, timeout: timeout || '30s' });
}

// Number of keys under `prefix` at revision `rev` (0: now), and the header revision.
function countAt(prefix, rev) {
  const body = { key: b64(prefix), range_end: b64(prefixEnd(prefix)), count_only: true };
  if (rev > 0) body.revision = `${rev}`;
  const r = post(TARGET, '/v3/kv/range', body, 'range');
  if (!check(r, { 'count range 200': (x) => x.status === 200 })) {
    watchErrors.add(1);
    return null;
  }
  const j = r.json();
  return { count: int(j.count), rev: int(j.header.revision) };
}

export function setup() {
  const v = http.get(`${TARGET}/version`, { tags: { name: 'version' } });
  check(v, {
    'version 200': (x) => x.status === 200,
    'etcdcluster >= 3.4': (x) => {
      const [maj, min] = ((x.json() || {}).etcdcluster || '0.0').split('.').map((n) => int(n));
      return maj > 3 || (maj === 3 && min >= 4);
    },
  });
  return { run: `${Date.now()}` };
}

export function writer(data) {
  const key = `${PREFIX}k6/${data.run}/${__VU}-${__ITER}`;
  const r = post(WRITE_TARGET, '/v3/kv/put', { key: b64(key), value: b64(JSON.stringify({ t: Date.now() })) }, 'put');
  if (!check(r, { 'put 200': (x) => x.status === 200 })) putErrors.add(1);
}

// Per worker VU.
let start = 0;
let lastRev = 0;
let lastHeader = 0;
let baseline = 0;
const seen = new Set();

export function worker(data) {
  const runPrefix = `${PREFIX}k6/${data.run}/`;
  if (start === 0) {
    // APISIX: one full range of the prefix, then watch from header.revision + 1.
    const r = post(TARGET, '/v3/kv/range', { key: b64(PREFIX), range_end: b64(prefixEnd(PREFIX)) }, 'range');
    if (!check(r, { 'range 200': (x) => x.status === 200 })) {
      watchErrors.add(1);
      return;
    }
    const rev = int(r.json().header.revision);
    const base = countAt(runPrefix, rev);
    if (base === null) return;
    baseline = base.count;
    start = rev + 1;
    lastHeader = rev;
  }
  const res = post(TARGET, '/v3/watch', {
    create_request: { key: b64(PREFIX), range_end: b64(prefixEnd(PREFIX)), start_revision: `${start}` },
  }, 'watch', `${RECONNECT}s`);
  // The request ends by its timeout (error code 1050) with the body received so far.
  if (res.status !== 200 && res.error_code !== 1050) {
    watchErrors.add(1);
    console.error(`watch: status ${res.status} error ${res.error}`);
    return;
  }
  const lines = (res.body || '').split('\n').filter((l) => l.trim() !== '');
  lines.forEach((line, i) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch (e) {
      watchErrors.add(1);
      return;
    }
    if (msg.error || !msg.result) {
      watchErrors.add(1);
      console.error(`watch error line: ${line}`);
      return;
    }
    const w = msg.result;
    const hdr = int((w.header || {}).revision);
    if (hdr < lastHeader) {
      // APISIX reads a lower revision as an etcd restart and reloads everything.
      watchErrors.add(1);
      console.error(`header.revision went down: ${hdr} < ${lastHeader}`);
    }
    lastHeader = Math.max(lastHeader, hdr);
    if (i === 0) {
      if (!w.created) watchErrors.add(1);
      watchCreated.add(1);
      return;
    }
    if (w.canceled || !w.events || w.events.length === 0) {
      watchErrors.add(1);
      console.error(`unexpected watch response: ${line}`);
      return;
    }
    for (const ev of w.events) {
      const kv = ev.kv || {};
      const key = unb64(kv.key);
      const rev = int(kv.mod_revision);
      if (!key.startsWith(PREFIX) || (ev.type && ev.type !== 'PUT') || rev <= lastRev) {
        watchErrors.add(1);
        console.error(`bad event ${key} rev ${rev} after ${lastRev}`);
      }
      lastRev = Math.max(lastRev, rev);
      if (key.startsWith(runPrefix)) {
        if (seen.has(key)) watchErrors.add(1);
        seen.add(key);
        watchEvents.add(1);
      }
    }
  });
  if (lastRev > 0) {
    start = lastRev + 1;
    const c = countAt(runPrefix, lastRev);
    if (c !== null) {
      const missing = c.count - baseline - seen.size;
      if (missing !== 0) console.error(`${missing} missing events at revision ${lastRev}`);
      watchMissing.add(Math.abs(missing));
    }
  }
}

export function teardown(data) {
  const runPrefix = `${PREFIX}k6/${data.run}/`;
  post(WRITE_TARGET, '/v3/kv/deleterange', { key: b64(runPrefix), range_end: b64(prefixEnd(runPrefix)) }, 'cleanup');
}
