//! Exit statuses as blktap3's tap-ctl gives them: the errno of what failed (2 for a file that
//! is not there, 16 for a minor in use, 22 for a bad command line, ...), so scripts written
//! for blktap3 (Xen's `block-tap`, xapi's storage manager, which retries `list` on 71 and 2)
//! read ours the same way. The message on stderr stays ours: one line naming what failed.

use nix::errno::Errno;
use tapdisk_control::Error as CtlError;

/// A failure with the errno tap-ctl exits with.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Failure {
    /// The exit status.
    pub errno: Errno,
    /// What went wrong, in words.
    pub msg: String,
}

/// A failure exiting with `errno`.
pub fn fail(errno: Errno, msg: impl Into<String>) -> anyhow::Error {
    Failure {
        errno,
        msg: msg.into(),
    }
    .into()
}

/// `msg` as a failure exiting with `code` (an exit status from [`exit_code`]): a message
/// reworded without losing its status.
pub fn with_code(code: i32, msg: impl Into<String>) -> anyhow::Error {
    if code == GENERIC {
        anyhow::anyhow!(msg.into())
    } else {
        fail(Errno::from_raw(code), msg)
    }
}

/// The exit status when nothing more specific is known.
pub const GENERIC: i32 = 1;

/// The errno a control-crate error stands for, if one fits.
pub fn errno_of(e: &CtlError) -> Option<Errno> {
    Some(match e {
        CtlError::OutOfRange { .. } | CtlError::Invalid { .. } => Errno::EINVAL,
        CtlError::Connect { cause, .. } | CtlError::Io { cause, .. } => {
            return cause.raw_os_error().map(Errno::from_raw)
        }
        CtlError::BadReply { .. } => Errno::EPROTO,
        CtlError::Closed { .. } => Errno::EPIPE,
        CtlError::Timeout { .. } => Errno::ETIMEDOUT,
        CtlError::MinorInUse { .. } => Errno::EBUSY,
        CtlError::TooBig { .. } => Errno::ENOMEM,
        CtlError::NotAllocated(_) | CtlError::NoSuchMinor(_) => Errno::ENOENT,
        CtlError::NoFreeMinor => Errno::ENOSPC,
        CtlError::Refused(_) | CtlError::Spawn(_) => return None,
    })
}

/// The exit status for `e`: the errno of the first cause that carries one.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.errno as i32;
        }
        if let Some(c) = cause.downcast_ref::<CtlError>() {
            if let Some(n) = errno_of(c) {
                return n as i32;
            }
        }
        if let Some(n) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return n;
        }
    }
    GENERIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_follow_the_cause() {
        assert_eq!(exit_code(&fail(Errno::ENOENT, "x")), 2);
        assert_eq!(
            exit_code(&anyhow::Error::from(CtlError::MinorInUse {
                minor: 1,
                owner: None
            })),
            16
        );
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(exit_code(&anyhow::Error::from(io).context("opening")), 13);
        assert_eq!(
            exit_code(
                &Err::<(), _>(CtlError::Refused("no".into()))
                    .context("x")
                    .unwrap_err()
            ),
            GENERIC
        );
        assert_eq!(exit_code(&anyhow::anyhow!("plain")), GENERIC);
    }
}
