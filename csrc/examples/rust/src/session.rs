//! Sessions: open one with a function, submit requests, read their results.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{errno, Error, SubmitError};
use crate::sys;
use crate::wire::{self, DmioBuffer, DmioUsrreq, DmioUsrresp, Iovec, REQ_SIZE};

/// poll(2) events: a result is ready.
pub const POLLIN: i16 = 0x1;
/// poll(2) events: there is room for a request.
pub const POLLOUT: i16 = 0x4;

/// A scatter/gather list: owned segments, one iovec each. Moving a `Vec`
/// moves its header only, never its bytes, so the addresses a request
/// carries stay valid however the request itself is moved.
#[derive(Debug, Default)]
pub struct Region {
    segments: Vec<Vec<u8>>,
}

impl Region {
    /// A region of one segment.
    pub fn new(bytes: Vec<u8>) -> Region {
        Region { segments: vec![bytes] }
    }

    /// A region cut into several segments.
    pub fn from_segments(segments: Vec<Vec<u8>>) -> Region {
        Region { segments }
    }

    /// The segments, in order.
    pub fn segments(&self) -> &[Vec<u8>] {
        &self.segments
    }

    /// The region's bytes, joined.
    pub fn to_vec(&self) -> Vec<u8> {
        self.segments.concat()
    }

    /// Gives the segments back.
    pub fn into_segments(self) -> Vec<Vec<u8>> {
        self.segments
    }

    fn iovecs(&mut self) -> Vec<Iovec> {
        self.segments
            .iter_mut()
            .map(|s| Iovec {
                iov_base: s.as_mut_ptr() as *mut _,
                iov_len: s.len(),
            })
            .collect()
    }
}

/// One request: the output region (None for a function without one, such as
/// iscsi-crc32c), one region per input, the immediate.
#[derive(Debug, Default)]
pub struct Request {
    pub out: Option<Region>,
    pub inputs: Vec<Region>,
    pub immediate: [u8; 8],
}

/// The immediate of a request from a little-endian integer: the fill8 byte,
/// or the iscsi-crc32c CRC so far.
pub fn immediate(value: u64) -> [u8; 8] {
    value.to_le_bytes()
}

/// One result, with its request's buffers given back.
#[derive(Debug)]
pub struct Completed {
    pub id: u32,
    /// 0 or the errno the request failed with.
    pub errno: i32,
    pub immediate: [u8; 8],
    pub request: Request,
}

impl Completed {
    /// The failure, if the request failed.
    pub fn error(&self) -> Option<io::Error> {
        (self.errno != 0).then(|| io::Error::from_raw_os_error(self.errno))
    }

    /// An iscsi-crc32c result: the immediate as a little-endian u32.
    pub fn crc(&self) -> u32 {
        u32::from_le_bytes([
            self.immediate[0],
            self.immediate[1],
            self.immediate[2],
            self.immediate[3],
        ])
    }
}

/// An open dmoverfs session. It owns the requests it has submitted until
/// their results are read; dropping it first reads them back (and, if the
/// server is gone, leaks their buffers rather than free memory the server
/// might still write).
pub struct Session {
    file: File,
    path: PathBuf,
    nonblocking: bool,
    next_id: u32,
    pending: HashMap<u32, Request>,
}

impl Session {
    /// Opens a session on the mount at `mountpoint` with `function` selected
    /// (through the `user.dmover.function` attribute: NetBSD's DMIO_SETFUNC).
    /// With `nonblocking`, the file is opened O_NONBLOCK, which dmoverfs
    /// honours for every read and write: `submit` and `results` then do what
    /// they can now and fail with EAGAIN otherwise.
    pub fn open(mountpoint: impl AsRef<Path>, function: &str, nonblocking: bool) -> Result<Session, Error> {
        let path = mountpoint.as_ref().join("dmoverio");
        let flags = if nonblocking { sys::O_NONBLOCK } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(&path)
            .map_err(|e| Error::new("open", &path, e))?;
        sys::set_xattr(&file, wire::XATTR_FUNCTION, function.as_bytes()).map_err(|e| {
            Error::new(
                format!("select function {:?} (fsetxattr {})", function, wire::XATTR_FUNCTION),
                &path,
                e,
            )
        })?;
        Ok(Session {
            file,
            path,
            nonblocking,
            next_id: 0,
            pending: HashMap::new(),
        })
    }

    /// The session's function, read back from its attribute.
    pub fn function(&self) -> Result<String, Error> {
        let value = sys::get_xattr(&self.file, wire::XATTR_FUNCTION)
            .map_err(|e| Error::new(format!("fgetxattr {}", wire::XATTR_FUNCTION), &self.path, e))?;
        Ok(String::from_utf8_lossy(&value).into_owned())
    }

    /// Requests submitted whose results have not been read.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Writes the requests in one write(2) (continuing short writes) and
    /// returns their ids. The session keeps each request, and so its buffers,
    /// until its result is read. A blocking session waits for room in its
    /// queue; see [`SubmitError`] for a batch not wholly submitted.
    pub fn submit(&mut self, requests: Vec<Request>) -> Result<Vec<u32>, SubmitError> {
        let mut requests = requests;
        let ids = self.new_ids(requests.len());
        // The iovec and dmio_buffer arrays the records point to; the server
        // copies them during the write, so they live until it returns.
        let mut iovecs: Vec<Vec<Iovec>> = Vec::new();
        let mut inbufs: Vec<Vec<DmioBuffer>> = Vec::new();
        let mut records = Vec::with_capacity(requests.len());
        for (request, &id) in requests.iter_mut().zip(&ids) {
            let req_outbuf = match request.out.as_mut() {
                Some(region) => dmio_buffer(region, &mut iovecs),
                None => DmioBuffer {
                    dmbuf_iov: std::ptr::null(),
                    dmbuf_iovcnt: 0,
                    pad: [0; 4],
                },
            };
            let inputs: Vec<DmioBuffer> = request.inputs.iter_mut().map(|r| dmio_buffer(r, &mut iovecs)).collect();
            let req_inbuf = if inputs.is_empty() {
                std::ptr::null()
            } else {
                inputs.as_ptr()
            };
            inbufs.push(inputs);
            records.push(DmioUsrreq {
                req_outbuf,
                req_immediate: request.immediate,
                req_inbuf,
                req_id: id,
                pad: [0; 4],
            });
        }
        let bytes = wire::as_bytes(&records);
        let mut unsent = requests.into_iter();
        let mut done = 0;
        while done < bytes.len() {
            let failure = match (&self.file).write(&bytes[done..]) {
                Ok(n) if n > 0 && n % REQ_SIZE == 0 => {
                    for id in &ids[done / REQ_SIZE..(done + n) / REQ_SIZE] {
                        self.pending.insert(*id, unsent.next().expect("one request per record"));
                    }
                    done += n;
                    continue;
                }
                Ok(n) => io::Error::new(
                    io::ErrorKind::Other,
                    format!("the server accepted {} bytes, not whole requests", n),
                ),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            let index = done / REQ_SIZE;
            return Err(SubmitError {
                index,
                accepted: ids[..index].to_vec(),
                unsent: unsent.collect(),
                error: Error::new(format!("write of request {}", index), &self.path, failure),
            });
        }
        drop(inbufs);
        drop(iovecs);
        Ok(ids)
    }

    fn new_ids(&mut self, n: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            self.next_id = self.next_id.wrapping_add(1);
            if !self.pending.contains_key(&self.next_id) && !ids.contains(&self.next_id) {
                ids.push(self.next_id);
            }
        }
        ids
    }

    /// Reads up to `max` results, in completion order (not necessarily that
    /// of submission). A blocking session waits for exactly
    /// `min(max, outstanding())`; a non-blocking one returns those ready, or
    /// fails with EAGAIN if none is.
    pub fn results(&mut self, max: usize) -> Result<Vec<Completed>, Error> {
        let max = if self.nonblocking {
            max
        } else {
            max.min(self.pending.len())
        };
        if max == 0 {
            let why = "no requests outstanding: a blocking read would never return";
            return Err(Error::new(
                "read",
                &self.path,
                io::Error::new(io::ErrorKind::InvalidInput, why),
            ));
        }
        let mut raw = vec![DmioUsrresp::default(); max];
        let n = loop {
            match (&self.file).read(wire::responses_as_bytes_mut(&mut raw)) {
                Ok(n) => break n,
                // An interrupted read loses no response: read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::new("read", &self.path, e)),
            }
        };
        let mut done = Vec::with_capacity(n / wire::RESP_SIZE);
        for resp in &raw[..n / wire::RESP_SIZE] {
            let request = self.pending.remove(&resp.resp_id).ok_or_else(|| {
                let why = format!("response to unknown request {}", resp.resp_id);
                Error::new("read", &self.path, io::Error::new(io::ErrorKind::InvalidData, why))
            })?;
            done.push(Completed {
                id: resp.resp_id,
                errno: resp.resp_error,
                immediate: resp.resp_immediate,
                request,
            });
        }
        Ok(done)
    }

    /// Waits for `events` (POLLIN, POLLOUT) up to `timeout` (None: no limit)
    /// and returns those that happened, 0 if the time ran out.
    pub fn wait(&self, events: i16, timeout: Option<Duration>) -> Result<i16, Error> {
        sys::wait(&self.file, events, timeout).map_err(|e| Error::new("poll", &self.path, e))
    }

    /// Reads back every outstanding result, then closes the session.
    pub fn close(mut self) -> Result<(), Error> {
        self.drain()
    }

    fn drain(&mut self) -> Result<(), Error> {
        while !self.pending.is_empty() {
            self.wait(POLLIN, None)?;
            match self.results(self.pending.len()) {
                Err(e) if e.errno() != Some(errno::EAGAIN) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// A region's dmio_buffer; its iovecs are kept in `iovecs`.
fn dmio_buffer(region: &mut Region, iovecs: &mut Vec<Vec<Iovec>>) -> DmioBuffer {
    let list = region.iovecs();
    let buffer = DmioBuffer {
        dmbuf_iov: list.as_ptr(),
        dmbuf_iovcnt: u32::try_from(list.len()).unwrap_or(u32::MAX), // the server refuses > 1024
        pad: [0; 4],
    };
    iovecs.push(list); // moves the Vec's header; its elements stay where they are
    buffer
}

impl AsRawFd for Session {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.drain().is_err() {
            // The server may still write into these buffers: never free them.
            for (_, request) in self.pending.drain() {
                std::mem::forget(request);
            }
        }
    }
}
