//! Errors that say what was done, on which path, the errno, and what it means here.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::session::Request;

/// Linux errno values this crate names.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const ESRCH: i32 = 3;
    pub const ENXIO: i32 = 6;
    pub const EAGAIN: i32 = 11;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const ENOTDIR: i32 = 20;
    pub const EINVAL: i32 = 22;
    pub const ENOTSUP: i32 = 95;
}

/// A failed operation on a session.
#[derive(Debug)]
pub struct Error {
    /// What was done, e.g. `select function "xor3" (fsetxattr user.dmover.function)`.
    pub op: String,
    pub path: PathBuf,
    pub source: io::Error,
}

impl Error {
    pub(crate) fn new(op: impl Into<String>, path: &std::path::Path, source: io::Error) -> Error {
        Error {
            op: op.into(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// The errno, if the failure was one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// What the errno means for a dmoverfs session.
    fn hint(&self) -> &'static str {
        match self.errno() {
            Some(errno::ENOENT) | Some(errno::ENOTDIR) => "is dmoverfs mounted there? dmoverfs mount DIR",
            Some(errno::ESRCH) => "the mount has no such function; ls MOUNTPOINT/func lists them",
            Some(errno::EBUSY) => "the session's function is already set",
            Some(errno::ENOTSUP) | Some(errno::EPERM) if self.op != "open" => "not a dmoverfs session",
            Some(errno::ENXIO) => "the session has no function, or the server is shutting down",
            Some(errno::EAGAIN) => "non-blocking session: nothing ready, or the queue is full",
            Some(errno::EFAULT) => "a request names memory this process has not mapped",
            _ => "",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}: {}", self.op, self.path.display(), self.source)?;
        match self.hint() {
            "" => Ok(()),
            hint => write!(f, " ({})", hint),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A batch that was not wholly submitted: the requests from `index` on were
/// not (the server refused that one, or a non-blocking session's queue was
/// full: `error.errno() == Some(EAGAIN)`). `accepted` are the ids of those
/// before it, outstanding as usual; `unsent` gives the others back.
#[derive(Debug)]
pub struct SubmitError {
    pub index: usize,
    pub accepted: Vec<u32>,
    pub unsent: Vec<Request>,
    pub error: Error,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {} of the batch: {}", self.index, self.error)
    }
}

impl std::error::Error for SubmitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}
