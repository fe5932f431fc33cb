//! `vhd-util read`: the header summaries as blktap prints them (sm parses "Disk type" and
//! "decoded name"), the allocation bitmap, and data read through the chain.

use std::io::Write;

use anyhow::{bail, Context, Result};
use vhd::format::{checksum, time_string, DiskType, FEATURE_RESERVED, FEATURE_TEMPORARY};
use vhd::{Chain, ChainOptions, Image, ParentSet};

use crate::cli::ReadArgs;

/// A number as blktap's `conv`: decimal, or C's `%#x` with -x.
fn conv(hex: bool, n: u64) -> String {
    match (hex, n) {
        (true, 0) => "0".into(),
        (true, n) => format!("{n:#x}"),
        (false, n) => n.to_string(),
    }
}

pub fn read(a: ReadArgs) -> Result<()> {
    let mut img = crate::open_ro(&a.name)?;
    let mut out = std::io::stdout().lock();
    let hex = a.hex;
    if a.headers {
        write!(out, "{}", headers(&img, hex))?;
    }
    if let Some(sec) = a.translate {
        if img.disk_type() == DiskType::Fixed {
            bail!("-t needs a dynamic disk");
        }
        let spb = img.block_size() / 512;
        for cur in sec..sec.saturating_add(a.count) {
            if (cur + 1) * 512 > img.size() {
                bail!("sector {cur} past end of file");
            }
            let (blk, lsec) = (cur / spb, cur % spb);
            let off = match img.block_sector(blk as u32)? {
                Some(s) => conv(hex, (s as u64 + lsec + 1) * 512),
                None => "not allocated".into(),
            };
            writeln!(
                out,
                "logical sector {}: block number: {}, sector offset: {}, file offset: {off}",
                conv(hex, cur),
                conv(hex, blk),
                conv(hex, lsec)
            )?;
        }
    }
    if let Some(b) = a.bat {
        for cur in b..b.saturating_add(a.count).min(img.block_count() as u64) {
            let off = match img.block_sector(cur as u32)? {
                Some(s) => conv(hex, s as u64 * 512),
                None => "not allocated".into(),
            };
            writeln!(out, "block: {}: offset: {off}", conv(hex, cur))?;
        }
    }
    if a.bat_bitmap {
        if img.disk_type() == DiskType::Fixed {
            bail!("-B needs a dynamic disk");
        }
        // One bit per whole block of the virtual size, most significant bit first.
        let total = (img.size() / img.block_size()) as usize;
        let mut map = vec![0u8; total.div_ceil(8)];
        for b in 0..total {
            if img.block_sector(b as u32)?.is_some() {
                vhd::format::set_bit(&mut map, b);
            }
        }
        out.write_all(&map)?;
    }
    if a.read.is_some() || a.read_bytes.is_some() {
        let (off, len) = match (a.read, a.read_bytes) {
            (Some(s), _) => (s.checked_mul(512), a.count.checked_mul(512)),
            (None, Some(b)) => (Some(b), Some(a.count)),
            _ => unreachable!(),
        };
        let (Some(off), Some(len)) = (off, len) else {
            bail!("range too large");
        };
        drop(img);
        let set = ParentSet::new();
        let o = ChainOptions {
            read_only: true,
            ..Default::default()
        };
        let mut c = Chain::open(&a.name, &o, &set)?;
        if off.checked_add(len).is_none_or(|e| e > c.size()) {
            bail!("{len} bytes at {off} lie beyond the {}-byte disk", c.size());
        }
        let mut buf = vec![0u8; len.min(4 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            c.read_at(off + done, &mut buf[..n])?;
            out.write_all(&buf[..n]).context("writing to stdout")?;
            done += n as u64;
        }
    }
    Ok(())
}

fn headers(img: &Image, hex: bool) -> String {
    let f = img.footer();
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<20}: {v}\n"));
    let raw = f.encode();
    let sum = checksum(&raw, 64);
    let stored = u32::from_be_bytes([raw[64], raw[65], raw[66], raw[67]]);
    let creator: String = f
        .creator_app
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let g = f.geometry as u64;
    let (c, h, sp) = (g >> 16, (g >> 8) & 0xff, g & 0xff);
    line("Cookie", "conectix".into());
    line(
        "Features",
        format!(
            "({:#010x}) {}{}",
            f.features,
            if f.features & FEATURE_TEMPORARY != 0 {
                "<TEMP>"
            } else {
                ""
            },
            if f.features & FEATURE_RESERVED != 0 {
                "<RESV>"
            } else {
                ""
            }
        ),
    );
    line("File format version", "Major: 1, Minor: 0".into());
    line("Data offset", conv(hex, f.data_offset));
    line("Timestamp", time_string(f.timestamp));
    line("Creator Application", format!("'{creator}'"));
    line(
        "Creator version",
        format!(
            "Major: {}, Minor: {}",
            f.creator_version >> 16,
            f.creator_version & 0xffff
        ),
    );
    line(
        "Creator OS",
        match f.creator_os {
            0x5769_326b => "Windows",
            0x4d61_6320 => "Macintosh",
            _ => "Unknown!",
        }
        .into(),
    );
    line(
        "Original disk size",
        format!(
            "{} MB ({} Bytes)",
            conv(hex, f.original_size >> 20),
            conv(hex, f.original_size)
        ),
    );
    line(
        "Current disk size",
        format!(
            "{} MB ({} Bytes)",
            conv(hex, f.current_size >> 20),
            conv(hex, f.current_size)
        ),
    );
    line(
        "Geometry",
        format!(
            "Cyl: {}, Hds: {}, Sctrs: {}",
            conv(hex, c),
            conv(hex, h),
            conv(hex, sp)
        ),
    );
    line(
        "",
        format!(
            "= {} MB ({} Bytes)",
            conv(hex, (c * h * sp) >> 11),
            conv(hex, (c * h * sp) << 9)
        ),
    );
    line("Disk type", f.disk_type.describe().into());
    line(
        "Checksum",
        format!(
            "{stored:#x}|{sum:#x} ({})",
            if stored == sum { "Good!" } else { "Bad!" }
        ),
    );
    line("UUID", f.uuid.to_string());
    line(
        "Saved state",
        if f.saved_state == 0 { "No" } else { "Yes" }.into(),
    );
    line("Hidden", f.hidden.to_string());
    let footer = std::mem::take(&mut s);
    let mut text = format!("VHD Footer Summary:\n-------------------\n{footer}\n");
    let Some(hd) = img.header() else {
        return text;
    };
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<20}: {v}\n"));
    let raw = hd.encode();
    let sum = checksum(&raw, 36);
    line("Cookie", "cxsparse".into());
    line("Data offset (unusd)", conv(hex, u64::MAX));
    line("Table offset", conv(hex, hd.table_offset));
    line("Header version", "0x00010000".into());
    line("Max BAT size", conv(hex, hd.max_table_entries as u64));
    line(
        "Block size",
        format!(
            "{} ({} MB)",
            conv(hex, hd.block_size as u64),
            conv(hex, (hd.block_size >> 20) as u64)
        ),
    );
    line("Parent name", hd.parent_name());
    line("Parent UUID", hd.parent_uuid.to_string());
    line("Parent timestamp", time_string(hd.parent_timestamp));
    line("Checksum", format!("{sum:#x}|{sum:#x} (Good!)"));
    text += &format!("VHD Header Summary:\n-------------------\n{s}\n");
    if f.disk_type == DiskType::Differencing {
        text += "VHD Parent Locators:\n--------------------\n";
        for (i, l, name) in img.locators() {
            text += &format!("locator:            : {i}\n");
            text += &format!("       code         : {}\n", l.code.name());
            text += &format!("       data_space   : {}\n", conv(hex, l.data_space as u64));
            text += &format!("       data_length  : {}\n", conv(hex, l.data_len as u64));
            text += &format!("       data_offset  : {}\n", conv(hex, l.data_offset));
            match name {
                Some(n) => text += &format!("       decoded name : {n}\n"),
                None => text += "failed to read parent name\n",
            }
            text += "\n";
        }
    }
    if let (Some(bh), Some((stored, sum))) = (img.batmap_header(), img.batmap_checksums()) {
        text += "VHD Batmap Summary:\n-------------------\n";
        text += &format!("{:<20}: {}\n", "Batmap offset", conv(hex, bh.offset));
        text += &format!(
            "{:<20}: {}\n",
            "Batmap size (secs)",
            conv(hex, bh.size_sectors as u64)
        );
        text += &format!("{:<20}: {:#010x}\n", "Batmap version", bh.version);
        text += &format!(
            "{:<20}: {stored:#x}|{sum:#x} ({})\n\n",
            "Checksum",
            if stored == sum { "Good!" } else { "Bad!" }
        );
    }
    text
}
