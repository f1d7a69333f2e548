//! QUIC-LB connection IDs (draft-ietf-quic-load-balancers, plaintext
//! algorithm): a server embeds its server id in every connection ID it
//! issues, so the balancer can send a QUIC short-header packet to that
//! server whatever the client's address and port are now.
//!
//! A connection ID is `first octet | server id | nonce`:
//! - first octet: 3 bits of config rotation (`config_id`, 0..=6; 7 marks an
//!   unroutable ID), then 5 bits of the ID's length minus one (length
//!   self-description);
//! - `server_id_len` octets of server id (big-endian here; 1..=4: what the
//!   data path reads in one word, 4 billion servers per VIP);
//! - `nonce_len` octets (4..=18) the server fills so that its IDs are unique.
//!
//! A short-header packet (first octet's top bit clear) carries the
//! destination connection ID right after its first octet, with no length:
//! the balancer knows it from the VIP's parameters. Long-header packets
//! (Initial, Handshake, 0-RTT, Retry, Version Negotiation) carry
//! client-chosen IDs in the handshake and are balanced as any UDP flow.
//!
//! Shared by the data path (the flag encoding), the reference model
//! (`classify`) and userspace (`encode_cid`, `allocated_server_id`).

/// `config_id` that marks a connection ID the balancer cannot route.
pub const CONFIG_ID_UNROUTABLE: u8 = 7;
/// Longest server id the data path reads (one 32-bit word).
pub const MAX_SERVER_ID_LEN: u8 = 4;
pub const MIN_NONCE_LEN: u8 = 4;
pub const MAX_NONCE_LEN: u8 = 18;
/// QUIC v1 limits connection IDs to 20 octets.
pub const MAX_CID_LEN: u8 = 20;

/// `VipMeta::flags` bits of a QUIC VIP's parameters (beside `VIP_F_QUIC`).
const CONFIG_SHIFT: u32 = 8;
const SERVER_ID_LEN_SHIFT: u32 = 12;
const CID_LEN_SHIFT: u32 = 16;

/// A QUIC VIP's connection ID parameters (the same on every instance and
/// in every server of the VIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicLbParams {
    pub config_id: u8,
    pub server_id_len: u8,
    pub nonce_len: u8,
}

impl QuicLbParams {
    /// Length of the connection IDs servers issue.
    pub const fn cid_len(&self) -> u8 {
        1 + self.server_id_len + self.nonce_len
    }

    /// Why these parameters cannot be used, if they cannot.
    pub fn invalid(&self) -> Option<&'static str> {
        if self.config_id >= CONFIG_ID_UNROUTABLE {
            return Some("config_id must be 0..=6 (7 marks unroutable connection IDs)");
        }
        if !(1..=MAX_SERVER_ID_LEN).contains(&self.server_id_len) {
            return Some("server_id_len must be 1..=4 octets");
        }
        if !(MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&self.nonce_len) {
            return Some("nonce_len must be 4..=18 octets");
        }
        if self.cid_len() > MAX_CID_LEN {
            return Some("1 + server_id_len + nonce_len must be at most 20 (QUIC's limit)");
        }
        None
    }

    /// The parameters as `VipMeta::flags` bits (`VIP_F_QUIC` not included).
    pub const fn flag_bits(&self) -> u32 {
        (self.config_id as u32) << CONFIG_SHIFT
            | (self.server_id_len as u32) << SERVER_ID_LEN_SHIFT
            | (self.cid_len() as u32) << CID_LEN_SHIFT
    }

    /// The largest server id that fits `server_id_len` octets.
    pub const fn max_server_id(&self) -> u32 {
        if self.server_id_len >= 4 {
            u32::MAX
        } else {
            (1u32 << (8 * self.server_id_len as u32)) - 1
        }
    }
}

/// What the data path needs of the flag bits: (config id, server id
/// length, connection ID length).
#[inline(always)]
pub const fn flag_params(flags: u32) -> (u8, u8, u8) {
    (
        ((flags >> CONFIG_SHIFT) & 0x7) as u8,
        ((flags >> SERVER_ID_LEN_SHIFT) & 0x7) as u8,
        ((flags >> CID_LEN_SHIFT) & 0x1F) as u8,
    )
}

/// The server id in a word read from the 4 octets after the first one
/// (big-endian), for `server_id_len` 1..=4.
#[inline(always)]
pub const fn server_id_of(word_be: u32, server_id_len: u8) -> u32 {
    match server_id_len {
        0 => 0,
        1..=3 => word_be >> (8 * (4 - server_id_len as u32)),
        _ => word_be,
    }
}

/// How a UDP payload to a QUIC VIP is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicHeader {
    /// Long header: balanced as any UDP flow.
    Long,
    /// Short header whose connection ID names a server of this config.
    Short { server_id: u32 },
    /// No routable server id: empty, shorter than a connection ID, or
    /// another (or the unroutable) config: balanced as any UDP flow.
    Unroutable,
}

/// Reads a UDP payload under the VIP's flag bits (reference model; the
/// data path does the same with bounded reads): octet 0 is the QUIC
/// header's first, octets 1.. the destination connection ID.
pub fn classify(payload: &[u8], flags: u32) -> QuicHeader {
    let (config_id, sid_len, cid_len) = flag_params(flags);
    let Some(&first) = payload.first() else {
        return QuicHeader::Unroutable;
    };
    if first & 0x80 != 0 {
        return QuicHeader::Long;
    }
    if payload.len() < 1 + cid_len as usize || payload.len() < SHORT_HEADER_READ {
        return QuicHeader::Unroutable;
    }
    if payload[1] >> 5 != config_id {
        return QuicHeader::Unroutable;
    }
    let word = u32::from_be_bytes([payload[2], payload[3], payload[4], payload[5]]);
    QuicHeader::Short {
        server_id: server_id_of(word, sid_len),
    }
}

/// Octets of a short header the data path reads: the header's first, the
/// connection ID's first, four that hold the server id.
pub const SHORT_HEADER_READ: usize = 6;

#[cfg(feature = "user")]
mod user {
    use super::QuicLbParams;
    use std::{net::IpAddr, vec::Vec};

    /// A connection ID for `server_id` under `params`, the nonce taken from
    /// `nonce` (at least `nonce_len` octets): what a server's connection ID
    /// generator issues.
    pub fn encode_cid(params: &QuicLbParams, server_id: u32, nonce: &[u8]) -> Vec<u8> {
        let mut cid = Vec::with_capacity(params.cid_len() as usize);
        cid.push(params.config_id << 5 | (params.cid_len() - 1));
        let sid = server_id.to_be_bytes();
        cid.extend_from_slice(&sid[4 - params.server_id_len as usize..]);
        cid.extend_from_slice(&nonce[..params.nonce_len as usize]);
        cid
    }

    /// The server id of a backend that names none: FNV-1a of its address
    /// octets, folded to `server_id_len` octets. A function of the address
    /// alone, so every instance (and the server's operator, who reads it in
    /// `lbctl status`) gets the same one, and adding a backend never changes
    /// another's. Fixed for good: servers embed it in live connection IDs.
    pub fn allocated_server_id(addr: IpAddr, params: &QuicLbParams) -> u32 {
        let octets: Vec<u8> = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let mut h: u32 = 0x811C_9DC5;
        for o in octets {
            h ^= o as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        let max = params.max_server_id();
        if max == u32::MAX {
            h
        } else {
            (h ^ (h >> 16)) & max
        }
    }
}

#[cfg(feature = "user")]
pub use user::{allocated_server_id, encode_cid};

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use crate::maps::VIP_F_QUIC;
    use std::vec;

    const P: QuicLbParams = QuicLbParams {
        config_id: 2,
        server_id_len: 2,
        nonce_len: 6,
    };

    /// A short-header packet carrying `cid`, with some payload after it.
    fn short_packet(cid: &[u8], tail: usize) -> std::vec::Vec<u8> {
        let mut pkt = vec![0x41];
        pkt.extend_from_slice(cid);
        pkt.extend(core::iter::repeat_n(0xEE, tail));
        pkt
    }

    #[test]
    fn an_issued_id_reads_back_as_its_server() {
        for len in 1..=4u8 {
            let p = QuicLbParams {
                server_id_len: len,
                ..P
            };
            let sid = 0xA1B2_C3D4 & p.max_server_id();
            let cid = encode_cid(&p, sid, &[9; 18]);
            assert_eq!(cid.len(), p.cid_len() as usize);
            assert_eq!(cid[0] >> 5, 2, "config rotation bits");
            assert_eq!((cid[0] & 0x1F) + 1, p.cid_len(), "length self-description");
            let flags = VIP_F_QUIC | p.flag_bits();
            assert_eq!(
                classify(&short_packet(&cid, 20), flags),
                QuicHeader::Short { server_id: sid },
                "len {len}"
            );
        }
    }

    #[test]
    fn long_short_and_unroutable_headers() {
        let flags = VIP_F_QUIC | P.flag_bits();
        assert_eq!(classify(&[0xC3, 0, 0, 0, 1], flags), QuicHeader::Long);
        assert_eq!(classify(&[], flags), QuicHeader::Unroutable);
        let cid = encode_cid(&P, 7, &[1; 6]);
        // Exactly header octet + connection ID: routable; one short: not.
        let pkt = short_packet(&cid, 0);
        assert_eq!(classify(&pkt, flags), QuicHeader::Short { server_id: 7 });
        assert_eq!(
            classify(&pkt[..pkt.len() - 1], flags),
            QuicHeader::Unroutable
        );
        // Another config rotation value, or the unroutable one.
        for cfg in [0u8, 7] {
            let mut other = pkt.clone();
            other[1] = (other[1] & 0x1F) | cfg << 5;
            assert_eq!(
                classify(&other, flags),
                QuicHeader::Unroutable,
                "config {cfg}"
            );
        }
    }

    #[test]
    fn parameters_are_checked_and_packed() {
        assert_eq!(P.invalid(), None);
        assert_eq!(P.cid_len(), 9);
        assert_eq!(flag_params(P.flag_bits() | VIP_F_QUIC), (2, 2, 9));
        for bad in [
            QuicLbParams { config_id: 7, ..P },
            QuicLbParams {
                server_id_len: 0,
                ..P
            },
            QuicLbParams {
                server_id_len: 5,
                ..P
            },
            QuicLbParams { nonce_len: 3, ..P },
            QuicLbParams {
                server_id_len: 4,
                nonce_len: 16,
                ..P
            },
        ] {
            assert!(bad.invalid().is_some(), "{bad:?}");
        }
        assert_eq!(P.max_server_id(), 0xFFFF);
    }

    #[test]
    fn allocated_ids_depend_on_the_address_only_and_fit() {
        let a: std::net::IpAddr = "10.30.1.2".parse().unwrap();
        let b: std::net::IpAddr = "10.30.2.2".parse().unwrap();
        for len in 1..=4u8 {
            let p = QuicLbParams {
                server_id_len: len,
                ..P
            };
            assert_eq!(allocated_server_id(a, &p), allocated_server_id(a, &p));
            assert!(allocated_server_id(a, &p) <= p.max_server_id());
        }
        assert_ne!(allocated_server_id(a, &P), allocated_server_id(b, &P));
    }
}
