//! dmoverdemo: uses every dmoverfs function through the `dmover` library and
//! checks each result against one computed here.
//!
//! ```text
//! dmoverdemo run MOUNTPOINT [CHECK...] every function, non-blocking use, errors (or the checks named)
//! dmoverdemo crc32c MOUNTPOINT FILE    the iscsi-crc32c of FILE
//! dmoverdemo xor MOUNTPOINT OUT IN...  OUT = the XOR of the IN files (2 to 16, of one size)
//! dmoverdemo layout                    the wire records' sizes and offsets
//! ```

use std::mem::MaybeUninit;
use std::process::exit;
use std::time::Duration;

use dmover::wire::{self, DmioBuffer, DmioUsrreq, DmioUsrresp, Iovec};
use dmover::{errno, immediate, Completed, Region, Request, Session, POLLIN};

type Outcome = Result<String, Box<dyn std::error::Error>>;

/// CRC32C of "123456789", the published check value.
const CHECK_VALUE: u32 = 0xE306_9283;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        [_, "layout"] => {
            print_layout();
            Ok(())
        }
        [_, "run", mnt, names @ ..] => run_checks(mnt, names),
        [_, "crc32c", mnt, path] => crc_file(mnt, path),
        [_, "xor", mnt, out, inputs @ ..] if (2..=16).contains(&inputs.len()) => xor_files(mnt, out, inputs),
        _ => {
            eprintln!("usage: dmoverdemo run MOUNTPOINT [CHECK...] | crc32c MOUNTPOINT FILE | xor MOUNTPOINT OUT IN... | layout");
            exit(2);
        }
    };
    if let Err(err) = result {
        eprintln!("dmoverdemo: {}", err);
        exit(1);
    }
}

type Check = Box<dyn Fn(&str) -> Outcome>;

/// Runs the checks named (all if none is) in turn and stops at the first failure.
fn run_checks(mnt: &str, names: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let mut checks: Vec<(String, Check)> = vec![
        ("zero".into(), Box::new(|m: &str| check_fill(m, "zero", 0))),
        ("fill8".into(), Box::new(|m: &str| check_fill(m, "fill8", 0x5A))),
        ("copy".into(), Box::new(check_copy)),
    ];
    for n in 2..=16 {
        checks.push((format!("xor{}", n), Box::new(move |m: &str| check_xor(m, n))));
    }
    checks.push(("iscsi-crc32c".into(), Box::new(check_crc)));
    checks.push(("order".into(), Box::new(check_order)));
    checks.push(("nonblock".into(), Box::new(check_nonblock)));
    checks.push(("errors".into(), Box::new(check_errors)));
    if let Some(unknown) = names.iter().find(|n| !checks.iter().any(|(name, _)| name == *n)) {
        return Err(format!("no check named {:?}", unknown).into());
    }
    if !names.is_empty() {
        checks.retain(|(name, _)| names.contains(&name.as_str()));
    }
    for (name, check) in &checks {
        match check(mnt) {
            Ok(detail) => println!("{}: ok ({})", name, detail),
            Err(err) => {
                println!("{}: FAILED", name);
                return Err(format!("{}: {}", name, err).into());
            }
        }
    }
    println!("dmoverdemo: all checks passed");
    Ok(())
}

/// Submits the requests on a new session of `function` in one write and
/// reads every result, checking each id comes back once and succeeded.
fn run_batch(mnt: &str, function: &str, requests: Vec<Request>) -> Result<Vec<Completed>, Box<dyn std::error::Error>> {
    let mut session = Session::open(mnt, function, false)?;
    let ids = session.submit(requests)?;
    let done = session.results(ids.len())?;
    match_results(&ids, &done)?;
    session.close()?;
    // Back in submission order, for the callers' convenience.
    let mut done = done;
    done.sort_by_key(|c| ids.iter().position(|&id| id == c.id));
    Ok(done)
}

/// Checks that `done` answers `ids` exactly once each, in any order, without error.
fn match_results(ids: &[u32], done: &[Completed]) -> Result<(), String> {
    let mut waiting: Vec<u32> = ids.to_vec();
    for c in done {
        let at = waiting
            .iter()
            .position(|&id| id == c.id)
            .ok_or(format!("unexpected or repeated result for request {}", c.id))?;
        waiting.swap_remove(at);
        if let Some(err) = c.error() {
            return Err(format!("request {} failed: {}", c.id, err));
        }
    }
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!("{} requests without a result", waiting.len()))
    }
}

/// A small deterministic generator (xorshift64*) for test data.
struct Rng(u64);

impl Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }
}

/// CRC32C computed bit by bit (Castagnoli, reflected, inverted), the oracle.
fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let mut crc = !seed;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Fills 8 outputs of 64 KiB + 3 bytes, each cut into two segments, with `value`.
fn check_fill(mnt: &str, function: &str, value: u8) -> Outcome {
    let (count, size) = (8, (64 << 10) + 3);
    let requests = (0..count)
        .map(|_| Request {
            out: Some(Region::from_segments(vec![
                vec![!value; 1000],
                vec![!value; size - 1000],
            ])),
            immediate: immediate(value as u64),
            ..Request::default()
        })
        .collect();
    for (i, c) in run_batch(mnt, function, requests)?.into_iter().enumerate() {
        if c.request.out.map(|r| r.to_vec()) != Some(vec![value; size]) {
            return Err(format!("output {} is not all 0x{:02x}", i, value).into());
        }
    }
    Ok(format!("{} requests, {} bytes", count, count * size))
}

/// Copies 1 MiB + 17 random bytes into an output in three segments.
fn check_copy(mnt: &str) -> Outcome {
    let size = (1 << 20) + 17;
    let src = Rng(1).bytes(size);
    let out = Region::from_segments(vec![vec![0; 4096], vec![0; 1 << 19], vec![0; size - 4096 - (1 << 19)]]);
    let request = Request {
        out: Some(out),
        inputs: vec![Region::new(src.clone())],
        ..Request::default()
    };
    let done = run_batch(mnt, "copy", vec![request])?;
    if done[0].request.out.as_ref().map(Region::to_vec) != Some(src) {
        return Err("the output differs from the input".into());
    }
    Ok(format!("1 request, {} bytes", size))
}

/// XORs n random inputs of 4 KiB + n bytes, in 4 requests.
fn check_xor(mnt: &str, n: usize) -> Outcome {
    let (count, size) = (4, 4096 + n);
    let mut rng = Rng(n as u64);
    let mut want = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..count {
        let inputs: Vec<Vec<u8>> = (0..n).map(|_| rng.bytes(size)).collect();
        want.push(
            (0..size)
                .map(|k| inputs.iter().fold(0u8, |acc, input| acc ^ input[k]))
                .collect::<Vec<u8>>(),
        );
        let inputs = inputs.into_iter().map(Region::new).collect();
        requests.push(Request {
            out: Some(Region::new(vec![0; size])),
            inputs,
            ..Request::default()
        });
    }
    for (i, c) in run_batch(mnt, &format!("xor{}", n), requests)?.into_iter().enumerate() {
        if c.request.out.map(|r| r.to_vec()).as_ref() != Some(&want[i]) {
            return Err(format!("output {} is not the XOR of its {} inputs", i, n).into());
        }
    }
    Ok(format!("{} requests of {} inputs, {} bytes each", count, n, size))
}

fn crc_request(segments: Vec<Vec<u8>>, seed: u32) -> Request {
    Request {
        inputs: vec![Region::from_segments(segments)],
        immediate: immediate(seed as u64),
        ..Request::default()
    }
}

/// The CRC32C the mount computes over one input cut into `segments`, from `seed`.
fn mount_crc(mnt: &str, segments: Vec<Vec<u8>>, seed: u32) -> Result<u32, Box<dyn std::error::Error>> {
    Ok(run_batch(mnt, "iscsi-crc32c", vec![crc_request(segments, seed)])?[0].crc())
}

/// The published check value (the input in two segments), a CRC chained over
/// two requests, and 1 MiB of random data against the bitwise oracle.
fn check_crc(mnt: &str) -> Outcome {
    let data = Rng(3).bytes(1 << 20);
    let want = crc32c(0, &data);
    let first = mount_crc(mnt, vec![b"1234".to_vec()], 0)?;
    let cases = [
        (
            "\"123456789\" in two segments",
            mount_crc(mnt, vec![b"1234".to_vec(), b"56789".to_vec()], 0)?,
            CHECK_VALUE,
        ),
        (
            "\"1234\" then \"56789\", chained",
            mount_crc(mnt, vec![b"56789".to_vec()], first)?,
            CHECK_VALUE,
        ),
        ("1 MiB", mount_crc(mnt, vec![data], 0)?, want),
    ];
    for (what, got, expected) in cases {
        if got != expected {
            return Err(format!("CRC32C of {} is 0x{:08x}, not 0x{:08x}", what, got, expected).into());
        }
    }
    Ok(format!(
        "check value 0x{:08x}, chained 0x{:08x}, 1 MiB 0x{:08x}",
        CHECK_VALUE, CHECK_VALUE, want
    ))
}

/// A 64 MiB copy then eight 4 KiB ones in one write, matched by id: the
/// small ones usually complete before the big one.
fn check_order(mnt: &str) -> Outcome {
    let (big, small, count) = (64 << 20, 4096, 8);
    let src = Rng(4).bytes(big);
    let mut requests = vec![Request {
        out: Some(Region::new(vec![0; big])),
        inputs: vec![Region::new(src.clone())],
        ..Request::default()
    }];
    for i in 0..count {
        let input = Region::new(src[i * small..(i + 1) * small].to_vec());
        requests.push(Request {
            out: Some(Region::new(vec![0; small])),
            inputs: vec![input],
            ..Request::default()
        });
    }
    let mut session = Session::open(mnt, "copy", false)?;
    let ids = session.submit(requests)?;
    let done = session.results(ids.len())?;
    match_results(&ids, &done)?;
    session.close()?;
    for c in &done {
        if c.request.out.as_ref().map(Region::to_vec) != Some(c.request.inputs[0].to_vec()) {
            return Err(format!("the output of request {} differs from its input", c.id).into());
        }
    }
    let place = done.iter().position(|c| c.id == ids[0]).unwrap_or(0) + 1;
    Ok(format!(
        "the 64 MiB copy, submitted first, came back in place {} of {}",
        place,
        done.len()
    ))
}

/// Fills a non-blocking session's queue until EAGAIN, then reads every
/// result as poll reports them ready.
fn check_nonblock(mnt: &str) -> Outcome {
    let mut session = Session::open(mnt, "fill8", true)?;
    let function = session.function()?;
    if function != "fill8" {
        return Err(format!("the session's function reads back as {:?}", function).into());
    }
    let mut ids = Vec::new();
    loop {
        let request = Request {
            out: Some(Region::new(vec![0; 4096])),
            immediate: immediate(7),
            ..Request::default()
        };
        match session.submit(vec![request]) {
            Ok(got) => ids.extend(got),
            Err(e) if e.error.errno() == Some(errno::EAGAIN) => break,
            Err(e) => return Err(e.into()),
        }
        if ids.len() > 100_000 {
            return Err("the queue never filled".into());
        }
    }
    let queued = ids.len();
    let mut done = Vec::new();
    while done.len() < queued {
        if session.wait(POLLIN, Some(Duration::from_secs(10)))? & POLLIN == 0 {
            return Err(format!("no result ready within 10 s ({} of {} read)", done.len(), queued).into());
        }
        match session.results(queued) {
            Ok(got) => done.extend(got),
            Err(e) if e.errno() == Some(errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match_results(&ids, &done)?;
    if done
        .iter()
        .any(|c| c.request.out.as_ref().map(Region::to_vec) != Some(vec![7; 4096]))
    {
        return Err("an output is not all 0x07".into());
    }
    session.close()?;
    Ok(format!(
        "queue full after {} requests, {} results read after poll",
        queued,
        done.len()
    ))
}

/// Failures come back with the right errno.
fn check_errors(mnt: &str) -> Outcome {
    match Session::open(mnt, "no-such-function", false) {
        Err(e) if e.errno() == Some(errno::ESRCH) => {}
        Err(e) => return Err(format!("an unknown function gave {}, not ESRCH", e).into()),
        Ok(_) => return Err("an unknown function was accepted".into()),
    }
    let mut session = Session::open(mnt, "zero", false)?;
    let ids = session.submit(vec![Request::default()])?; // zero needs an output
    let done = session.results(ids.len())?;
    if done[0].errno != errno::EINVAL {
        return Err(format!("zero without an output gave errno {}, not EINVAL", done[0].errno).into());
    }
    session.close()?;
    Ok("ESRCH for an unknown function, EINVAL for zero without an output".into())
}

fn crc_file(mnt: &str, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {}", path, e))?;
    let done = run_batch(mnt, "iscsi-crc32c", vec![crc_request(vec![data], 0)])?;
    println!("0x{:08x}", done[0].crc());
    Ok(())
}

fn xor_files(mnt: &str, out: &str, inputs: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let mut regions = Vec::new();
    for path in inputs {
        let data = std::fs::read(path).map_err(|e| format!("{}: {}", path, e))?;
        if let Some(first) = regions.first().map(|r: &Region| r.segments()[0].len()) {
            if data.len() != first {
                return Err(format!("{} has {} bytes, the first input {}", path, data.len(), first).into());
            }
        }
        regions.push(Region::new(data));
    }
    let size = regions[0].segments()[0].len();
    let request = Request {
        out: Some(Region::new(vec![0; size])),
        inputs: regions,
        ..Request::default()
    };
    let done = run_batch(mnt, &format!("xor{}", inputs.len()), vec![request])?;
    let result = done
        .into_iter()
        .next()
        .and_then(|c| c.request.out)
        .map(|r| r.to_vec())
        .unwrap_or_default();
    std::fs::write(out, result).map_err(|e| format!("{}: {}", out, e))?;
    Ok(())
}

/// The offset of a field, without `offset_of!` (Rust 1.77).
macro_rules! offset_of {
    ($t:ty, $($field:ident).+) => {{
        let record = MaybeUninit::<$t>::uninit();
        let base = record.as_ptr();
        // SAFETY: addr_of! takes the field's address without reading it.
        let field = unsafe { std::ptr::addr_of!((*base).$($field).+) };
        field as usize - base as usize
    }};
}

/// The wire records' layout, in the format of the test suite's C layout
/// program, which compares the two.
fn print_layout() {
    println!("sizeof struct iovec {}", std::mem::size_of::<Iovec>());
    println!("sizeof dmio_buffer {}", std::mem::size_of::<DmioBuffer>());
    println!("sizeof struct dmio_usrreq {}", std::mem::size_of::<DmioUsrreq>());
    println!("sizeof struct dmio_usrresp {}", std::mem::size_of::<DmioUsrresp>());
    println!("offsetof dmio_buffer dmbuf_iov {}", offset_of!(DmioBuffer, dmbuf_iov));
    println!(
        "offsetof dmio_buffer dmbuf_iovcnt {}",
        offset_of!(DmioBuffer, dmbuf_iovcnt)
    );
    println!(
        "offsetof struct dmio_usrreq req_outbuf {}",
        offset_of!(DmioUsrreq, req_outbuf)
    );
    println!(
        "offsetof struct dmio_usrreq req_outbuf.dmbuf_iovcnt {}",
        offset_of!(DmioUsrreq, req_outbuf.dmbuf_iovcnt)
    );
    println!(
        "offsetof struct dmio_usrreq req_immediate {}",
        offset_of!(DmioUsrreq, req_immediate)
    );
    println!(
        "offsetof struct dmio_usrreq req_inbuf {}",
        offset_of!(DmioUsrreq, req_inbuf)
    );
    println!("offsetof struct dmio_usrreq req_id {}", offset_of!(DmioUsrreq, req_id));
    println!(
        "offsetof struct dmio_usrresp resp_id {}",
        offset_of!(DmioUsrresp, resp_id)
    );
    println!(
        "offsetof struct dmio_usrresp resp_error {}",
        offset_of!(DmioUsrresp, resp_error)
    );
    println!(
        "offsetof struct dmio_usrresp resp_immediate {}",
        offset_of!(DmioUsrresp, resp_immediate)
    );
    println!("const DMIO_MAX_FUNCNAME {}", wire::MAX_FUNCNAME);
    println!("const DMIO_NREQS_MAX {}", wire::NREQS_MAX);
    println!("string DMOVERFS_XATTR_FUNCTION {}", wire::XATTR_FUNCTION);
    println!("string DMOVERFS_XATTR_NONBLOCK {}", wire::XATTR_NONBLOCK);
    // The test's C program fills these same values in and dumps its bytes.
    let mut immediate_in = [0u8; 8];
    let mut immediate_out = [0u8; 8];
    for i in 0..8 {
        immediate_in[i] = 0xf0 + i as u8;
        immediate_out[i] = 0xa0 + i as u8;
    }
    let req = DmioUsrreq {
        req_outbuf: DmioBuffer {
            dmbuf_iov: 0x1122_3344_5566_7788 as *const Iovec,
            dmbuf_iovcnt: 0x99aa_bbcc,
            pad: [0; 4],
        },
        req_immediate: immediate_in,
        req_inbuf: 0x0102_0304_0506_0708 as *const DmioBuffer,
        req_id: 0xdead_beef,
        pad: [0; 4],
    };
    let resp = DmioUsrresp {
        resp_id: 0x0102_0304,
        resp_error: -22,
        resp_immediate: immediate_out,
    };
    println!("bytes req {}", hex(wire::as_bytes(&[req])));
    println!("bytes resp {}", hex(wire::as_bytes(&[resp])));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{:02x}", b)).collect()
}
