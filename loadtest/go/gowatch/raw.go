package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/etcdserver/etcdserverpb"
	"go.etcd.io/etcd/mvcc/mvccpb"
	"google.golang.org/grpc"
)

// rawConfig is what the raw mode needs.
type rawConfig struct {
	endpoint string
	conns    int
	prefixes []string
	t0       int64
	watchers []*watcher
	hists    []hist
}

// runRaw is the -raw mode: etcd's generated gRPC stubs without clientv3, as a program
// using etcdserverpb directly does. Per connection one grpc.ClientConn (grpc-go's defaults,
// no TLS) and one Watch stream; the stream's watchers (i ≡ c mod conns) are created by
// sending their create requests one after the other without waiting for the answers, and one
// goroutine per stream receives, checks every event and takes its latency at receipt. The
// goroutines are counted in wg; the returned function closes the connections.
func runRaw(ctx context.Context, wg *sync.WaitGroup, cfg rawConfig) func() {
	addr := cfg.endpoint
	for _, scheme := range []string{"http://", "https://"} {
		addr = strings.TrimPrefix(addr, scheme)
	}
	conns := make([]*grpc.ClientConn, cfg.conns)
	sideBySide(cfg.conns, func(c int) {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		conn, err := grpc.DialContext(dctx, addr, grpc.WithInsecure(), grpc.WithBlock())
		if err != nil {
			fail("connect: " + err.Error())
			return
		}
		conns[c] = conn
	})
	for c, conn := range conns {
		if conn == nil {
			continue
		}
		wg.Add(1)
		go func(c int, conn *grpc.ClientConn) {
			defer wg.Done()
			rawStream(ctx, conn, c, cfg)
		}(c, conn)
	}
	return func() {
		for _, conn := range conns {
			if conn != nil {
				conn.Close()
			}
		}
	}
}

// prefixEnd is the range end of a prefix watch (clientv3.GetPrefixRangeEnd).
func prefixEnd(p string) []byte {
	end := []byte(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0}
}

// rawStream runs connection c's Watch stream until the context is cancelled.
//
// Its watchers are told apart by watch id: etcd 3.4 (and its grpc-proxy) numbers a stream's
// watches 0, 1, 2, ... in the order of their create requests when the client asks for no id,
// so the k-th create is watcher k of this stream. A response for an id that is not one of
// them, a second created for a watch, or a cancel is counted as an error.
func rawStream(ctx context.Context, conn *grpc.ClientConn, c int, cfg rawConfig) {
	stream, err := pb.NewWatchClient(conn).Watch(ctx)
	if err != nil {
		if ctx.Err() == nil {
			fail(fmt.Sprintf("stream %d: %v", c, err))
		}
		return
	}
	var mine []*watcher
	for i := c; i < len(cfg.watchers); i += cfg.conns {
		mine = append(mine, cfg.watchers[i])
	}
	for _, w := range mine {
		p := cfg.prefixes[w.prefix]
		req := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
			CreateRequest: &pb.WatchCreateRequest{Key: []byte(p), RangeEnd: prefixEnd(p)},
		}}
		if err := stream.Send(req); err != nil {
			if ctx.Err() == nil {
				fail(fmt.Sprintf("stream %d: create: %v", c, err))
			}
			return
		}
	}
	h := &cfg.hists[c%len(cfg.hists)]
	lat := make([]uint64, 0, 16)
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil {
				fail(fmt.Sprintf("stream %d: %v", c, err))
				for _, w := range mine {
					w.canceled = true
				}
			}
			return
		}
		now := uint64(time.Now().UnixNano() - cfg.t0)
		id := resp.WatchId
		if id < 0 || id >= int64(len(mine)) {
			fail(fmt.Sprintf("stream %d: response for watch id %d (created %v, canceled %v, %q)",
				c, id, resp.Created, resp.Canceled, resp.CancelReason))
			continue
		}
		w := mine[id]
		prefix := cfg.prefixes[w.prefix]
		if resp.Header != nil {
			w.header(resp.Header.Revision)
		}
		if resp.Created {
			if w.created {
				fail(fmt.Sprintf("stream %d: watch %d created twice", c, id))
			}
			w.markCreated()
		}
		if resp.Canceled || resp.CompactRevision != 0 {
			fail(fmt.Sprintf("watch on %s: canceled %v, compact revision %d, %q",
				prefix, resp.Canceled, resp.CompactRevision, resp.CancelReason))
			w.canceled = true
			continue
		}
		lat = lat[:0]
		for _, ev := range resp.Events {
			if ev.Kv == nil {
				w.bad++
				continue
			}
			lat, _ = w.check(prefix, ev.Type == mvccpb.PUT, ev.Kv.Key, ev.Kv.Value, ev.Kv.ModRevision, now, lat)
		}
		if len(lat) > 0 {
			h.record(lat)
			atomic.AddInt64(&fresh, int64(len(lat)))
		}
	}
}
