//! Which image a VBD serves ([`ImageSpec`]: a driver and where its image is) and how the
//! image is opened ([`DirectIo`]).
//!
//! On the command line and in xenstore a spec is one string, `TYPE:PATH` (blktap's form), e.g.
//! `aio:/var/lib/disk.img`, `vhd:/var/lib/vm1.vhd`, `qcow2:/var/lib/vm1.qcow2` or
//! `parallax:/var/lib/vm1.plx@before-upgrade`; in the control protocol it travels as its parts.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which image driver serves a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A raw file or block device.
    Aio,
    /// A volume of a Parallax image.
    Parallax,
    /// A VHD image (fixed, dynamic or differencing) and its parents.
    Vhd,
    /// A disk striped over iSCSI servers, described by a mapping file.
    Stripe,
    /// A qcow2 image (QEMU's format), with its backing files.
    Qcow2,
}

impl Driver {
    /// Every driver, in the order help texts list them.
    pub const ALL: [Driver; 5] = [
        Driver::Aio,
        Driver::Parallax,
        Driver::Vhd,
        Driver::Qcow2,
        Driver::Stripe,
    ];

    /// The name in a disk spec.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Aio => "aio",
            Driver::Parallax => "parallax",
            Driver::Vhd => "vhd",
            Driver::Stripe => "stripe",
            Driver::Qcow2 => "qcow2",
        }
    }
}

/// A disk: the driver and what it opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// The driver.
    pub driver: Driver,
    /// The image file or device (for `stripe:`, the mapping file).
    pub path: PathBuf,
    /// The volume of a Parallax image (`None`: its first disk). Only `parallax:` has volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

impl ImageSpec {
    /// A spec with no volume.
    pub fn new(driver: Driver, path: impl Into<PathBuf>) -> ImageSpec {
        ImageSpec {
            driver,
            path: path.into(),
            volume: None,
        }
    }

    /// Checks what a spec can be checked for without opening it: a path, and a volume only
    /// where the driver has volumes. The driver checks the rest when it opens the image.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(Error::invalid(
                "image",
                format!("disk spec '{self}' has an empty path"),
            ));
        }
        match (&self.volume, self.driver) {
            (None, _) => Ok(()),
            (Some(v), Driver::Parallax) if !v.is_empty() && !v.contains('/') => Ok(()),
            (Some(v), Driver::Parallax) => Err(Error::invalid(
                "image",
                format!("disk spec '{self}': volume name '{v}' is empty or holds a '/'"),
            )),
            (Some(_), d) => Err(Error::invalid(
                "image",
                format!("disk spec '{self}': {} images have no volumes", d.name()),
            )),
        }
    }
}

impl FromStr for ImageSpec {
    type Err = Error;
    /// `TYPE:PATH`; for `parallax:`, `PATH@VOLUME` names a volume (the part after the last
    /// `@`, unless it holds a `/`: then the `@` is part of the path).
    fn from_str(s: &str) -> Result<Self> {
        let (ty, path) = s.split_once(':').ok_or_else(|| {
            Error::invalid(
                "image",
                format!("disk spec '{s}' has no type: write it as TYPE:PATH, e.g. aio:{s}"),
            )
        })?;
        let driver = Driver::ALL
            .into_iter()
            .find(|d| d.name() == ty)
            .ok_or_else(|| {
                let known: Vec<&str> = Driver::ALL.iter().map(|d| d.name()).collect();
                Error::invalid(
                    "image",
                    format!(
                        "unknown disk type '{ty}' in '{s}' (known: {})",
                        known.join(", ")
                    ),
                )
            })?;
        let (path, volume) = match path.rsplit_once('@') {
            Some((p, v)) if driver == Driver::Parallax && !v.contains('/') => {
                if p.is_empty() {
                    return Err(Error::invalid(
                        "image",
                        format!("disk spec '{s}' has no image path before '@'"),
                    ));
                }
                (p, Some(v.to_owned()))
            }
            _ => (path, None),
        };
        let spec = ImageSpec {
            driver,
            path: PathBuf::from(path),
            volume,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.driver.name(), self.path.display())?;
        match &self.volume {
            Some(v) => write!(f, "@{v}"),
            None => Ok(()),
        }
    }
}

/// Whether an image is opened with O_DIRECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// O_DIRECT where the file system takes it, buffered otherwise; the sequential read
    /// streams of image files (raw, VHD, qcow2, Parallax) go through the page cache (its
    /// readahead), as a loop device's reads do.
    #[default]
    Auto,
    /// O_DIRECT or fail to open; every aligned IO direct.
    On,
    /// Page cache.
    Off,
}

impl FromStr for DirectIo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DirectIo::Auto),
            "on" => Ok(DirectIo::On),
            "off" => Ok(DirectIo::Off),
            _ => Err(Error::invalid(
                "direct",
                format!("direct IO mode '{s}' is not one of auto, on, off"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_refuse() {
        let s: ImageSpec = "aio:/tmp/x.img".parse().unwrap();
        assert_eq!(s, ImageSpec::new(Driver::Aio, "/tmp/x.img"));
        assert_eq!(s.to_string(), "aio:/tmp/x.img");
        let p: ImageSpec = "parallax:/var/vm.plx@snap-1".parse().unwrap();
        assert_eq!(
            (p.driver, p.path.to_str(), p.volume.as_deref()),
            (Driver::Parallax, Some("/var/vm.plx"), Some("snap-1"))
        );
        assert_eq!(p.to_string(), "parallax:/var/vm.plx@snap-1");
        // An '@' followed by a '/' belongs to the path; only parallax: has volumes.
        let p: ImageSpec = "parallax:/data/vm@1/disk.plx".parse().unwrap();
        assert_eq!(p.volume, None);
        let a: ImageSpec = "aio:/data/x@y".parse().unwrap();
        let q: ImageSpec = "qcow2:/vm/leaf@1.qcow2".parse().unwrap();
        assert_eq!(
            (q.driver, q.path.to_str(), q.volume.as_deref()),
            (Driver::Qcow2, Some("/vm/leaf@1.qcow2"), None)
        );
        assert_eq!(q.to_string(), "qcow2:/vm/leaf@1.qcow2");
        assert_eq!((a.path.to_str(), a.volume), (Some("/data/x@y"), None));
        let err = |s: &str| s.parse::<ImageSpec>().unwrap_err().to_string();
        assert!(err("/tmp/x.img").contains("has no type"));
        assert!(err("qcow:/x").contains("unknown disk type 'qcow'"));
        let v: ImageSpec = "vhd:/srv/vm@1.vhd".parse().unwrap();
        assert_eq!(v, ImageSpec::new(Driver::Vhd, "/srv/vm@1.vhd"));
        assert_eq!(v.to_string(), "vhd:/srv/vm@1.vhd");
        assert!(err("aio:").contains("empty path"));
        assert!(err("parallax:@snap").contains("no image path before '@'"));
        assert!(err("parallax:/x.plx@").contains("volume name"));
        let mut bad = ImageSpec::new(Driver::Aio, "/x");
        bad.volume = Some("v".into());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no volumes"));
    }

    #[test]
    fn specs_travel_structured() {
        let p: ImageSpec = "parallax:/vm.plx@snap".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"driver":"parallax","path":"/vm.plx","volume":"snap"}"#
        );
        assert_eq!(
            serde_json::to_string(&ImageSpec::new(Driver::Aio, "/x")).unwrap(),
            r#"{"driver":"aio","path":"/x"}"#
        );
        assert_eq!(
            serde_json::to_string(&ImageSpec::new(Driver::Qcow2, "/x")).unwrap(),
            r#"{"driver":"qcow2","path":"/x"}"#
        );
    }
}
