//! How a differencing disk names its parent, as blktap writes it: the parent's file name in
//! the header (UTF-16BE), and three parent locators holding the path *relative to the child's
//! directory*: `MacX` as a `file://` URL in UTF-8, `W2ku` and `W2ru` as a Windows path
//! (`.\parent.vhd`) in UTF-16LE. Reading accepts absolute paths too.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::PlatformCode;

/// Decodes a locator's data into a Unix path; `None` when the code holds no path or the bytes
/// do not decode.
pub fn decode(code: PlatformCode, data: &[u8]) -> Option<String> {
    match code {
        PlatformCode::MacX => {
            let s = std::str::from_utf8(data).ok()?;
            let s = s.trim_end_matches('\0');
            s.strip_prefix("file://").map(str::to_string)
        }
        PlatformCode::W2ku | PlatformCode::W2ru => {
            if !data.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            let s = String::from_utf16(&units).ok()?.replace('\\', "/");
            let s = s
                .strip_prefix("C:")
                .or_else(|| s.strip_prefix("c:"))
                .unwrap_or(&s)
                .to_string();
            Some(s)
        }
        _ => None,
    }
}

/// Encodes `rel` (a relative path such as `./base.vhd` or `../x/base.vhd`) for `code`.
pub fn encode(code: PlatformCode, rel: &str) -> Vec<u8> {
    match code {
        PlatformCode::MacX => format!("file://{rel}").into_bytes(),
        _ => {
            let tail = rel.strip_prefix("./").unwrap_or(rel);
            let win = if rel.starts_with('/') {
                rel.replace('/', "\\")
            } else {
                format!(".\\{}", tail.replace('/', "\\"))
            };
            win.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
        }
    }
}

/// The path of `target` relative to the directory of `from` (both absolute, canonical):
/// `./name` in the same directory, else `../` as many times as needed.
pub fn relative_path(from: &Path, target: &Path) -> String {
    let dir: Vec<Component> = from
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    let to: Vec<Component> = target.components().collect();
    let common = dir
        .iter()
        .zip(to.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut s = String::new();
    let ups = dir.len() - common;
    if ups == 0 {
        s.push_str("./");
    } else {
        for _ in 0..ups {
            s.push_str("../");
        }
    }
    let rest: Vec<String> = to[common..]
        .iter()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    s.push_str(&rest.join("/"));
    s
}

/// Resolves a decoded locator path for the child at `child`: absolute paths as they are,
/// relative ones from the child's directory. `None` when nothing readable is there.
pub fn resolve(child: &Path, name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        if p.exists() {
            return Some(p.to_path_buf());
        }
        return None;
    }
    let dir = child.parent().unwrap_or(Path::new("."));
    let joined = dir.join(p);
    joined
        .canonicalize()
        .ok()
        .or_else(|| joined.exists().then_some(joined))
}

/// The canonical absolute path of an existing file.
pub fn canonical(p: &Path) -> Result<PathBuf> {
    p.canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", p.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_as_blktap_writes_them() {
        assert_eq!(
            relative_path(Path::new("/sr/a/child.vhd"), Path::new("/sr/a/base.vhd")),
            "./base.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/sr/a/child.vhd"), Path::new("/sr/b/base.vhd")),
            "../b/base.vhd"
        );
    }

    #[test]
    fn locators_round_trip() {
        for code in [PlatformCode::MacX, PlatformCode::W2ku, PlatformCode::W2ru] {
            let e = encode(code, "./base.vhd");
            assert_eq!(decode(code, &e).as_deref(), Some("./base.vhd"), "{code:?}");
            // blktap prefixes Windows paths with ".\\" even when they go up.
            let want = if code == PlatformCode::MacX {
                "../x/base.vhd"
            } else {
                "./../x/base.vhd"
            };
            let e = encode(code, "../x/base.vhd");
            assert_eq!(decode(code, &e).as_deref(), Some(want), "{code:?}");
        }
        assert_eq!(encode(PlatformCode::MacX, "./b.vhd"), b"file://./b.vhd");
        let w: Vec<u8> = ".\\b.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert_eq!(encode(PlatformCode::W2ku, "./b.vhd"), w);
    }
}
