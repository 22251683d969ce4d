//! Requests that would crash etcd 3.4 are refused here, before they reach it.
//!
//! etcd 3.4.23 trusts the `sort_target` of a `RangeRequest`: outside `KEY..=VALUE` its sorter
//! stays nil and the server panics as soon as it sorts (etcd-io/etcd#13554), inside a Txn
//! too, where a write Txn panics in the raft apply loop and so again on every restart. etcd
//! 3.5 refuses such requests up front (`checkRangeRequest`, `checkRequestOp`,
//! `checkTxnRequest` in `v3rpc/key.go`) with `InvalidArgument` "etcdserver: invalid sort
//! option". The proxy applies 3.5's checks, in 3.5's order, to every request that carries an
//! invalid sort target, so the client gets a fixed etcd's answer and etcd never sees it.
//!
//! An out-of-range `sort_order` with a valid target is left to etcd: 3.4.23 answers it
//! (unsorted) without harm, and that answer is the oracle (`tests/bad_input.rs` diffs it).
//! Everything else is etcd's to answer, passed through as it is.

use crate::error::Error;
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::request_op::Request as Op;
use crate::proto::etcdserverpb::{RangeRequest, RequestOp, TxnRequest};

/// etcd's default `--max-txn-ops`: the bound 3.5's Txn check is evaluated with.
const MAX_TXN_OPS: usize = 128;

/// The checks on a Range before it is served or forwarded: an empty key (etcd's own check),
/// then an invalid sort target refused as etcd 3.5 refuses it.
pub fn check_range(req: &RangeRequest) -> Result<(), Error> {
    if req.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if !valid_target(req) {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

/// Whether the sort target names a value etcd knows (a sorter exists for it).
fn valid_target(req: &RangeRequest) -> bool {
    SortTarget::try_from(req.sort_target).is_ok()
}

/// etcd 3.5's `checkRangeRequest`: key first, then sort order, then sort target.
fn check_range_35(req: &RangeRequest) -> Result<(), Error> {
    if req.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if SortOrder::try_from(req.sort_order).is_err() || !valid_target(req) {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

/// Refuses a Txn that carries an invalid sort target anywhere (nested Txns included) with the
/// error etcd 3.5 gives it; every other Txn goes to etcd untouched.
pub fn check_txn(req: &TxnRequest) -> Result<(), Error> {
    if !txn_has_bad_sort(req) {
        return Ok(());
    }
    // etcd 3.5 answers the first failing check, which may come before the sort option.
    check_txn_35(req, MAX_TXN_OPS)?;
    Err(Error::InvalidSortOption)
}

/// True when some range op of `req`, at any depth, has an invalid sort target.
fn txn_has_bad_sort(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(req.failure.iter())
        .any(|op| match &op.request {
            Some(Op::RequestRange(r)) => !valid_target(r),
            Some(Op::RequestTxn(t)) => txn_has_bad_sort(t),
            _ => false,
        })
}

/// etcd 3.5's `checkTxnRequest`.
fn check_txn_35(req: &TxnRequest, max_ops: usize) -> Result<(), Error> {
    let opc = req
        .compare
        .len()
        .max(req.success.len())
        .max(req.failure.len());
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    if req.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in req.success.iter().chain(req.failure.iter()) {
        check_op_35(op, max_ops - opc)?;
    }
    Ok(())
}

/// etcd 3.5's `checkRequestOp`.
fn check_op_35(op: &RequestOp, max_ops: usize) -> Result<(), Error> {
    match &op.request {
        Some(Op::RequestRange(r)) => check_range_35(r),
        Some(Op::RequestPut(p)) => {
            if p.key.is_empty() {
                Err(Error::EmptyKey)
            } else if p.ignore_value && !p.value.is_empty() {
                Err(Error::ValueProvided)
            } else if p.ignore_lease && p.lease != 0 {
                Err(Error::LeaseProvided)
            } else {
                Ok(())
            }
        }
        Some(Op::RequestDeleteRange(d)) if d.key.is_empty() => Err(Error::EmptyKey),
        Some(Op::RequestDeleteRange(_)) => Ok(()),
        Some(Op::RequestTxn(t)) => check_txn_35(t, max_ops),
        None => Err(Error::KeyNotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{Compare, PutRequest};

    fn range(target: i32, order: i32) -> RangeRequest {
        RangeRequest {
            key: "k".into(),
            sort_target: target,
            sort_order: order,
            ..Default::default()
        }
    }

    fn op(r: Op) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn range_checks_in_etcd_35_order() {
        assert!(check_range(&range(4, 2)).is_ok());
        assert!(matches!(
            check_range(&range(99, 0)),
            Err(Error::InvalidSortOption)
        ));
        assert!(matches!(
            check_range(&range(-1, 7)),
            Err(Error::InvalidSortOption)
        ));
        // etcd 3.4 answers an unknown order with a known target: left to it.
        assert!(check_range(&range(0, 3)).is_ok());
        assert!(check_range(&range(1, -1)).is_ok());
        let empty = RangeRequest {
            sort_target: 99,
            ..Default::default()
        };
        assert!(matches!(check_range(&empty), Err(Error::EmptyKey)));
    }

    #[test]
    fn txn_refused_only_with_a_bad_sort() {
        let good = TxnRequest {
            success: vec![op(Op::RequestRange(range(1, 1))), RequestOp::default()],
            ..Default::default()
        };
        // Other faults are etcd's to answer.
        assert!(check_txn(&good).is_ok());
        // With a bad target somewhere, 3.5's checks run: an earlier bad order answers first.
        let order_first = TxnRequest {
            success: vec![
                op(Op::RequestRange(range(1, 9))),
                op(Op::RequestRange(range(77, 1))),
            ],
            ..Default::default()
        };
        assert!(matches!(
            check_txn(&order_first),
            Err(Error::InvalidSortOption)
        ));
        let mut nested = TxnRequest {
            failure: vec![op(Op::RequestRange(range(99, 1)))],
            ..Default::default()
        };
        for _ in 0..10 {
            nested = TxnRequest {
                success: vec![op(Op::RequestTxn(nested))],
                ..Default::default()
            };
        }
        assert!(matches!(check_txn(&nested), Err(Error::InvalidSortOption)));
        // An earlier fault is answered first, as etcd 3.5 does.
        let earlier = TxnRequest {
            compare: vec![Compare::default()],
            success: vec![op(Op::RequestRange(range(99, 1)))],
            ..Default::default()
        };
        assert!(matches!(check_txn(&earlier), Err(Error::EmptyKey)));
        let put_first = TxnRequest {
            success: vec![
                op(Op::RequestPut(PutRequest {
                    key: "k".into(),
                    ignore_lease: true,
                    lease: 1,
                    ..Default::default()
                })),
                op(Op::RequestRange(range(99, 1))),
            ],
            ..Default::default()
        };
        assert!(matches!(check_txn(&put_first), Err(Error::LeaseProvided)));
        let too_many = TxnRequest {
            success: (0..129)
                .map(|_| op(Op::RequestRange(range(99, 1))))
                .collect(),
            ..Default::default()
        };
        assert!(matches!(check_txn(&too_many), Err(Error::TooManyOps)));
    }
}
