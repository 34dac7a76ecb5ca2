//! A small client of dmoverfs sessions, with the standard library only.
//!
//! A session is a file opened in a dmoverfs mount: its function is chosen with
//! the `user.dmover.function` extended attribute (`fsetxattr`, NetBSD's
//! `DMIO_SETFUNC`), requests are `struct dmio_usrreq` records written to it
//! and results are `struct dmio_usrresp` records read back, in completion
//! order. Requests carry addresses of this process's memory, so a
//! [`Session`] takes ownership of every buffer a request names and gives it
//! back with the request's result ([`Completed`]): while the server may read
//! or write a buffer, nothing else can free, move or touch it.

mod error;
mod session;
mod sys;
pub mod wire;

pub use error::errno;
pub use error::{Error, SubmitError};
pub use session::{immediate, Completed, Region, Request, Session, POLLIN, POLLOUT};
