//! What a watch session sends.
//!
//! A [`Frame`] is either a plain [`WatchResponse`] (created, canceled, progress, relayed
//! responses) or an events response whose event bytes are shared: [`EventsFrame`] points at the
//! revision batches and the watch's [`Shape`], whose per-batch encodings were made once for all
//! watchers of that shape. The wire encoders (`wire::grpc::watch`, the gateway's streams) write
//! the header and watch id, then copy the shared bytes.

use std::sync::Arc;

use tonic::Status;

use super::shape::Shape;
use crate::proto::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::source::cache::RevBatch;

/// One response of a watch session.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A response built as a message (boxed: frames wait in channels, keep them small).
    Msg(Box<WatchResponse>),
    /// An events response with shared, pre-encoded events.
    Events(EventsFrame),
    /// The stream ends with this error.
    Error(Box<Status>),
}

/// An events response: header, watch id, and the batches whose shared encodings for `shape`
/// make up its events.
#[derive(Debug, Clone)]
pub struct EventsFrame {
    /// Response header.
    pub header: ResponseHeader,
    /// Watch id.
    pub watch_id: i64,
    /// Batches (in revision order) with at least one event for `shape`.
    pub batches: Vec<Arc<RevBatch>>,
    /// The watch's shape.
    pub shape: Arc<Shape>,
}

impl EventsFrame {
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

impl Frame {
    /// A frame for a response built as a message.
    pub fn msg(resp: WatchResponse) -> Frame {
        Frame::Msg(Box::new(resp))
    }

    /// The frame as a message (for consumers that need one, e.g. the JSON gateway), or the
    /// error that ends the stream.
    pub fn into_response(self) -> Result<WatchResponse, Status> {
        match self {
            Frame::Msg(m) => Ok(*m),
            Frame::Events(e) => Ok(e.to_response()),
            Frame::Error(s) => Err(*s),
        }
    }

    /// The frame as a stream item: errors end the stream.
    pub fn into_item(self) -> Result<Frame, Status> {
        match self {
            Frame::Error(s) => Err(*s),
            f => Ok(f),
        }
    }
}
