//! Text key=value pairs (RFC 7143 section 6) and the operational parameters negotiated at login
//! (section 13).
//!
//! Keys and values a target sends are untrusted: [`parse`] bounds their number and size,
//! requires UTF-8, and [`Params::apply`] checks each value against the rules of its key.

use std::fmt::Write as _;

/// Most bytes of text we accept in one login or text exchange (all continuation PDUs together).
pub const MAX_TEXT: usize = 64 * 1024;
/// Most key=value pairs we accept in one exchange.
pub const MAX_PAIRS: usize = 512;

/// A text segment that breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Not `key=value`.
    #[error("malformed text pair {0:?}")]
    Malformed(String),
    /// Too much text.
    #[error("text exchange too large")]
    TooLarge,
    /// A value out of its key's range.
    #[error("target answered {key}={value}: {why}")]
    BadValue {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// Splits a text data segment into pairs. Empty segments (padding NULs) are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    if data.len() > MAX_TEXT {
        return Err(TextError::TooLarge);
    }
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        if out.len() >= MAX_PAIRS {
            return Err(TextError::TooLarge);
        }
        let s = std::str::from_utf8(item)
            .map_err(|_| TextError::Malformed(String::from_utf8_lossy(item).into_owned()))?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| TextError::Malformed(s.to_owned()))?;
        if k.is_empty() || k.len() > 63 {
            return Err(TextError::Malformed(s.to_owned()));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// What we offer for the operational keys (our side of the negotiation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Offer CRC32C header digests (preferred, with None as fallback).
    pub header_digest: bool,
    /// Offer CRC32C data digests (preferred, with None as fallback).
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength (declarative).
    pub max_recv_data_segment: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 256 * 1024,
            max_burst: 1024 * 1024,
            first_burst: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 8,
        }
    }
}

/// The negotiated result, in force for the full-feature phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// DataDigest=CRC32C.
    pub data_digest: bool,
    /// Largest data segment the target accepts from us (its declaration; 8192 by default).
    pub max_xmit_data_segment: u32,
    /// Largest data segment we accept (our declaration).
    pub max_recv_data_segment: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
}

impl Params {
    /// The RFC defaults, with our declared receive size, before the target answers.
    pub fn defaults(offer: &Offer) -> Params {
        Params {
            header_digest: false,
            data_digest: false,
            max_xmit_data_segment: 8192,
            max_recv_data_segment: offer.max_recv_data_segment,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
        }
    }

    /// The keys we send in the operational stage.
    pub fn offer_text(offer: &Offer, out: &mut Vec<u8>) {
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" };
        push(out, "HeaderDigest", digest(offer.header_digest));
        push(out, "DataDigest", digest(offer.data_digest));
        push(out, "MaxConnections", "1");
        push(out, "InitialR2T", yes_no(offer.initial_r2t));
        push(out, "ImmediateData", yes_no(offer.immediate_data));
        let mut n = String::new();
        let _ = write!(n, "{}", offer.max_recv_data_segment);
        push(out, "MaxRecvDataSegmentLength", &n);
        push(out, "MaxBurstLength", &offer.max_burst.to_string());
        push(out, "FirstBurstLength", &offer.first_burst.to_string());
        push(out, "DefaultTime2Wait", "0");
        push(out, "DefaultTime2Retain", "0");
        push(
            out,
            "MaxOutstandingR2T",
            &offer.max_outstanding_r2t.to_string(),
        );
        push(out, "DataPDUInOrder", "Yes");
        push(out, "DataSequenceInOrder", "Yes");
        push(out, "ErrorRecoveryLevel", "0");
    }

    /// Applies one pair the target sent during the operational stage. Returns a pair to send
    /// back when the target proposed a key we did not offer (RFC 7143 section 5.3).
    pub fn apply(
        &mut self,
        offer: &Offer,
        key: &str,
        value: &str,
    ) -> Result<Option<(String, String)>, TextError> {
        let bad = |why| TextError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            why,
        };
        let num = |lo: u32, hi: u32| -> Result<u32, TextError> {
            let v: u32 = value.parse().map_err(|_| bad("not a number"))?;
            if v < lo || v > hi {
                return Err(bad("out of range"));
            }
            Ok(v)
        };
        if value == "Irrelevant" || value == "Reject" && !is_required(key) {
            // Not in force for this session type, or declined: the defaults stay.
            return Ok(None);
        }
        let boolean = || match value {
            "Yes" => Ok(true),
            "No" => Ok(false),
            _ => Err(bad("not Yes or No")),
        };
        match key {
            "HeaderDigest" | "DataDigest" => {
                let offered = if key == "HeaderDigest" {
                    offer.header_digest
                } else {
                    offer.data_digest
                };
                let on = match value {
                    "CRC32C" if offered => true,
                    "None" => false,
                    _ => return Err(bad("not one of the digests we offered")),
                };
                if key == "HeaderDigest" {
                    self.header_digest = on;
                } else {
                    self.data_digest = on;
                }
            }
            "MaxRecvDataSegmentLength" => {
                self.max_xmit_data_segment = num(512, crate::pdu::MAX_DATA_SEGMENT)?;
            }
            "MaxBurstLength" => {
                let v = num(512, crate::pdu::MAX_DATA_SEGMENT)?;
                if v > offer.max_burst {
                    return Err(bad("larger than offered (the result must be the minimum)"));
                }
                self.max_burst = v;
            }
            "FirstBurstLength" => {
                let v = num(512, crate::pdu::MAX_DATA_SEGMENT)?;
                if v > offer.first_burst {
                    return Err(bad("larger than offered (the result must be the minimum)"));
                }
                self.first_burst = v;
            }
            "MaxOutstandingR2T" => {
                let v = num(1, 65535)?;
                if v > offer.max_outstanding_r2t {
                    return Err(bad("larger than offered (the result must be the minimum)"));
                }
                self.max_outstanding_r2t = v;
            }
            "ImmediateData" => {
                let v = boolean()?;
                if v && !offer.immediate_data {
                    return Err(bad("Yes although we offered No (the result is an AND)"));
                }
                self.immediate_data = v;
            }
            "InitialR2T" => {
                let v = boolean()?;
                if !v && offer.initial_r2t {
                    return Err(bad("No although we offered Yes (the result is an OR)"));
                }
                self.initial_r2t = v;
            }
            "ErrorRecoveryLevel" => {
                if num(0, 2)? != 0 {
                    return Err(bad("we offered 0 (the result must be the minimum)"));
                }
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                if !boolean()? {
                    return Err(bad("we need in-order data"));
                }
            }
            "MaxConnections" => {
                num(1, 1)?;
            }
            "DefaultTime2Wait" | "DefaultTime2Retain" => {
                num(0, 3600)?;
            }
            // Declarations and answers that need nothing from us.
            "TargetAlias"
            | "TargetPortalGroupTag"
            | "TargetAddress"
            | "IFMarker"
            | "OFMarker"
            | "OFMarkInt"
            | "IFMarkInt" => {}
            _ => return Ok(Some((key.to_owned(), "NotUnderstood".to_owned()))),
        }
        if self.first_burst > self.max_burst {
            self.first_burst = self.max_burst;
        }
        Ok(None)
    }
}

fn is_required(key: &str) -> bool {
    matches!(key, "HeaderDigest" | "DataDigest" | "ErrorRecoveryLevel")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Decodes a CHAP binary value (`0x` hex or `0b` base64, RFC 7143 section 5.1); `None` for
/// anything else, for a digit outside the alphabet or for more than 1 KiB of data. An odd number
/// of hex digits has an implied leading zero; base64 padding may be present or not.
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 2048 {
            return None;
        }
        if h.len() % 2 == 1 {
            hex::decode(format!("0{h}")).ok()
        } else {
            hex::decode(h).ok()
        }
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        if b.is_empty() || b.len() > 4096 {
            return None;
        }
        BASE64.decode(b).ok()
    } else {
        None
    }
}

/// Encodes bytes as a `0x` hex value.
pub fn encode_hex(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_push() {
        let mut b = Vec::new();
        push(&mut b, "A", "1");
        push(&mut b, "TargetName", "iqn.x:y");
        b.extend_from_slice(&[0, 0]);
        let p = parse(&b).unwrap();
        assert_eq!(
            p,
            vec![
                ("A".into(), "1".into()),
                ("TargetName".into(), "iqn.x:y".into())
            ]
        );
        assert!(parse(b"novalue\0").is_err());
        assert!(parse(&[0xff, b'=', b'1', 0]).is_err());
    }

    #[test]
    fn negotiation_rules() {
        let offer = Offer::default();
        let mut p = Params::defaults(&offer);
        p.apply(&offer, "MaxBurstLength", "262144").unwrap();
        p.apply(&offer, "FirstBurstLength", "65536").unwrap();
        p.apply(&offer, "InitialR2T", "Yes").unwrap();
        p.apply(&offer, "ImmediateData", "Yes").unwrap();
        p.apply(&offer, "MaxRecvDataSegmentLength", "8192").unwrap();
        assert_eq!(p.max_burst, 262144);
        assert!(p.initial_r2t);
        assert_eq!(p.max_xmit_data_segment, 8192);
        assert!(p.apply(&offer, "MaxBurstLength", "99999999").is_err());
        assert!(p.apply(&offer, "HeaderDigest", "CRC32C").is_err());
        assert!(p.apply(&offer, "MaxRecvDataSegmentLength", "0").is_err());
        assert!(p.apply(&offer, "MaxRecvDataSegmentLength", "x").is_err());
        assert_eq!(
            p.apply(&offer, "X-vendor", "1").unwrap(),
            Some(("X-vendor".into(), "NotUnderstood".into()))
        );
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0xaff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("12"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("0x+a+b"), None);
        assert_eq!(decode_binary("0bAQIDBA=="), Some(vec![1, 2, 3, 4]));
        assert_eq!(decode_binary("0bAQIDBA"), Some(vec![1, 2, 3, 4]));
        assert_eq!(decode_binary("0bAQ==garbage"), None);
        assert_eq!(decode_binary("0b"), None);
        assert_eq!(encode_hex(&[1, 0xab]), "0x01ab");
    }
}
