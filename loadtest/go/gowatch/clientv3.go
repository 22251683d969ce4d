package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
	"google.golang.org/grpc"
)

// runClientv3 connects conns clientv3 clients and creates the watchers with
// clientv3.Watch: each client's watchers in order from one goroutine per client (an
// application's calls; clientv3's Watch returns once etcd answered the create, and its
// stream sends one create at a time), the clients side by side. Every watch has a goroutine
// reading its channel. The goroutines are counted in wg; the returned function closes the
// clients.
func runClientv3(ctx context.Context, wg *sync.WaitGroup, endpoint string, conns int, prefixes []string, t0 int64, watchers []*watcher, hists []hist, rec *receipt) func() {
	clients := make([]*clientv3.Client, conns)
	sideBySide(conns, func(c int) {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:   []string{endpoint},
			DialTimeout: 10 * time.Second,
			DialOptions: []grpc.DialOption{grpc.WithStatsHandler(rec)},
		})
		if err != nil {
			fail("connect: " + err.Error())
			return
		}
		clients[c] = cli
	})

	for c, cli := range clients {
		if cli == nil {
			continue
		}
		wg.Add(1)
		go func(c int, cli *clientv3.Client) {
			defer wg.Done()
			for i := c; i < len(watchers); i += conns {
				if ctx.Err() != nil {
					return
				}
				w := watchers[i]
				prefix := prefixes[w.prefix]
				ch := cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
				wg.Add(1)
				go func(w *watcher, h *hist) {
					defer wg.Done()
					consume(ctx, w, prefix, ch, t0, h)
				}(w, &hists[i%len(hists)])
			}
		}(c, cli)
	}
	return func() {
		for _, cli := range clients {
			if cli != nil {
				cli.Close()
			}
		}
	}
}

// consume reads one clientv3 watch channel until it closes (the context is cancelled).
func consume(ctx context.Context, w *watcher, prefix string, ch clientv3.WatchChan, t0 int64, h *hist) {
	lat := make([]uint64, 0, 16)
	for resp := range ch {
		if resp.Created {
			w.markCreated()
		}
		w.header(resp.Header.Revision)
		if err := resp.Err(); err != nil {
			if ctx.Err() == nil {
				fail(fmt.Sprintf("watch on %s: %v", prefix, err))
				w.canceled = true
			}
			continue
		}
		now := uint64(time.Now().UnixNano() - t0)
		lat = lat[:0]
		for _, ev := range resp.Events {
			lat, _ = w.check(prefix, ev.Type == clientv3.EventTypePut, ev.Kv.Key, ev.Kv.Value, ev.Kv.ModRevision, now, lat)
		}
		if len(lat) > 0 {
			h.record(lat)
			atomic.AddInt64(&fresh, int64(len(lat)))
		}
	}
}
