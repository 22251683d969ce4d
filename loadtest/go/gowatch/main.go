// gowatch: etcd watchers made with etcd's own Go packages, driven by loadgen.
//
// Two modes. By default the watchers use etcd's Go client (clientv3.go): it behaves as
// etcd's Go clients do on the wire (grpc-go's HTTP/2 flow control, pings, read sizes;
// clientv3's one stream per client and one create at a time) and in its own pipeline (per
// stream a receiving goroutine, a dispatch goroutine and a goroutine per watcher, linked by
// unbuffered channels). With -raw (raw.go) they use the generated etcdserverpb Watch stubs
// directly: the same grpc-go transport, one goroutine per stream, no clientv3.
//
// loadgen builds it (GOPATH mode, Debian's golang-etcd-server-dev) into a temporary
// directory and talks to it over stdin/stdout:
//
//	stdin  "start"               connect -conns connections, create -watchers watches
//	stdout {"created":C,"fresh":F,"errors":E}   every 100 ms from "start" (F: first deliveries so far)
//	stdin  "stop W0 W1 ..."      writes made per prefix; the watchers stop
//	stdout {"final":true,...}    per-watcher results and the latency histogram (lists are
//	                             never null)
//
// Watcher i is on connection i % conns and watches prefix i % len(prefixes) with a prefix
// range. The connections' watchers are created side by side, each connection's in order.
// Every value starts with <seq:016x><send ns:016x> (loadgen's writer): each watcher checks
// that it receives every write of its prefix exactly once and in order (seq and revision
// strictly increasing), and records the fan-out latency against loadgen's clock (-t0: the
// Unix time in ns of loadgen's time origin).
//
// With clientv3 the latency is taken twice: where the watcher's goroutine gets the event from
// clientv3's watch channel (after clientv3's per-stream receive, dispatch and per-watcher
// goroutines: what an application sees), and where grpc-go hands the decoded WatchResponse
// to clientv3 (a stats.Handler's InPayload, in the stream's receiving goroutine: what the
// server's delivery plus the client's HTTP/2 reading costs, without clientv3's fan-out to 100
// watchers per stream). Both are reported; the first is the one loadgen's tables use. With
// -raw it is taken once, where the stream's goroutine gets the response from grpc-go.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/etcdserver/etcdserverpb"
	"google.golang.org/grpc/stats"
)

// Buckets of the latency histogram: the same as loadgen's stats::Hist (exact below 128 µs,
// then 64 sub-buckets per power of two), so loadgen merges the counts.
const buckets = 128 + 57*64

func bucket(v uint64) int {
	if v < 128 {
		return int(v)
	}
	e := 63 - bits.LeadingZeros64(v)
	sub := int((v >> uint(e-6)) & 63)
	i := 128 + (e-7)*64 + sub
	if i > buckets-1 {
		i = buckets - 1
	}
	return i
}

// hist is one shard of the latency histogram.
type hist struct {
	mu     sync.Mutex
	counts [buckets]uint64
	max    uint64
	sum    uint64
	total  uint64
}

const shards = 64

// watcher is what one watch saw, checked as it arrives.
type watcher struct {
	prefix    int
	created   bool
	seen      []uint64
	next      uint64
	lastRev   int64
	lastHead  int64
	dup       uint64
	ooo       uint64
	bad       uint64
	headDown  uint64
	canceled  bool
	lastError string
	// With GOWATCH_TRACE set: every first delivery (see writeTrace).
	trace []delivery
}

// delivery is one first delivery of a write to a watcher, for the trace.
type delivery struct {
	seq, sent, us uint64
}

// tracing is true when GOWATCH_TRACE names a file for the per-write latency trace.
var tracing = os.Getenv("GOWATCH_TRACE") != ""

func (w *watcher) isSeen(seq uint64) bool {
	i := int(seq / 64)
	return i < len(w.seen) && w.seen[i]&(1<<(seq%64)) != 0
}

// event records one event; true when the watcher sees seq for the first time.
func (w *watcher) event(seq uint64, rev int64) bool {
	if rev <= w.lastRev {
		w.ooo++
	}
	if rev > w.lastRev {
		w.lastRev = rev
	}
	if seq > w.next {
		w.ooo++
	} else if seq < w.next {
		w.dup++
	}
	if seq+1 > w.next {
		w.next = seq + 1
	}
	if w.isSeen(seq) {
		return false
	}
	i := int(seq / 64)
	for len(w.seen) <= i {
		w.seen = append(w.seen, 0)
	}
	w.seen[i] |= 1 << (seq % 64)
	return true
}

// check records one event of the watch on prefix, received at now (µs since loadgen's
// origin), appending its latency to lat when it is the first delivery of its write. The same
// check for both modes: a put under the prefix whose value loadgen wrote, every write once,
// seq and revision strictly increasing.
func (w *watcher) check(prefix string, put bool, key, value []byte, rev int64, now uint64, lat []uint64) ([]uint64, bool) {
	if !put || !strings.HasPrefix(string(key), prefix) {
		w.bad++
		return lat, false
	}
	seq, sent, ok := decode(value)
	if !ok {
		w.bad++
		return lat, false
	}
	if !w.event(seq, rev) {
		return lat, false
	}
	us := uint64(0)
	if now > sent {
		us = (now - sent) / 1000
	}
	if tracing {
		w.trace = append(w.trace, delivery{seq, sent, us})
	}
	return append(lat, us), true
}

// writeTrace writes, per write (prefix, seq), when it was sent (ms since loadgen's origin),
// to how many watchers it was delivered, and the lowest, median and highest latency (µs)
// among them, to the file GOWATCH_TRACE names: a diagnostic of where a tail comes from (a
// few slow writes for every watcher, or some watchers for every write).
func writeTrace(path string, watchers []*watcher) error {
	type key struct {
		p   int
		seq uint64
	}
	sent := map[key]uint64{}
	lats := map[key][]uint64{}
	for _, w := range watchers {
		for _, d := range w.trace {
			k := key{w.prefix, d.seq}
			sent[k] = d.sent
			lats[k] = append(lats[k], d.us)
		}
	}
	keys := make([]key, 0, len(sent))
	for k := range sent {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return sent[keys[i]] < sent[keys[j]] })
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	b := bufio.NewWriter(f)
	fmt.Fprintln(b, "# prefix seq sent_ms deliveries min_us p50_us max_us")
	for _, k := range keys {
		l := lats[k]
		sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
		fmt.Fprintf(b, "%d %d %d %d %d %d %d\n", k.p, k.seq, sent[k]/1000000, len(l), l[0], l[len(l)/2], l[len(l)-1])
	}
	if err := b.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// header records a response's header revision (it must not go down).
func (w *watcher) header(rev int64) {
	if rev < w.lastHead {
		w.headDown++
	}
	if rev > w.lastHead {
		w.lastHead = rev
	}
}

// markCreated counts the watch as created once.
func (w *watcher) markCreated() {
	if !w.created {
		w.created = true
		atomic.AddInt64(&created, 1)
	}
}

func (h *hist) record(lat []uint64) {
	h.mu.Lock()
	for _, us := range lat {
		h.counts[bucket(us)]++
		h.total++
		h.sum += us
		if us > h.max {
			h.max = us
		}
	}
	h.mu.Unlock()
}

// merged is the histogram of all shards as loadgen reads it.
func merged(hs []hist) (counts [][2]uint64, max, sum uint64) {
	counts = [][2]uint64{}
	var all [buckets]uint64
	for i := range hs {
		h := &hs[i]
		h.mu.Lock()
		for b, c := range h.counts {
			all[b] += c
		}
		sum += h.sum
		if h.max > max {
			max = h.max
		}
		h.mu.Unlock()
	}
	for b, c := range all {
		if c > 0 {
			counts = append(counts, [2]uint64{uint64(b), c})
		}
	}
	return counts, max, sum
}

// receipt is a grpc-go stats handler recording, for every event of every WatchResponse, the
// latency at the moment grpc-go decoded the message for clientv3 (InPayload.RecvTime).
type receipt struct {
	t0    int64
	next  uint64
	hists [shards]hist
}

func (r *receipt) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (r *receipt) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (r *receipt) HandleConn(context.Context, stats.ConnStats) {}

func (r *receipt) HandleRPC(_ context.Context, s stats.RPCStats) {
	in, ok := s.(*stats.InPayload)
	if !ok || !in.Client {
		return
	}
	resp, ok := in.Payload.(*pb.WatchResponse)
	if !ok || len(resp.Events) == 0 {
		return
	}
	now := uint64(in.RecvTime.UnixNano() - r.t0)
	lat := make([]uint64, 0, len(resp.Events))
	for _, ev := range resp.Events {
		if ev.Kv == nil {
			continue
		}
		if _, sent, ok := decode(ev.Kv.Value); ok {
			us := uint64(0)
			if now > sent {
				us = (now - sent) / 1000
			}
			lat = append(lat, us)
		}
	}
	r.hists[atomic.AddUint64(&r.next, 1)%shards].record(lat)
}

type result struct {
	Prefix   int    `json:"p"`
	Created  bool   `json:"created"`
	Expected uint64 `json:"expected"`
	Missing  uint64 `json:"missing"`
	Dup      uint64 `json:"dup"`
	Ooo      uint64 `json:"ooo"`
	Bad      uint64 `json:"bad"`
	HeadDown uint64 `json:"head_down"`
}

type final struct {
	Final    bool        `json:"final"`
	Watchers []result    `json:"watchers"`
	Hist     [][2]uint64 `json:"hist"`
	Max      uint64      `json:"max"`
	Sum      uint64      `json:"sum"`
	Errors   uint64      `json:"errors"`
	Samples  []string    `json:"samples"`
	// The latency at grpc-go's receipt (see receipt).
	RecvHist [][2]uint64 `json:"recv_hist"`
	RecvMax  uint64      `json:"recv_max"`
	RecvSum  uint64      `json:"recv_sum"`
	// The Go runtime's GOMAXPROCS.
	Procs int `json:"gomaxprocs"`
}

var (
	out       = bufio.NewWriter(os.Stdout)
	outMu     sync.Mutex
	created   int64
	fresh     int64
	errorsN   int64
	samplesMu sync.Mutex
	samples   []string
)

// sideBySide runs f(0) ... f(n-1) concurrently and returns once all have returned: the
// clients connect side by side, as n applications would.
func sideBySide(n int, f func(c int)) {
	var wg sync.WaitGroup
	for c := 0; c < n; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			f(c)
		}(c)
	}
	wg.Wait()
}

func emit(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gowatch: json:", err)
		return
	}
	outMu.Lock()
	out.Write(b)
	out.WriteByte('\n')
	out.Flush()
	outMu.Unlock()
}

func fail(msg string) {
	atomic.AddInt64(&errorsN, 1)
	samplesMu.Lock()
	if len(samples) < 20 {
		samples = append(samples, msg)
	}
	samplesMu.Unlock()
}

func decode(v []byte) (uint64, uint64, bool) {
	if len(v) < 32 {
		return 0, 0, false
	}
	seq, err1 := strconv.ParseUint(string(v[:16]), 16, 64)
	sent, err2 := strconv.ParseUint(string(v[16:32]), 16, 64)
	return seq, sent, err1 == nil && err2 == nil
}

func main() {
	endpoint := flag.String("endpoint", "", "etcd (or proxy) client URL")
	conns := flag.Int("conns", 10, "clients (one gRPC connection each)")
	nwatchers := flag.Int("watchers", 100, "watchers in total")
	prefixList := flag.String("prefixes", "", "comma-separated prefixes")
	t0 := flag.Int64("t0", 0, "Unix time (ns) of loadgen's time origin")
	raw := flag.Bool("raw", false, "raw etcdserverpb Watch stubs instead of clientv3 (see raw.go)")
	flag.Parse()
	prefixes := strings.Split(*prefixList, ",")
	if *endpoint == "" || *prefixList == "" || *conns < 1 || *nwatchers < 1 {
		fmt.Fprintln(os.Stderr, "gowatch: -endpoint, -prefixes, -conns and -watchers are required")
		os.Exit(2)
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	if !in.Scan() || in.Text() != "start" {
		fmt.Fprintln(os.Stderr, "gowatch: expected \"start\" on stdin")
		os.Exit(2)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var hists [shards]hist
	watchers := make([]*watcher, *nwatchers)
	for i := range watchers {
		watchers[i] = &watcher{prefix: i % len(prefixes)}
	}

	// Progress every 100 ms from the start, so that loadgen sees the creation advance (and
	// its timeouts measure the creation, not this program's silence) until "stop".
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				emit(map[string]int64{
					"created": atomic.LoadInt64(&created),
					"fresh":   atomic.LoadInt64(&fresh),
					"errors":  atomic.LoadInt64(&errorsN),
				})
			}
		}
	}()

	var rec *receipt
	var stopClients func()
	var wg sync.WaitGroup
	if *raw {
		stopClients = runRaw(ctx, &wg, rawConfig{
			endpoint: *endpoint,
			conns:    *conns,
			prefixes: prefixes,
			t0:       *t0,
			watchers: watchers,
			hists:    hists[:],
		})
	} else {
		rec = &receipt{t0: *t0}
		stopClients = runClientv3(ctx, &wg, *endpoint, *conns, prefixes, *t0, watchers, hists[:], rec)
	}

	var written []uint64
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) > 0 && f[0] == "stop" {
			for _, s := range f[1:] {
				n, err := strconv.ParseUint(s, 10, 64)
				if err != nil {
					fmt.Fprintln(os.Stderr, "gowatch: bad stop line:", in.Text())
					os.Exit(2)
				}
				written = append(written, n)
			}
			break
		}
	}
	close(done)
	cancel()
	// Bounded: the watch channels close once the context is cancelled.
	stopped := make(chan struct{})
	go func() { wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(20 * time.Second):
		fail("watchers did not stop within 20 s")
	}
	stopClients()

	// Empty lists, never null: loadgen reads every list field as a list.
	res := final{Final: true, Watchers: []result{}, Hist: [][2]uint64{}, RecvHist: [][2]uint64{}, Samples: []string{}}
	for _, w := range watchers {
		r := result{Prefix: w.prefix, Created: w.created, Dup: w.dup, Ooo: w.ooo, Bad: w.bad, HeadDown: w.headDown}
		if w.prefix < len(written) {
			r.Expected = written[w.prefix]
			for s := uint64(0); s < written[w.prefix]; s++ {
				if !w.isSeen(s) {
					r.Missing++
				}
			}
		}
		res.Watchers = append(res.Watchers, r)
	}
	if tracing {
		if err := writeTrace(os.Getenv("GOWATCH_TRACE"), watchers); err != nil {
			fmt.Fprintln(os.Stderr, "gowatch: trace:", err)
		}
	}
	res.Hist, res.Max, res.Sum = merged(hists[:])
	if rec != nil {
		res.RecvHist, res.RecvMax, res.RecvSum = merged(rec.hists[:])
	}
	res.Procs = runtime.GOMAXPROCS(0)
	res.Errors = uint64(atomic.LoadInt64(&errorsN))
	samplesMu.Lock()
	res.Samples = append(res.Samples, samples...)
	samplesMu.Unlock()
	emit(res)
}
