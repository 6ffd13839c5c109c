//! The part of the librados / librbd C API the rbd driver uses, loaded at
//! run time with `dlopen` so that Quern builds and runs on machines without
//! Ceph; only configuring an rbd bdev needs `librbd.so.1` and
//! `librados.so.2` (Debian: librbd1, librados2).
//!
//! The declarations follow `<rados/librados.h>` and `<rbd/librbd.h>` of
//! Ceph 16 (Pacific); every function used here exists with the same
//! signature in later releases.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

pub type RadosT = *mut c_void;
pub type RadosIoctxT = *mut c_void;
pub type RbdImageT = *mut c_void;
pub type RbdCompletionT = *mut c_void;
pub type RbdCallbackT = Option<unsafe extern "C" fn(RbdCompletionT, *mut c_void)>;

/// `EVENT_TYPE_EVENTFD` of librbd.h's `rbd_event_type_t`.
pub const EVENT_TYPE_EVENTFD: c_int = 2;

/// `rbd_image_info_t` of librbd.h.
#[repr(C)]
pub struct RbdImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// Entry points resolved from librados.so.2 and librbd.so.1.
pub struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(RadosT),
    pub rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut RadosIoctxT) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(RadosIoctxT),
    pub rbd_open:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(RbdImageT) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(RbdImageT, *mut u64) -> c_int,
    pub rbd_stat: unsafe extern "C" fn(RbdImageT, *mut RbdImageInfo, usize) -> c_int,
    pub rbd_set_image_notification: unsafe extern "C" fn(RbdImageT, c_int, c_int) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, RbdCallbackT, *mut RbdCompletionT) -> c_int,
    pub rbd_aio_readv:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(RbdImageT, RbdCompletionT) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(RbdImageT, u64, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(RbdImageT, u64, usize, RbdCompletionT, c_int, c_int) -> c_int,
    pub rbd_poll_io_events: unsafe extern "C" fn(RbdImageT, *mut RbdCompletionT, c_int) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(RbdCompletionT) -> isize,
    pub rbd_aio_get_arg: unsafe extern "C" fn(RbdCompletionT) -> *mut c_void,
    pub rbd_aio_release: unsafe extern "C" fn(RbdCompletionT),
    pub rbd_version: unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int),
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn open(name: &CStr, package: &str) -> Result<*mut c_void, String> {
    // SAFETY: name is NUL-terminated. The handle is never closed: librbd
    // keeps threads and static state that must not be unloaded.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err(format!(
            "{} not found: install {package} ({})",
            name.to_string_lossy(),
            dl_error()
        ));
    }
    Ok(h)
}

fn sym(h: *mut c_void, lib: &CStr, name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: h is a live dlopen handle and name is NUL-terminated.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "{} has no symbol {} (is it older than Ceph 16 / Pacific?)",
            lib.to_string_lossy(),
            name.to_string_lossy()
        ));
    }
    Ok(p)
}

impl Lib {
    fn load() -> Result<Lib, String> {
        let rados_name = c"librados.so.2";
        let rbd_name = c"librbd.so.1";
        let rados = open(rados_name, "librados2")?;
        let rbd = open(rbd_name, "librbd1")?;
        macro_rules! f {
            ($h:expr, $lib:expr, $name:ident) => {{
                let p = sym($h, $lib, {
                    const N: &CStr = match CStr::from_bytes_with_nul(
                        concat!(stringify!($name), "\0").as_bytes(),
                    ) {
                        Ok(c) => c,
                        Err(_) => panic!("symbol name"),
                    };
                    N
                })?;
                // SAFETY: the symbol is the C function of this name, whose
                // prototype in librados.h/librbd.h matches the field's type.
                unsafe { std::mem::transmute::<*mut c_void, _>(p) }
            }};
        }
        Ok(Lib {
            rados_create: f!(rados, rados_name, rados_create),
            rados_conf_read_file: f!(rados, rados_name, rados_conf_read_file),
            rados_conf_set: f!(rados, rados_name, rados_conf_set),
            rados_connect: f!(rados, rados_name, rados_connect),
            rados_shutdown: f!(rados, rados_name, rados_shutdown),
            rados_ioctx_create: f!(rados, rados_name, rados_ioctx_create),
            rados_ioctx_destroy: f!(rados, rados_name, rados_ioctx_destroy),
            rbd_open: f!(rbd, rbd_name, rbd_open),
            rbd_open_read_only: f!(rbd, rbd_name, rbd_open_read_only),
            rbd_close: f!(rbd, rbd_name, rbd_close),
            rbd_get_size: f!(rbd, rbd_name, rbd_get_size),
            rbd_stat: f!(rbd, rbd_name, rbd_stat),
            rbd_set_image_notification: f!(rbd, rbd_name, rbd_set_image_notification),
            rbd_aio_create_completion: f!(rbd, rbd_name, rbd_aio_create_completion),
            rbd_aio_readv: f!(rbd, rbd_name, rbd_aio_readv),
            rbd_aio_writev: f!(rbd, rbd_name, rbd_aio_writev),
            rbd_aio_flush: f!(rbd, rbd_name, rbd_aio_flush),
            rbd_aio_discard: f!(rbd, rbd_name, rbd_aio_discard),
            rbd_aio_write_zeroes: f!(rbd, rbd_name, rbd_aio_write_zeroes),
            rbd_poll_io_events: f!(rbd, rbd_name, rbd_poll_io_events),
            rbd_aio_get_return_value: f!(rbd, rbd_name, rbd_aio_get_return_value),
            rbd_aio_get_arg: f!(rbd, rbd_name, rbd_aio_get_arg),
            rbd_aio_release: f!(rbd, rbd_name, rbd_aio_release),
            rbd_version: f!(rbd, rbd_name, rbd_version),
        })
    }
}

/// The process-wide function table, loaded on first use.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}
