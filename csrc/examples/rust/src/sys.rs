//! The C library calls std lacks, declared by hand (no crates).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::raw::{c_char, c_int, c_ulong, c_void};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

extern "C" {
    fn fsetxattr(fd: c_int, name: *const c_char, value: *const c_void, size: usize, flags: c_int) -> c_int;
    fn fgetxattr(fd: c_int, name: *const c_char, value: *mut c_void, size: usize) -> isize;
    fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
}

/// `O_NONBLOCK` on Linux.
pub const O_NONBLOCK: i32 = 0o4000;

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Makes a C library call until it is not interrupted; a negative result is
/// an error, taken from errno.
fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sets an extended attribute of an open file.
pub fn set_xattr(file: &File, name: &str, value: &[u8]) -> io::Result<()> {
    let name = c_name(name)?;
    let (fd, data) = (file.as_raw_fd(), value.as_ptr() as *const c_void);
    // SAFETY: name is NUL-terminated and value valid for its length.
    retry(|| unsafe { fsetxattr(fd, name.as_ptr(), data, value.len(), 0) } as isize).map(|_| ())
}

/// Reads an extended attribute of an open file (up to 256 bytes).
pub fn get_xattr(file: &File, name: &str) -> io::Result<Vec<u8>> {
    let name = c_name(name)?;
    let mut value = vec![0u8; 256];
    let (fd, data, size) = (file.as_raw_fd(), value.as_mut_ptr() as *mut c_void, value.len());
    // SAFETY: name is NUL-terminated and value writable for its length.
    let n = retry(|| unsafe { fgetxattr(fd, name.as_ptr(), data, size) })?;
    value.truncate(n);
    Ok(value)
}

/// Waits for events on a file, up to timeout (None: no limit); returns the
/// events that happened, 0 if the time ran out.
pub fn wait(file: &File, events: i16, timeout: Option<Duration>) -> io::Result<i16> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut fd = PollFd {
        fd: file.as_raw_fd(),
        events,
        revents: 0,
    };
    retry(|| {
        // Recomputed on each try, rounded up so that a wait never ends before its deadline.
        let ms = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0);
            ms.min(c_int::MAX as u128) as c_int
        });
        // SAFETY: one valid pollfd.
        unsafe { poll(&mut fd, 1, ms) as isize }
    })?;
    Ok(fd.revents)
}
