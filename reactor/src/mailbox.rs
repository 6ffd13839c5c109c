//! Messages to a reactor: one lock-free SPSC ring per sender, plus an
//! eventfd doorbell that wakes a sleeping reactor.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::thread::ReactorCtx;

/// A message: code to run on the reactor, with access to its state.
pub type Msg = Box<dyn FnOnce(&mut ReactorCtx) + Send>;

/// Ring capacity of one sender's mailbox.
const MAILBOX_SLOTS: usize = 64;

pub(crate) struct Doorbell(OwnedFd);

impl Doorbell {
    pub(crate) fn new() -> std::io::Result<Self> {
        quern_bdev::eventfd().map(Doorbell)
    }

    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; non-blocking.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// The sending end of one SPSC ring to a reactor.
pub struct Mailbox {
    prod: HeapProd<Msg>,
    bell: Arc<Doorbell>,
}

pub(crate) type Inbox = HeapCons<Msg>;

impl Mailbox {
    pub(crate) fn new(bell: Arc<Doorbell>) -> (Mailbox, Inbox) {
        let (prod, cons) = HeapRb::<Msg>::new(MAILBOX_SLOTS).split();
        (Mailbox { prod, bell }, cons)
    }

    /// Queue a message. If the ring is full the sender yields until the
    /// reactor makes room (control plane only; reactors never wait here).
    pub fn send(&mut self, mut msg: Msg) {
        loop {
            match self.prod.try_push(msg) {
                Ok(()) => break,
                Err(m) => {
                    msg = m;
                    self.bell.ring();
                    std::thread::yield_now();
                }
            }
        }
        self.bell.ring();
    }
}

pub(crate) fn drain(inbox: &mut Inbox, ctx: &mut ReactorCtx) -> usize {
    let mut n = 0;
    while let Some(m) = inbox.try_pop() {
        m(ctx);
        n += 1;
    }
    n
}
