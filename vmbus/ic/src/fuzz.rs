//! Fuzz harness for the IC reply parser, shared by `vmbus/ic/fuzz` and
//! the proptests. It builds a real request of one service, takes Linux's
//! answer to it (or the request itself), damages it with the input and
//! runs every check the worker runs. It must never panic.

use crate::guest::GuestIc;
use crate::kvp::{self, Pool};
use crate::message::{
    SentRequest, encode_request, negotiate_body, parse_negotiate, validate_reply,
};
use crate::protocol::{Service, Version, kvp_op, msgtype, vss_op};
use crate::{heartbeat, shutdown, timesync, vss};
use vmbus::wire::packet_type;
use zerocopy::IntoBytes;

/// The request kinds the harness builds.
const CASES: usize = 12;

/// Builds request `case`; returns the service, its body and what a parser
/// needs to know about it.
fn request(case: usize) -> (Service, u16, Vec<u8>) {
    let v4 = Version::new(4, 0);
    match case % CASES {
        0 => (
            Service::Shutdown,
            msgtype::NEGOTIATE,
            negotiate_body(Service::Shutdown),
        ),
        1 => (
            Service::Kvp,
            msgtype::NEGOTIATE,
            negotiate_body(Service::Kvp),
        ),
        2 => (
            Service::Shutdown,
            msgtype::SHUTDOWN,
            shutdown::request_body(2).as_bytes().to_vec(),
        ),
        3 => (
            Service::TimeSync,
            msgtype::TIMESYNC,
            timesync::request_body(v4, 1, 5, 6),
        ),
        4 => (
            Service::TimeSync,
            msgtype::TIMESYNC,
            timesync::request_body(Version::new(3, 0), 2, 5, 6),
        ),
        5 => (
            Service::Heartbeat,
            msgtype::HEARTBEAT,
            heartbeat::request_body(40).as_bytes().to_vec(),
        ),
        6 => (
            Service::Kvp,
            msgtype::KVP_EXCHANGE,
            kvp::set_body(Pool::External, "k", "v").as_bytes().to_vec(),
        ),
        7 => (
            Service::Kvp,
            msgtype::KVP_EXCHANGE,
            kvp::delete_body(Pool::External, "k").as_bytes().to_vec(),
        ),
        8 | 9 => (
            Service::Kvp,
            msgtype::KVP_EXCHANGE,
            kvp::enumerate_body(Pool::Auto, 2).as_bytes().to_vec(),
        ),
        10 => (
            Service::Vss,
            msgtype::VSS,
            vss::request_body(vss_op::FREEZE).as_bytes().to_vec(),
        ),
        _ => (
            Service::Vss,
            msgtype::NEGOTIATE,
            negotiate_body(Service::Vss),
        ),
    }
}

/// A guest that answers `case` as Linux does (time sync negotiated at 4.0
/// for the v4 case).
fn linux(service: Service, case: usize) -> GuestIc {
    let mut g = GuestIc::new(service);
    g.srv_version = if case == 3 { 0x0004_0000 } else { 0x0003_0000 };
    g.auto.ipv4 = vec!["10.0.0.5".into()];
    g
}

/// The reply parser on a damaged reply. Byte 0 picks the request; bit 7 of
/// byte 1 says whether the rest replaces the reply or is XORed into it as
/// (offset, byte) pairs. Returns whether the reply passed every check.
pub fn reply_parser(data: &[u8]) -> bool {
    let [case, mode, rest @ ..] = data else {
        return false;
    };
    let case = *case as usize % CASES;
    let (service, kind, body) = request(case);
    let sent = SentRequest {
        txid: 9,
        ic_txid: 9,
        msgtype: kind,
        body_len: body.len() as u16,
    };
    let mut req = Vec::new();
    encode_request(
        &mut req,
        &sent,
        (Version::new(3, 0), Version::new(4, 0)),
        &body,
    );
    req.resize(sent.reply_len(), 0);
    let mut reply = if mode & 0x80 != 0 {
        rest.to_vec()
    } else {
        let mut r = linux(service, case).answer(&req).unwrap_or(req);
        for pair in rest.chunks_exact(3) {
            let at = u16::from_le_bytes([pair[0], pair[1]]) as usize % r.len().max(1);
            if let Some(b) = r.get_mut(at) {
                *b ^= pair[2];
            }
        }
        r
    };
    if mode & 0x40 != 0 {
        reply.truncate(*mode as usize & 0x3f);
    }
    let txid = if mode & 0x20 != 0 { 10 } else { 9 };
    let Ok(r) = validate_reply(&sent, packet_type::DATA_INBAND, txid, &reply) else {
        return false;
    };
    match (case, kind) {
        (_, msgtype::NEGOTIATE) => parse_negotiate(service, r.body).is_ok(),
        (2, _) => shutdown::parse_reply(2, r.status, r.body).is_ok(),
        (3, _) => timesync::parse_reply(Version::new(4, 0), 1, 5, r.body).is_ok(),
        (4, _) => timesync::parse_reply(Version::new(3, 0), 2, 5, r.body).is_ok(),
        (5, _) => heartbeat::parse_reply(40, r.body).is_ok(),
        (6, _) => kvp::parse_change(kvp_op::SET, Pool::External, r.body).is_ok(),
        (7, _) => kvp::parse_change(kvp_op::DELETE, Pool::External, r.body).is_ok(),
        (8 | 9, _) => kvp::parse_enumerate(Pool::Auto, 2, r.body)
            .map(|e| kvp::ip_addresses(&[e]))
            .is_ok(),
        _ => vss::parse_reply(vss_op::FREEZE, r.body).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn linux_answers_pass_every_check() {
        for case in 0..CASES as u8 {
            assert!(reply_parser(&[case, 0]), "case {case}");
        }
    }

    #[test]
    fn damage_is_caught() {
        // Wrong VMBus transaction id, a truncated reply, a flipped flag.
        assert!(!reply_parser(&[5, 0x20]));
        assert!(!reply_parser(&[5, 0x40 | 0x10]));
        assert!(!reply_parser(&[5, 0, 25, 0, 0x02]));
        // The heartbeat's sequence number not incremented.
        assert!(!reply_parser(&[5, 0, 28, 0, 0x01]));
        // An odd key size in an ENUMERATE answer.
        assert!(!reply_parser(&[8, 0, 40, 0, 0x01]));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn reply_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            reply_parser(&data);
        }

        #[test]
        fn damaged_linux_replies_never_panic(case in 0u8..12, mode in 0u8..0x80, flips in proptest::collection::vec(any::<u8>(), 0..60)) {
            let mut data = vec![case, mode];
            data.extend_from_slice(&flips);
            reply_parser(&data);
        }
    }
}
