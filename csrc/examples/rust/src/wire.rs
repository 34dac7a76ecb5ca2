//! The wire records of `<dev/dmover/dmover_io.h>`, in their C layout.
//!
//! The C compiler pads `dmio_buffer` and `dmio_usrreq` to their pointers'
//! alignment; here the padding is a field, so a record has no uninitialised
//! bytes and can be written as bytes.

use std::os::raw::{c_int, c_uint, c_void};

/// `struct iovec`: one segment of a scatter/gather list.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Iovec {
    pub iov_base: *mut c_void,
    pub iov_len: usize,
}

/// `dmio_buffer`: a scatter/gather list (`dmbuf_iovcnt` 0: no buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DmioBuffer {
    pub dmbuf_iov: *const Iovec,
    pub dmbuf_iovcnt: c_uint,
    pub pad: [u8; 4],
}

/// `struct dmio_usrreq`: one request, as written to a session.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DmioUsrreq {
    pub req_outbuf: DmioBuffer,
    /// Immediate input, least significant byte first.
    pub req_immediate: [u8; 8],
    /// One `DmioBuffer` per input of the function.
    pub req_inbuf: *const DmioBuffer,
    pub req_id: u32,
    pub pad: [u8; 4],
}

/// `struct dmio_usrresp`: one response, as read from a session.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmioUsrresp {
    pub resp_id: u32,
    /// 0 or an errno value.
    pub resp_error: c_int,
    pub resp_immediate: [u8; 8],
}

pub const IOVEC_SIZE: usize = std::mem::size_of::<Iovec>();
pub const BUFFER_SIZE: usize = std::mem::size_of::<DmioBuffer>();
pub const REQ_SIZE: usize = std::mem::size_of::<DmioUsrreq>();
pub const RESP_SIZE: usize = std::mem::size_of::<DmioUsrresp>();
/// `DMIO_MAX_FUNCNAME`, the terminating NUL included.
pub const MAX_FUNCNAME: usize = 64;
/// `DMIO_NREQS_MAX`, the default queue depth.
pub const NREQS_MAX: usize = 64;
pub const XATTR_FUNCTION: &str = "user.dmover.function";
pub const XATTR_NONBLOCK: &str = "user.dmover.nonblock";

// The compiler checks the sizes against the header's.
const _: () = assert!(IOVEC_SIZE == 16 && BUFFER_SIZE == 16 && REQ_SIZE == 40 && RESP_SIZE == 16);

/// The bytes of records without padding holes (all of this module's).
pub fn as_bytes<T: Copy>(records: &[T]) -> &[u8] {
    // SAFETY: the records are plain data with every byte initialised.
    unsafe { std::slice::from_raw_parts(records.as_ptr() as *const u8, std::mem::size_of_val(records)) }
}

/// Responses as bytes to read into (any bytes are valid responses).
pub fn responses_as_bytes_mut(records: &mut [DmioUsrresp]) -> &mut [u8] {
    // SAFETY: DmioUsrresp is plain integers, without padding.
    unsafe { std::slice::from_raw_parts_mut(records.as_mut_ptr() as *mut u8, std::mem::size_of_val(records)) }
}
