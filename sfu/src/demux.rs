//! Demultiplexing of the one shared UDP port: which peer connection a datagram belongs to.
//!
//! A STUN binding request names its target in USERNAME (`<server ufrag>:<client ufrag>`); the
//! server ufrag is unique per peer connection, so STUN is routed by it, and the remote address it
//! came from is remembered. Everything else (DTLS, SRTP, SRTCP) is routed by that address
//! (RFC 7983 tells the kinds apart by their first byte).

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::ids::PeerId;

/// What a datagram is, by its first byte (RFC 7983 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatagramKind {
    Stun,
    Dtls,
    Rtp,
    Unknown,
}

pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram.first() {
        Some(0..=3) => DatagramKind::Stun,
        Some(20..=63) => DatagramKind::Dtls,
        Some(128..=191) => DatagramKind::Rtp,
        _ => DatagramKind::Unknown,
    }
}

const STUN_HEADER_LEN: usize = 20;
const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;

/// The local (server-side) ufrag named by a STUN message's USERNAME attribute, if the datagram is
/// a well-formed STUN message that has one. Never panics on any input.
pub fn stun_local_ufrag(datagram: &[u8]) -> Option<&str> {
    if datagram.len() < STUN_HEADER_LEN || datagram[0] & 0xc0 != 0 || datagram[4..8] != STUN_MAGIC_COOKIE {
        return None;
    }
    let body_len = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    let end = STUN_HEADER_LEN.checked_add(body_len)?;
    let body = datagram.get(STUN_HEADER_LEN..end)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + len)?;
        if typ == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next().filter(|u| !u.is_empty());
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// Routing table from ufrags and remote addresses to peers.
#[derive(Debug, Default)]
pub struct Demux {
    by_ufrag: HashMap<String, PeerId>,
    by_addr: HashMap<(SocketAddr, SocketAddr), PeerId>,
    addrs_of: HashMap<PeerId, Vec<(SocketAddr, SocketAddr)>>,
}

impl Demux {
    pub fn add_peer(&mut self, peer: PeerId, local_ufrag: String) {
        self.by_ufrag.insert(local_ufrag, peer);
    }

    pub fn remove_peer(&mut self, peer: PeerId) {
        self.by_ufrag.retain(|_, p| *p != peer);
        for key in self.addrs_of.remove(&peer).unwrap_or_default() {
            if self.by_addr.get(&key) == Some(&peer) {
                self.by_addr.remove(&key);
            }
        }
    }

    /// The peer a datagram from `remote` to `local` belongs to. STUN with a known ufrag also
    /// (re)binds the address pair to that peer, so media can follow.
    pub fn route(&mut self, local: SocketAddr, remote: SocketAddr, datagram: &[u8]) -> Option<PeerId> {
        if classify(datagram) == DatagramKind::Stun
            && let Some(ufrag) = stun_local_ufrag(datagram)
            && let Some(&peer) = self.by_ufrag.get(ufrag)
        {
            let key = (local, remote);
            let previous = self.by_addr.insert(key, peer);
            if previous != Some(peer) {
                if let Some(prev) = previous
                    && let Some(list) = self.addrs_of.get_mut(&prev)
                {
                    list.retain(|k| *k != key);
                }
                self.addrs_of.entry(peer).or_default().push(key);
            }
            return Some(peer);
        }
        self.by_addr.get(&(local, remote)).copied()
    }

    pub fn peer_count(&self) -> usize {
        self.by_ufrag.len()
    }

    pub fn addr_count(&self) -> usize {
        self.by_addr.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun_with_username(username: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&STUN_MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn classify_table() {
        for (first, kind) in [
            (0u8, DatagramKind::Stun),
            (1, DatagramKind::Stun),
            (3, DatagramKind::Stun),
            (4, DatagramKind::Unknown),
            (20, DatagramKind::Dtls),
            (22, DatagramKind::Dtls),
            (63, DatagramKind::Dtls),
            (64, DatagramKind::Unknown),
            (128, DatagramKind::Rtp),
            (191, DatagramKind::Rtp),
            (192, DatagramKind::Unknown),
        ] {
            assert_eq!(classify(&[first, 0, 0]), kind, "first byte {first}");
        }
        assert_eq!(classify(&[]), DatagramKind::Unknown);
    }

    #[test]
    fn ufrag_table() {
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (stun_with_username(b"srvUfrag:cli"), Some("srvUfrag")),
            (stun_with_username(b"abc:defg1"), Some("abc")),
            (stun_with_username(b"nocolon"), Some("nocolon")),
            (stun_with_username(b":cli"), None),
            (stun_with_username(&[0xff, 0xfe, b':', b'a']), None),
            ({ let mut m = stun_with_username(b"a:b"); m[4] = 0; m }, None), // bad cookie
            ({ let mut m = stun_with_username(b"a:b"); m[3] = 200; m }, None), // length past end
            ({ let mut m = stun_with_username(b"a:b"); m[22] = 0; m[23] = 200; m }, None), // attr len past end
            (vec![0; 19], None),
            (vec![], None),
            (vec![0x80; 40], None), // RTP-looking
        ];
        for (i, (m, want)) in cases.iter().enumerate() {
            assert_eq!(stun_local_ufrag(m), *want, "case {i}");
        }
    }

    #[test]
    fn skips_other_attributes_with_padding() {
        // SOFTWARE (0x8022) of 5 bytes (padded to 8), then USERNAME.
        let mut attrs = vec![0x80, 0x22, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0];
        attrs.extend_from_slice(&[0x00, 0x06, 0x00, 0x03, b'x', b':', b'y', 0]);
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&STUN_MAGIC_COOKIE);
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&attrs);
        assert_eq!(stun_local_ufrag(&m), Some("x"));
    }

    #[test]
    fn routes_stun_by_ufrag_then_media_by_address() {
        let local: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let alice: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let bob: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        let mut d = Demux::default();
        d.add_peer(PeerId(1), "ufA".into());
        d.add_peer(PeerId(2), "ufB".into());
        let rtp = [0x80u8, 96, 0, 1];
        assert_eq!(d.route(local, alice, &rtp), None, "media before any check is unknown");
        assert_eq!(d.route(local, alice, &stun_with_username(b"ufA:x")), Some(PeerId(1)));
        assert_eq!(d.route(local, bob, &stun_with_username(b"ufB:y")), Some(PeerId(2)));
        assert_eq!(d.route(local, alice, &rtp), Some(PeerId(1)));
        assert_eq!(d.route(local, bob, &[22, 1, 2]), Some(PeerId(2)));
        assert_eq!(d.route(local, bob, &stun_with_username(b"ufC:y")), Some(PeerId(2)), "unknown ufrag falls back to the address");
        // Bob's address moves to peer 1 (e.g. after an ICE restart reused the port).
        assert_eq!(d.route(local, bob, &stun_with_username(b"ufA:z")), Some(PeerId(1)));
        d.remove_peer(PeerId(1));
        assert_eq!(d.route(local, alice, &rtp), None);
        assert_eq!(d.route(local, bob, &rtp), None);
        assert_eq!(d.addr_count(), 0);
        assert_eq!(d.peer_count(), 1);
    }
}
