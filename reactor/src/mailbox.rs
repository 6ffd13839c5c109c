//! Messages to a reactor: one lock-free SPSC ring per sender, plus an
//! eventfd doorbell that wakes a sleeping reactor.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::sys;
use crate::ReactorGone;

/// A message: code to run on the reactor, with its work's state.
pub type Msg<W> = Box<dyn FnOnce(&mut W) + Send>;

/// Ring capacity of one sender's mailbox.
const MAILBOX_SLOTS: usize = 64;

pub(crate) struct Doorbell(OwnedFd);

impl Doorbell {
    pub(crate) fn new() -> std::io::Result<Self> {
        sys::eventfd().map(Doorbell)
    }

    pub(crate) fn ring(&self) {
        sys::eventfd_signal(self.0.as_raw_fd());
    }

    pub(crate) fn clear(&self) {
        sys::eventfd_drain(self.0.as_raw_fd());
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The sending end of one SPSC ring to a reactor.
pub struct Mailbox<W> {
    prod: HeapProd<Msg<W>>,
    bell: Arc<Doorbell>,
    /// Cleared when the reactor thread has ended: nobody drains the ring.
    alive: Arc<AtomicBool>,
}

pub(crate) type Inbox<W> = HeapCons<Msg<W>>;

impl<W> Mailbox<W> {
    pub(crate) fn new(bell: Arc<Doorbell>, alive: Arc<AtomicBool>) -> (Mailbox<W>, Inbox<W>) {
        let (prod, cons) = HeapRb::<Msg<W>>::new(MAILBOX_SLOTS).split();
        (Mailbox { prod, bell, alive }, cons)
    }

    /// Queue a message. If the ring is full the sender yields until the
    /// reactor makes room (control plane only; reactors never wait here).
    /// Fails if the reactor thread has ended.
    pub fn send(&mut self, mut msg: Msg<W>) -> Result<(), ReactorGone> {
        loop {
            if !self.alive.load(Ordering::Acquire) {
                return Err(ReactorGone);
            }
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
        Ok(())
    }
}

/// Run every queued message; returns how many ran.
pub(crate) fn drain<W>(inbox: &mut Inbox<W>, work: &mut W) -> usize {
    let mut n = 0;
    while let Some(m) = inbox.try_pop() {
        m(work);
        n += 1;
    }
    n
}
