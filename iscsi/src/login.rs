//! Connecting and logging in (RFC 7143 sections 6 and 12), discovery with SendTargets, and a
//! blocking logout. These run on a blocking socket with timeouts, before the connection is
//! handed to the session's IO thread (or while that thread reconnects).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::{Chap, Config};
use crate::error::{Error, Result};
use crate::pdu::{self, Header, Limits, TargetPdu, BHS_LEN};
use crate::text::{self, Offer, Params};
use md5::{Digest, Md5};

/// Security negotiation stage.
const STAGE_SECURITY: u8 = 0;
/// Operational negotiation stage.
const STAGE_OPERATIONAL: u8 = 1;
/// Full feature phase.
const STAGE_FULL: u8 = 3;

/// The state a successful login hands to the full-feature phase.
#[derive(Debug, Clone, Copy)]
pub struct LoggedIn {
    /// Negotiated parameters.
    pub params: Params,
    /// The session handle the target assigned.
    pub tsih: u16,
    /// Next CmdSN to use.
    pub cmd_sn: u32,
    /// ExpStatSN to send.
    pub exp_stat_sn: u32,
    /// MaxCmdSN from the target.
    pub max_cmd_sn: u32,
}

/// Which kind of session to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// SCSI commands to one target.
    Normal,
}

/// Opens a TCP connection to `portal` (trying every address it resolves to) within `timeout`.
pub fn connect(portal: &str, timeout: Duration) -> Result<TcpStream> {
    let cerr = |source| Error::Connect {
        portal: portal.to_owned(),
        source,
    };
    let mut last = None;
    for addr in portal.to_socket_addrs().map_err(cerr)? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                s.set_nodelay(true).map_err(cerr)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(cerr(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

/// A connection in the login phase (or a discovery session): one PDU at a time, blocking.
pub struct LoginConn {
    /// The socket.
    pub stream: TcpStream,
    cmd_sn: u32,
    exp_stat_sn: u32,
    limits: Limits,
    deadline: Instant,
}

impl LoginConn {
    fn new(stream: TcpStream, deadline: Instant) -> LoginConn {
        LoginConn {
            stream,
            cmd_sn: 1,
            exp_stat_sn: 0,
            limits: Limits::LOGIN,
            deadline,
        }
    }

    fn arm(&self) -> Result<()> {
        let left = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(Error::Timeout("waiting for the target during login"))?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))?;
        Ok(())
    }

    fn send(&mut self, bhs: &[u8; BHS_LEN], data: &[u8]) -> Result<()> {
        self.arm()?;
        let mut out = Vec::with_capacity(BHS_LEN + 8 + pdu::pad4(data.len()));
        out.extend_from_slice(bhs);
        if self.limits.header_digest {
            out.extend_from_slice(&pdu::header_digest(bhs));
        }
        if !data.is_empty() {
            out.extend_from_slice(data);
            out.resize(out.len() + pdu::pad4(data.len()) - data.len(), 0);
            if self.limits.data_digest {
                let mut c = crate::digest::Crc32c::new();
                c.update(&out[out.len() - pdu::pad4(data.len())..]);
                out.extend_from_slice(&c.digest());
            }
        }
        self.stream
            .write_all(&out)
            .map_err(|e| timeout_or(e, "sending to the target"))?;
        Ok(())
    }

    fn recv(&mut self) -> Result<(Header, Vec<u8>)> {
        self.arm()?;
        let mut bhs = [0u8; BHS_LEN];
        self.stream
            .read_exact(&mut bhs)
            .map_err(|e| timeout_or(e, "waiting for the target's answer"))?;
        let h = pdu::parse_header(&bhs, &self.limits)?;
        let mut rest = vec![0u8; h.ahs_len + h.rest_len(&self.limits)];
        self.stream
            .read_exact(&mut rest)
            .map_err(|e| timeout_or(e, "waiting for the target's answer"))?;
        let mut whole = bhs.to_vec();
        whole.extend_from_slice(&rest);
        let (h, data, _) = pdu::parse_pdu(&whole, &self.limits)?;
        Ok((h, data.to_vec()))
    }

    fn note_sn(&mut self, sn: pdu::Sn) {
        self.exp_stat_sn = sn.stat_sn.wrapping_add(1);
    }
}

fn timeout_or(e: std::io::Error, what: &'static str) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout(what),
        std::io::ErrorKind::UnexpectedEof => {
            Error::Protocol(format!("target closed the connection while {what}"))
        }
        _ => Error::Io(e),
    }
}

fn refusal(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (1, _) => "target moved (redirection is not followed)",
        (2, 0x00) => "initiator error",
        (2, 0x01) => "authentication failed",
        (2, 0x02) => "initiator not authorized to access this target",
        (2, 0x03) => "target not found",
        (2, 0x04) => "target removed",
        (2, 0x05) => "unsupported iSCSI version",
        (2, 0x06) => "too many connections",
        (2, 0x07) => "missing parameter",
        (2, 0x08) => "cannot include this connection in the session",
        (2, 0x09) => "session type not supported",
        (2, 0x0a) => "session does not exist",
        (2, 0x0b) => "invalid request during login",
        (3, 0x00) => "target error",
        (3, 0x01) => "service unavailable",
        (3, 0x02) => "target out of resources",
        _ => "unknown status",
    }
}

/// Logs in on `stream`. `isid` identifies the session from our side; logging in again with the
/// same ISID and TSIH 0 makes the target reinstate the session (drop the old one and its
/// tasks, RFC 7143 section 6.3.5).
pub fn login(
    stream: TcpStream,
    cfg: &Config,
    kind: SessionType,
    isid: [u8; 6],
    deadline: Instant,
) -> Result<(LoginConn, LoggedIn)> {
    let mut c = LoginConn::new(stream, deadline);
    let target_label = match kind {
        SessionType::Normal => cfg.target.clone(),
        SessionType::Discovery => format!("discovery at {}", cfg.portal),
    };
    let offer: Offer = match kind {
        SessionType::Normal => cfg.offer.clone(),
        SessionType::Discovery => Offer {
            header_digest: false,
            data_digest: false,
            ..cfg.offer.clone()
        },
    };
    let mut params = Params::defaults(&offer);
    let itt = 0u32;

    // Security stage: declare ourselves, pick the authentication method.
    let mut out = Vec::new();
    text::push(&mut out, "InitiatorName", &cfg.initiator_name);
    match kind {
        SessionType::Normal => {
            text::push(&mut out, "SessionType", "Normal");
            text::push(&mut out, "TargetName", &cfg.target);
        }
        SessionType::Discovery => text::push(&mut out, "SessionType", "Discovery"),
    }
    let chap = cfg.chap.as_ref();
    text::push(
        &mut out,
        "AuthMethod",
        if chap.is_some() { "CHAP" } else { "None" },
    );

    let mut stage = STAGE_SECURITY;
    // With no authentication we ask to move to the operational stage at once.
    let mut transit = chap.is_none();
    let mut chap_step = 0; // 0: method sent, 1: CHAP_A sent, 2: response sent
    let mut op_sent = false;
    let mut tsih;
    for _round in 0..16 {
        let nsg = if stage == STAGE_SECURITY {
            STAGE_OPERATIONAL
        } else {
            STAGE_FULL
        };
        let (h, data) = exchange(&mut c, transit, stage, nsg, isid, itt, &out)?;
        let TargetPdu::LoginResponse(r) = h.pdu else {
            return Err(Error::Protocol(format!(
                "expected a Login Response, got {:?}",
                h.pdu
            )));
        };
        if r.status_class != 0 {
            if r.status_class == 2 && r.status_detail == 1 {
                if let Some(ch) = chap {
                    if chap_step == 2 {
                        return Err(Error::AuthFailed {
                            target: target_label,
                            user: ch.user.clone(),
                        });
                    }
                }
                if chap.is_none() {
                    return Err(Error::AuthMismatch {
                        target: target_label,
                        why: "the target requires authentication; configure a CHAP user and secret"
                            .into(),
                    });
                }
            }
            return Err(Error::LoginRefused {
                target: target_label,
                reason: refusal(r.status_class, r.status_detail),
                class: r.status_class,
                detail: r.status_detail,
            });
        }
        if r.version_active != 0 {
            return Err(Error::Protocol(format!(
                "target chose iSCSI version {}",
                r.version_active
            )));
        }
        if r.isid != isid || r.itt != itt {
            return Err(Error::Protocol("Login Response for another login".into()));
        }
        if r.csg != stage {
            return Err(Error::Protocol(format!(
                "Login Response for stage {} while in stage {stage}",
                r.csg
            )));
        }
        tsih = r.tsih;
        let pairs = text::parse(&data)?;
        out.clear();
        if stage == STAGE_SECURITY {
            for (k, v) in &pairs {
                if k == "AuthMethod" {
                    match (v.as_str(), chap) {
                        ("None", None) | ("CHAP", Some(_)) => {}
                        ("None", Some(_)) => {
                            return Err(Error::AuthMismatch {
                                target: target_label,
                                why: "CHAP configured but the target offers no authentication"
                                    .into(),
                            })
                        }
                        (other, _) => {
                            return Err(Error::AuthMismatch {
                                target: target_label,
                                why: format!("the target answered AuthMethod={other}"),
                            })
                        }
                    }
                }
            }
            if let Some(ch) = chap {
                if !r.transit {
                    match chap_step {
                        0 => {
                            text::push(&mut out, "CHAP_A", "5");
                            chap_step = 1;
                        }
                        1 => {
                            chap_answer(&pairs, ch, &mut out, &target_label)?;
                            chap_step = 2;
                            transit = true;
                        }
                        _ => transit = true,
                    }
                }
            }
        } else {
            for (k, v) in &pairs {
                if let Some((rk, rv)) = params.apply(&offer, k, v)? {
                    text::push(&mut out, &rk, &rv);
                }
            }
        }
        if r.transit {
            if r.nsg == STAGE_FULL && (stage == STAGE_OPERATIONAL || !op_sent) {
                return finish(c, params, tsih, r.sn);
            }
            if stage == STAGE_SECURITY && r.nsg == STAGE_OPERATIONAL {
                if chap.is_some() && chap_step < 2 {
                    return Err(Error::Protocol(
                        "target skipped CHAP although it accepted AuthMethod=CHAP".into(),
                    ));
                }
                stage = STAGE_OPERATIONAL;
                out.clear();
                match kind {
                    SessionType::Normal => Params::offer_text(&offer, &mut out),
                    SessionType::Discovery => {
                        text::push(&mut out, "HeaderDigest", "None");
                        text::push(&mut out, "DataDigest", "None");
                        text::push(
                            &mut out,
                            "MaxRecvDataSegmentLength",
                            &offer.max_recv_data_segment.to_string(),
                        );
                    }
                }
                op_sent = true;
                transit = true;
                continue;
            }
        }
        if stage == STAGE_OPERATIONAL {
            transit = true;
        }
    }
    Err(Error::Protocol(
        "login did not finish in 16 exchanges".into(),
    ))
}

fn finish(
    mut c: LoginConn,
    params: Params,
    tsih: u16,
    sn: pdu::Sn,
) -> Result<(LoginConn, LoggedIn)> {
    c.note_sn(sn);
    c.limits = Limits {
        max_recv_data_segment: params.max_recv_data_segment,
        header_digest: params.header_digest,
        data_digest: params.data_digest,
    };
    let done = LoggedIn {
        params,
        tsih,
        cmd_sn: sn.exp_cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        max_cmd_sn: sn.max_cmd_sn,
    };
    c.cmd_sn = sn.exp_cmd_sn;
    Ok((c, done))
}

/// One login request (with its text) and the whole answer, fetching continuations.
fn exchange(
    c: &mut LoginConn,
    transit: bool,
    csg: u8,
    nsg: u8,
    isid: [u8; 6],
    itt: u32,
    data: &[u8],
) -> Result<(Header, Vec<u8>)> {
    let mut bhs = [0u8; BHS_LEN];
    pdu::login_request(
        &mut bhs,
        transit,
        csg,
        nsg,
        isid,
        0,
        itt,
        0,
        c.cmd_sn,
        c.exp_stat_sn,
        data.len() as u32,
    );
    c.send(&bhs, data)?;
    let mut all = Vec::new();
    loop {
        let (h, d) = c.recv()?;
        if let TargetPdu::LoginResponse(r) = h.pdu {
            c.note_sn(r.sn);
            if all.len() + d.len() > text::MAX_TEXT {
                return Err(text::TextError::TooLarge.into());
            }
            all.extend_from_slice(&d);
            if r.cont && r.status_class == 0 {
                // Ask for the rest: an empty request in the same stage, T=0.
                pdu::login_request(
                    &mut bhs,
                    false,
                    csg,
                    nsg,
                    isid,
                    0,
                    itt,
                    0,
                    c.cmd_sn,
                    c.exp_stat_sn,
                    0,
                );
                c.send(&bhs, &[])?;
                continue;
            }
        }
        return Ok((h, all));
    }
}

/// The CHAP response for `CHAP_A=5`: MD5 over the identifier, the secret and the challenge
/// (RFC 1994 section 4.1). MD5 is what the protocol names; nothing here needs it to resist
/// collisions.
fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    Md5::new()
        .chain_update([id])
        .chain_update(secret)
        .chain_update(challenge)
        .finalize()
        .into()
}

fn chap_answer(
    pairs: &[(String, String)],
    ch: &Chap,
    out: &mut Vec<u8>,
    target: &str,
) -> Result<()> {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    };
    let bad = |why: String| Error::AuthMismatch {
        target: target.to_owned(),
        why,
    };
    match get("CHAP_A") {
        Some("5") => {}
        other => {
            return Err(bad(format!(
                "the target chose CHAP_A={other:?}; only 5 (MD5) is supported"
            )))
        }
    }
    let id: u8 = get("CHAP_I")
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&v| v <= 255)
        .ok_or_else(|| bad("missing or invalid CHAP_I".into()))? as u8;
    let challenge = get("CHAP_C")
        .and_then(text::decode_binary)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("missing or invalid CHAP_C".into()))?;
    let resp = chap_response(id, ch.secret.as_bytes(), &challenge);
    text::push(out, "CHAP_N", &ch.user);
    text::push(out, "CHAP_R", &text::encode_hex(&resp));
    Ok(())
}

/// A target a discovery session reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    /// Target IQN.
    pub name: String,
    /// Its portals as `address:port,tpgt`.
    pub addresses: Vec<String>,
}

/// Runs a discovery session at `cfg.portal` (with `cfg.chap` if set) and returns what
/// `SendTargets=All` lists.
pub fn discover(cfg: &Config) -> Result<Vec<DiscoveredTarget>> {
    let deadline = Instant::now() + cfg.login_timeout;
    let stream = connect(&cfg.portal, cfg.login_timeout)?;
    let isid = crate::session::new_isid();
    let (mut c, _) = login(stream, cfg, SessionType::Discovery, isid, deadline)?;
    let mut out = Vec::new();
    text::push(&mut out, "SendTargets", "All");
    let itt = 1u32;
    let mut ttt = pdu::RESERVED_TAG;
    let mut all = Vec::new();
    loop {
        let mut bhs = [0u8; BHS_LEN];
        pdu::text_request(
            &mut bhs,
            itt,
            ttt,
            c.cmd_sn,
            c.exp_stat_sn,
            out.len() as u32,
        );
        c.send(&bhs, &out)?;
        let (h, d) = c.recv()?;
        let TargetPdu::TextResponse(r) = h.pdu else {
            return Err(Error::Protocol(format!(
                "expected a Text Response, got {:?}",
                h.pdu
            )));
        };
        if r.itt != itt {
            return Err(Error::Protocol("Text Response for another task".into()));
        }
        c.note_sn(r.sn);
        if all.len() + d.len() > text::MAX_TEXT {
            return Err(text::TextError::TooLarge.into());
        }
        all.extend_from_slice(&d);
        if r.fin {
            break;
        }
        ttt = r.ttt;
        out.clear();
    }
    let mut targets: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in text::parse(&all)? {
        match k.as_str() {
            "TargetName" => targets.push(DiscoveredTarget {
                name: v,
                addresses: Vec::new(),
            }),
            "TargetAddress" => {
                if let Some(t) = targets.last_mut() {
                    t.addresses.push(v);
                }
            }
            _ => {}
        }
    }
    let _ = logout(&mut c);
    Ok(targets)
}

/// Logs out of the session on a blocking connection.
pub fn logout(c: &mut LoginConn) -> Result<()> {
    let mut bhs = [0u8; BHS_LEN];
    let itt = 0x4c4f_4754; // "LOGT"
    pdu::logout_request(&mut bhs, itt, 0, c.cmd_sn, c.exp_stat_sn);
    c.send(&bhs, &[])?;
    let (h, _) = c.recv()?;
    match h.pdu {
        TargetPdu::LogoutResponse(r) if r.itt == itt && r.response == 0 => Ok(()),
        other => Err(Error::Protocol(format!(
            "unexpected answer to Logout: {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: impl AsRef<[u8]>) -> String {
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn md5_rfc1321_test_suite() {
        let cases: [(&str, &str); 7] = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(Md5::digest(input.as_bytes())), want, "md5({input:?})");
        }
    }

    #[test]
    fn chap_response_known_answer() {
        // MD5(0x07 || "tgt-secret-12" || challenge), computed independently.
        let challenge = [
            0x0a, 0xff, 0x3c, 0x5e, 0x9b, 0x1d, 0x2e, 0x4f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5,
            0xc6, 0xd7,
        ];
        assert_eq!(
            hex(chap_response(7, b"tgt-secret-12", &challenge)),
            "84551db7337c362839b325173db886a1"
        );
    }
}
