//! `rbd`: a Ceph RBD image through librbd's asynchronous C API, completed
//! in polled mode.
//!
//! Start-up (off the reactors, in [`RbdBdev::open`]): load librados/librbd
//! (`dlopen`, see [`ffi`]), create a cluster handle for `client_id`, read
//! `ceph_conf`, set the keyring and the timeouts, connect, create the pool's
//! I/O context, open the image once to learn its size and check it exists.
//!
//! Channels: librbd lets one image handle notify one fd only
//! (`rbd_set_image_notification`), and its completion queue
//! (`rbd_poll_io_events`) is per handle. So every channel opens its own
//! image handle (in `open_channel`, which runs at start-up) with its own
//! eventfd: a reactor polls only its own completions, with no routing
//! between reactors and no lock of ours. The price: with the image's
//! `exclusive-lock` feature on, handles that write at the same time pass the
//! lock back and forth, so a write-heavy device is best served from one
//! reactor (bind its queues to one core) or with exclusive-lock disabled.
//!
//! Request path: `submit` takes a slot from the channel's preallocated slot
//! table, asks librbd for a completion whose argument is the slot index and
//! starts `rbd_aio_readv` / `writev` / `flush` / `discard` /
//! `write_zeroes` with the operation's iovecs (librbd allocates its own
//! completion object per request; that allocation is librbd's). librbd
//! completes on its own threads: a tiny callback bumps the channel's atomic
//! completion counter, then librbd queues the completion on the image
//! handle and signals the eventfd. `poll` (called by the engine on every
//! reap) does one atomic load, and only when something has finished takes
//! the completions with `rbd_poll_io_events` (no syscall). It reads the
//! eventfd only when the channel goes idle, so that a sleeping reactor is
//! not woken for completions it has already taken.
//!
//! Durability: the librbd cache is turned off (`rbd_cache = false`), so a
//! write completes when the OSDs have it; FUA needs nothing more and flush
//! is passed through for librbd's own ordering.
//!
//! Timeouts: `client_mount_timeout`, `rados_mon_op_timeout` and
//! `rados_osd_op_timeout` are all set to `timeout_secs`, so an unreachable
//! cluster fails start-up and I/O to a dead cluster fails with `-ETIMEDOUT`
//! instead of hanging.

pub mod ffi;

use std::ffi::{c_void, CString};
use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::types::{Bdev, BdevChannel, BdevInfo, IoKind, Op, Submitter};
use ffi::{Lib, RadosIoctxT, RadosT, RbdCompletionT, RbdImageT};

/// How to reach an RBD image.
#[derive(Clone, Debug)]
pub struct RbdOptions {
    pub name: String,
    pub pool: String,
    pub image: String,
    /// Open this snapshot (read-only).
    pub snapshot: Option<String>,
    pub ceph_conf: PathBuf,
    /// The cephx user without `client.`, e.g. `admin`.
    pub client_id: String,
    /// A keyring file; default: what ceph.conf says.
    pub keyring: Option<PathBuf>,
    pub read_only: bool,
    /// Connection, monitor and OSD operation timeouts, seconds.
    pub timeout_secs: u32,
    /// Logical block size reported to the guest (512 by default).
    pub block_size: Option<u32>,
}

impl RbdOptions {
    /// Defaults for everything but the name, pool and image.
    pub fn new(name: &str, pool: &str, image: &str) -> Self {
        RbdOptions {
            name: name.into(),
            pool: pool.into(),
            image: image.into(),
            snapshot: None,
            ceph_conf: PathBuf::from("/etc/ceph/ceph.conf"),
            client_id: "admin".into(),
            keyring: None,
            read_only: false,
            timeout_secs: 10,
            block_size: None,
        }
    }

    fn what(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("rbd image {}/{}@{}", self.pool, self.image, s),
            None => format!("rbd image {}/{}", self.pool, self.image),
        }
    }
}

/// `-errno` from librados/librbd as an io::Error saying what failed.
fn rerr(ctx: impl std::fmt::Display, r: i64) -> Error {
    let e = Error::from_raw_os_error((-r).clamp(1, 4095) as i32);
    Error::new(e.kind(), format!("{ctx}: {e}"))
}

fn cstr(what: &str, s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{what} `{}` contains a NUL byte", s.escape_debug()),
        )
    })
}

/// A connected cluster handle and the pool's I/O context. Shared by the
/// bdev and its channels; torn down when the last one goes.
struct Conn {
    lib: &'static Lib,
    cluster: RadosT,
    ioctx: RadosIoctxT,
}

// SAFETY: librados cluster handles and I/O contexts are thread-safe (the
// C API documents concurrent use from several threads).
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: both handles are live and every image opened on them has
        // been closed (channels hold an Arc<Conn> until they close theirs).
        unsafe {
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            (self.lib.rados_shutdown)(self.cluster);
        }
    }
}

impl Conn {
    fn connect(o: &RbdOptions) -> Result<Conn, Error> {
        let lib = ffi::lib().map_err(|e| Error::new(ErrorKind::NotFound, e))?;
        let id = cstr("client_id", &o.client_id)?;
        let mut cluster: RadosT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; id is NUL-terminated.
        let r = unsafe { (lib.rados_create)(&mut cluster, id.as_ptr()) };
        if r < 0 {
            return Err(rerr(
                format!("rados_create for client.{}", o.client_id),
                r.into(),
            ));
        }
        // from here on Drop shuts the handle down
        let mut conn = Conn {
            lib,
            cluster,
            ioctx: std::ptr::null_mut(),
        };
        let conf_s = o.ceph_conf.to_string_lossy();
        if !o.ceph_conf.is_file() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("ceph_conf {conf_s} does not exist or is not a file"),
            ));
        }
        let conf = cstr("ceph_conf", &conf_s)?;
        // SAFETY: live handle, NUL-terminated path.
        let r = unsafe { (lib.rados_conf_read_file)(cluster, conf.as_ptr()) };
        if r < 0 {
            return Err(rerr(format!("reading ceph_conf {conf_s}"), r.into()));
        }
        let t = o.timeout_secs.to_string();
        let mut settings: Vec<(&str, String)> = vec![
            ("client_mount_timeout", t.clone()),
            ("rados_mon_op_timeout", t.clone()),
            ("rados_osd_op_timeout", t),
            ("rbd_cache", "false".into()),
        ];
        if let Some(k) = &o.keyring {
            if !k.is_file() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("keyring {} does not exist or is not a file", k.display()),
                ));
            }
            settings.push(("keyring", k.to_string_lossy().into_owned()));
        }
        for (k, v) in &settings {
            let (kc, vc) = (cstr("option", k)?, cstr(k, v)?);
            // SAFETY: live, not yet connected handle; NUL-terminated strings.
            let r = unsafe { (lib.rados_conf_set)(cluster, kc.as_ptr(), vc.as_ptr()) };
            if r < 0 {
                return Err(rerr(format!("setting ceph option {k} = {v}"), r.into()));
            }
        }
        // SAFETY: live handle; blocks at most client_mount_timeout.
        let r = unsafe { (lib.rados_connect)(cluster) };
        if r < 0 {
            return Err(rerr(
                format!(
                    "connecting to the Ceph cluster of {conf_s} as client.{} (timeout {} s)",
                    o.client_id, o.timeout_secs
                ),
                r.into(),
            ));
        }
        let pool = cstr("pool", &o.pool)?;
        // SAFETY: connected handle, NUL-terminated pool name, out-pointer.
        let r = unsafe { (lib.rados_ioctx_create)(cluster, pool.as_ptr(), &mut conn.ioctx) };
        if r < 0 {
            conn.ioctx = std::ptr::null_mut();
            return Err(rerr(format!("opening pool `{}`", o.pool), r.into()));
        }
        Ok(conn)
    }
}

/// One open image handle; closed on drop.
struct Image {
    conn: Arc<Conn>,
    image: RbdImageT,
}

impl Image {
    fn open(conn: &Arc<Conn>, o: &RbdOptions, read_only: bool) -> Result<Image, Error> {
        let lib = conn.lib;
        let name = cstr("image", &o.image)?;
        let snap = o
            .snapshot
            .as_deref()
            .map(|s| cstr("snapshot", s))
            .transpose()?;
        let snap_p = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut image: RbdImageT = std::ptr::null_mut();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: live I/O context, NUL-terminated names (snap may be NULL),
        // out-pointer to a local.
        let r = unsafe { open(conn.ioctx, name.as_ptr(), &mut image, snap_p) };
        if r < 0 {
            return Err(rerr(format!("opening {}", o.what()), r.into()));
        }
        Ok(Image {
            conn: conn.clone(),
            image,
        })
    }

    /// The image's effective value of a configuration option (client
    /// config, then pool and image overrides), if librbd lists it.
    fn config_value(&self, key: &str) -> Result<Option<String>, i32> {
        let lib = self.conn.lib;
        let mut n: libc::c_int = 0;
        // SAFETY: asking for the count: a NULL array with capacity 0.
        let r = unsafe { (lib.rbd_config_image_list)(self.image, std::ptr::null_mut(), &mut n) };
        if r < 0 && r != -libc::ERANGE {
            return Err(r);
        }
        let mut opts: Vec<ffi::RbdConfigOption> = (0..n.max(0))
            .map(|_| ffi::RbdConfigOption {
                name: std::ptr::null_mut(),
                value: std::ptr::null_mut(),
                source: 0,
            })
            .collect();
        // SAFETY: an array of n options; librbd fills at most n and sets n.
        let r = unsafe { (lib.rbd_config_image_list)(self.image, opts.as_mut_ptr(), &mut n) };
        if r < 0 {
            return Err(r);
        }
        let found = opts[..n.max(0) as usize].iter().find_map(|o| {
            // SAFETY: librbd filled name and value with C strings.
            let name = unsafe { std::ffi::CStr::from_ptr(o.name) };
            (name.to_bytes() == key.as_bytes()).then(|| {
                // SAFETY: as above.
                unsafe { std::ffi::CStr::from_ptr(o.value) }
                    .to_string_lossy()
                    .into_owned()
            })
        });
        // SAFETY: the n options librbd filled, released once.
        unsafe { (lib.rbd_config_image_list_cleanup)(opts.as_mut_ptr(), n) };
        Ok(found)
    }

    fn size(&self) -> Result<u64, i32> {
        let mut size = 0u64;
        // SAFETY: live image handle, out-pointer to a local.
        let r = unsafe { (self.conn.lib.rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(r);
        }
        Ok(size)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: live handle, closed once; callers have taken or released
        // every completion queued on it.
        unsafe { (self.conn.lib.rbd_close)(self.image) };
    }
}

/// An RBD image as a block device.
pub struct RbdBdev {
    info: BdevInfo,
    opts: RbdOptions,
    conn: Arc<Conn>,
}

impl RbdBdev {
    /// Connect and check the image. Blocks for at most about `timeout_secs`
    /// per step when the cluster is unreachable.
    pub fn open(o: &RbdOptions) -> Result<Self, Error> {
        let mut o = o.clone();
        if o.snapshot.is_some() {
            o.read_only = true;
        }
        let conn = Arc::new(Conn::connect(&o)?);
        let img = Image::open(&conn, &o, o.read_only)?;
        // Every reactor has its own handle and FUA is not passed down: both
        // are only right with librbd's cache off, which pool or image
        // settings can turn back on over our client setting.
        match img.config_value("rbd_cache") {
            Ok(Some(v)) if v == "true" => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{}: rbd_cache is enabled by a pool or image setting; Quern needs it off \
                         (rbd config image rm {}/{} rbd_cache, or the pool's)",
                        o.what(),
                        o.pool,
                        o.image
                    ),
                ))
            }
            Ok(_) => {}
            Err(r) => {
                tracing::warn!(image = %o.what(), errno = -r, "cannot read the image's effective configuration")
            }
        }
        let size = img
            .size()
            .map_err(|r| rerr(format!("size of {}", o.what()), r.into()))?;
        drop(img);
        let block_size = o.block_size.unwrap_or(512);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("block size {block_size} is not a power of two >= 512"),
            ));
        }
        let capacity_bytes = size - size % u64::from(block_size);
        if capacity_bytes == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} ({size} bytes) is smaller than one block", o.what()),
            ));
        }
        Ok(RbdBdev {
            info: BdevInfo {
                name: o.name.clone(),
                block_size,
                capacity_bytes,
                read_only: o.read_only,
                buf_align: 1,
                supports_discard: true,
                supports_write_zeroes: true,
                driver: "rbd",
            },
            opts: o,
            conn,
        })
    }

    /// librbd's version, e.g. (1, 16, 0).
    pub fn library_version() -> Result<(i32, i32, i32), String> {
        let lib = ffi::lib()?;
        let (mut a, mut b, mut c) = (0, 0, 0);
        // SAFETY: three out-pointers to locals.
        unsafe { (lib.rbd_version)(&mut a, &mut b, &mut c) };
        Ok((a, b, c))
    }
}

/// QEMU's rbd filename syntax takes `\` as an escape; `:` separates
/// options everywhere, and in the image part `/` and `@` separate pool,
/// image and snapshot.
fn qemu_escape(s: &str, image_part: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ':') || (image_part && matches!(c, '/' | '@')) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Bdev for RbdBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    /// `rbd:POOL/IMAGE[@SNAP]:conf=CONF:id=ID[:keyring=KEYRING]`, each part
    /// escaped as QEMU's rbd driver expects.
    fn backing_spec(&self) -> Option<String> {
        let o = &self.opts;
        let mut s = format!(
            "rbd:{}/{}",
            qemu_escape(&o.pool, true),
            qemu_escape(&o.image, true)
        );
        if let Some(snap) = &o.snapshot {
            s.push('@');
            s.push_str(&qemu_escape(snap, true));
        }
        s.push_str(":conf=");
        s.push_str(&qemu_escape(&o.ceph_conf.to_string_lossy(), false));
        s.push_str(":id=");
        s.push_str(&qemu_escape(&o.client_id, false));
        if let Some(k) = &o.keyring {
            s.push_str(":keyring=");
            s.push_str(&qemu_escape(&k.to_string_lossy(), false));
        }
        Some(s)
    }

    fn open_channel(
        &self,
        _ring: &io_uring::IoUring,
        _file_slot: u32,
    ) -> std::io::Result<Box<dyn BdevChannel>> {
        let img = Image::open(&self.conn, &self.opts, self.opts.read_only)?;
        let efd = crate::sys::eventfd()?;
        // SAFETY: live image handle and eventfd; librbd only writes to it.
        let r = unsafe {
            (self.conn.lib.rbd_set_image_notification)(
                img.image,
                efd.as_raw_fd(),
                ffi::EVENT_TYPE_EVENTFD,
            )
        };
        if r < 0 {
            return Err(rerr(
                format!("rbd_set_image_notification on {}", self.opts.what()),
                r.into(),
            ));
        }
        Ok(Box::new(RbdChannel::new(img, efd)))
    }
}

/// Requests one channel keeps in flight at most; more wait in the engine.
const SLOTS: usize = 1024;
/// Completions taken from librbd per `rbd_poll_io_events` call.
const POLL_BATCH: usize = 64;

#[derive(Clone, Copy)]
struct Slot {
    tag: u64,
    kind: IoKind,
    len: u32,
}

/// What librbd's completion callback gets: where to count the completion.
/// One per slot, so that the argument also names the slot (by address).
#[repr(C)]
struct CbArg {
    completed: *const AtomicU64,
}

/// Runs on a librbd thread when an I/O finishes, just before librbd queues
/// the completion for `rbd_poll_io_events` and signals the eventfd. It only
/// counts, so `poll` knows without a call into librbd whether to look.
unsafe extern "C" fn on_complete(_c: RbdCompletionT, arg: *mut c_void) {
    // SAFETY: arg points at one of the channel's CbArgs, whose counter lives
    // in the channel; the channel closes its image (which waits for every
    // I/O, callbacks included) before it frees either.
    unsafe { (*(*arg.cast::<CbArg>()).completed).fetch_add(1, Ordering::Release) };
}

struct RbdChannel {
    /// Short reads at a bounded rate (each one per request).
    short_log: quern_reactor::ratelimit::LogLimiter,
    lib: &'static Lib,
    /// Declared (so dropped) before what the callback touches: closing the
    /// image waits for outstanding I/O.
    img: Image,
    efd: OwnedFd,
    slots: Vec<Slot>,
    free: Vec<u32>,
    comps: Vec<RbdCompletionT>,
    inflight: usize,
    /// Completions librbd has reported through `on_complete`.
    completed: Box<AtomicU64>,
    /// Completions taken with `rbd_poll_io_events`.
    taken: u64,
    cb_args: Box<[CbArg]>,
}

impl RbdChannel {
    fn new(img: Image, efd: OwnedFd) -> Self {
        RbdChannel {
            short_log: quern_reactor::ratelimit::LogLimiter::new(),
            lib: img.conn.lib,
            img,
            efd,
            slots: vec![
                Slot {
                    tag: 0,
                    kind: IoKind::Read,
                    len: 0
                };
                SLOTS
            ],
            free: (0..SLOTS as u32).rev().collect(),
            comps: vec![std::ptr::null_mut(); POLL_BATCH],
            inflight: 0,
            completed: Box::new(AtomicU64::new(0)),
            taken: 0,
            cb_args: Box::new([]),
        }
        .with_cb_args()
    }

    fn with_cb_args(mut self) -> Self {
        let counter: *const AtomicU64 = &*self.completed;
        self.cb_args = (0..SLOTS).map(|_| CbArg { completed: counter }).collect();
        self
    }

    /// The slot a callback argument names, if it is one of ours.
    fn slot_of(&self, arg: *mut c_void) -> Option<usize> {
        let base = self.cb_args.as_ptr() as usize;
        let off = (arg as usize).checked_sub(base)?;
        let ix = off / std::mem::size_of::<CbArg>();
        (off % std::mem::size_of::<CbArg>() == 0 && ix < self.cb_args.len()).then_some(ix)
    }

    fn drain_eventfd(&self) {
        crate::sys::eventfd_drain(self.efd.as_raw_fd());
    }
}

impl BdevChannel for RbdChannel {
    fn submit(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool {
        let Some(ix) = self.free.pop() else {
            return false;
        };
        let lib = self.lib;
        let mut c: RbdCompletionT = std::ptr::null_mut();
        let arg: *const CbArg = &self.cb_args[ix as usize];
        // SAFETY: out-pointer to a local; the argument outlives the I/O
        // (see `on_complete`), which only reads it.
        let r = unsafe {
            (lib.rbd_aio_create_completion)(arg as *mut c_void, Some(on_complete), &mut c)
        };
        if r < 0 {
            self.free.push(ix);
            sub.complete(tag, r);
            return true;
        }
        let img = self.img.image;
        // SAFETY: live image handle and completion; the Op contract keeps
        // the iovecs and their buffers valid until the completion is
        // reported, which happens only after librbd hands `c` back.
        let r = unsafe {
            match op.kind {
                IoKind::Read => {
                    (lib.rbd_aio_readv)(img, op.iov.as_ptr(), op.iov.len() as i32, op.offset, c)
                }
                IoKind::Write => {
                    (lib.rbd_aio_writev)(img, op.iov.as_ptr(), op.iov.len() as i32, op.offset, c)
                }
                IoKind::Flush => (lib.rbd_aio_flush)(img, c),
                IoKind::Discard => (lib.rbd_aio_discard)(img, op.offset, op.len, c),
                IoKind::WriteZeroes => {
                    (lib.rbd_aio_write_zeroes)(img, op.offset, op.len as usize, c, 0, 0)
                }
            }
        };
        if r < 0 {
            // refused before it started: librbd will not complete `c`
            // SAFETY: c is ours and was never handed to an I/O.
            unsafe { (lib.rbd_aio_release)(c) };
            self.free.push(ix);
            sub.complete(tag, r);
            return true;
        }
        self.slots[ix as usize] = Slot {
            tag,
            kind: op.kind,
            len: op.len.min(i32::MAX as u64) as u32,
        };
        self.inflight += 1;
        true
    }

    fn poll(&mut self, done: &mut Vec<(u64, i32)>) -> usize {
        // one atomic load while nothing has finished: no call into librbd
        if self.inflight == 0 || self.completed.load(Ordering::Acquire) == self.taken {
            return 0;
        }
        let lib = self.lib;
        let mut total = 0;
        loop {
            // SAFETY: live image handle; comps has room for POLL_BATCH.
            let n = unsafe {
                (lib.rbd_poll_io_events)(self.img.image, self.comps.as_mut_ptr(), POLL_BATCH as i32)
            };
            if n <= 0 {
                break;
            }
            for &c in &self.comps[..n as usize] {
                // SAFETY: c is a completed completion librbd just handed
                // back; it is released exactly once, here.
                let (arg, ret) = unsafe {
                    let arg = (lib.rbd_aio_get_arg)(c);
                    let ret = (lib.rbd_aio_get_return_value)(c);
                    (lib.rbd_aio_release)(c);
                    (arg, ret)
                };
                self.taken += 1;
                let Some(ix) = self.slot_of(arg) else {
                    tracing::error!(?arg, "librbd returned a completion we did not start");
                    continue;
                };
                let s = self.slots[ix];
                let res = if ret < 0 {
                    ret.max(i32::MIN as isize) as i32
                } else if s.kind == IoKind::Read && ret as u64 != u64::from(s.len) {
                    // librbd zero-fills holes and the engine refuses ranges
                    // past the end, so a read returns its whole length; a
                    // shorter one (an image shrunk under us) is an error
                    if let Some(left_out) = self.short_log.allow() {
                        tracing::warn!(got = ret, want = s.len, left_out, "short read from librbd");
                    }
                    -libc::EIO
                } else if s.kind.has_data() {
                    // a write's positive return value is not relied on:
                    // success covers the whole range
                    s.len as i32
                } else {
                    0
                };
                done.push((s.tag, res));
                self.free.push(ix as u32);
                self.inflight -= 1;
                total += 1;
            }
            if (n as usize) < POLL_BATCH {
                break;
            }
        }
        if total > 0 && self.inflight == 0 {
            // idle now: consume the wake-ups of what we just took, so a
            // sleeping reactor is woken only by new completions
            self.drain_eventfd();
        }
        total
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        // take what has completed so librbd's completions are released;
        // rbd_close (Image's drop) waits for anything still running
        let mut sink = Vec::new();
        self.poll(&mut sink);
        if self.inflight > 0 {
            tracing::warn!(
                inflight = self.inflight,
                "rbd channel closed with requests in flight"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_spec_escapes() {
        assert_eq!(qemu_escape("a:b/c@d\\e", true), "a\\:b\\/c\\@d\\\\e");
        assert_eq!(qemu_escape("/x/a:b@c", false), "/x/a\\:b@c");
    }
}
