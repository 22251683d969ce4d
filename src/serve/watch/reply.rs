//! What a watch session sends.
//!
//! A [`Reply`] is either a plain [`WatchResponse`] (created, canceled, progress, relayed
//! responses) or an events response whose event bytes are shared: [`EventsReply`] points at the
//! revision batches and the watch's [`Shape`], whose per-batch encodings were made once for all
//! watchers of that shape. The wire encoders (`wire::grpc::watch`, the gateway's streams) write
//! the header and watch id, then copy the shared bytes. The live replies of several watches of
//! one shape to one revision travel as one [`LiveReplies`]: one value, one queue entry and one
//! encoder pass for all of them.

use std::sync::Arc;

use tonic::Status;

use super::shape::Shape;
use crate::proto::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::source::cache::RevBatch;

/// One response of a watch session.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A response built as a message (boxed: replies wait in channels, keep them small).
    Msg(Box<WatchResponse>),
    /// An events response with shared, pre-encoded events.
    Events(EventsReply),
    /// The live events responses of several watches of one shape to one revision.
    Live(LiveReplies),
    /// The stream ends with this error.
    Error(Box<Status>),
}

/// The batches of an events reply: a live reply has one, held inline (no allocation per
/// reply); a backlog spills to the heap.
pub type Batches = smallvec::SmallVec<[Arc<RevBatch>; 1]>;

/// An events response: header, watch id, and the batches whose shared encodings for `shape`
/// make up its events.
#[derive(Debug, Clone)]
pub struct EventsReply {
    /// Response header.
    pub header: ResponseHeader,
    /// Watch id.
    pub watch_id: i64,
    /// Batches (in revision order) with at least one event for `shape`.
    pub batches: Batches,
    /// The watch's shape.
    pub shape: Arc<Shape>,
    /// Sent to a current (synced) watch as part of the live fan-out: the wire encoder
    /// observes its delivery latency (`etcd_fanout_delivery_latency_seconds`).
    pub live: bool,
}

impl EventsReply {
    /// When the oldest revision of a live reply was received from etcd.
    pub fn live_since(&self) -> Option<std::time::Instant> {
        if !self.live {
            return None;
        }
        self.batches.first().map(|b| b.received)
    }

    /// The same response as a message.
    pub fn to_response(&self) -> WatchResponse {
        WatchResponse {
            header: Some(self.header),
            watch_id: self.watch_id,
            events: self.shape.select(&self.batches),
            ..Default::default()
        }
    }
}

/// The live events responses of watches of one shape to one revision, with one header: one
/// response per watch id, in order, each as [`EventsReply`] with `live` set would be. A session
/// queues its replies to a revision so (see `Session::drain`), and the gRPC encoder writes
/// them into one buffer in one pass: per response only the framing and the watch id differ.
#[derive(Debug, Clone)]
pub struct LiveReplies {
    /// Response header of every response.
    pub header: ResponseHeader,
    /// The revision's batch.
    pub batch: Arc<RevBatch>,
    /// The watches' shape (its encoding of `batch` has at least one event).
    pub shape: Arc<Shape>,
    /// Watch ids, in the order their responses go out.
    pub ids: LiveIds,
}

/// The watch ids of a [`LiveReplies`]: a few inline (an HTTP watch session has one or two).
pub type LiveIds = smallvec::SmallVec<[i64; 2]>;

impl LiveReplies {
    /// The responses one by one.
    pub fn each(&self) -> impl Iterator<Item = EventsReply> + '_ {
        self.ids.iter().map(|&watch_id| EventsReply {
            header: self.header,
            watch_id,
            batches: smallvec::smallvec![self.batch.clone()],
            shape: self.shape.clone(),
            live: true,
        })
    }

    /// When the revision was received from etcd.
    pub fn live_since(&self) -> std::time::Instant {
        self.batch.received
    }
}

impl Reply {
    /// A reply built as a message.
    pub fn msg(resp: WatchResponse) -> Reply {
        Reply::Msg(Box::new(resp))
    }

    /// Bytes the reply stands for in its session's queue: the events' size in their batches
    /// (shared, but pinned while queued) or the message's encoded length.
    pub fn queued_bytes(&self) -> usize {
        match self {
            Reply::Msg(m) => prost::Message::encoded_len(m.as_ref()),
            Reply::Events(e) => 32 + e.batches.iter().map(|b| b.bytes).sum::<usize>(),
            Reply::Live(l) => l.ids.len() * (32 + l.batch.bytes),
            Reply::Error(_) => 0,
        }
    }

    /// The reply as single responses: a [`Reply::Live`] as one [`Reply::Events`] per watch,
    /// anything else as it is (for encoders that write one message per reply).
    pub fn singles(self) -> smallvec::SmallVec<[Reply; 1]> {
        match self {
            Reply::Live(l) => l.each().map(Reply::Events).collect(),
            r => smallvec::smallvec![r],
        }
    }

    /// The reply as a stream item: errors end the stream.
    pub fn into_item(self) -> Result<Reply, Status> {
        match self {
            Reply::Error(s) => Err(*s),
            f => Ok(f),
        }
    }
}
