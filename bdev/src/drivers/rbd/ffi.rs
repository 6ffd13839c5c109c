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

/// `rbd_config_option_t`: one effective configuration option of an image.
#[repr(C)]
pub struct RbdConfigOption {
    pub name: *mut c_char,
    pub value: *mut c_char,
    /// `rbd_config_source_t`: 0 config, 1 pool, 2 image.
    pub source: c_int,
}

/// Declares the function table: each entry is `library: name: type`, the
/// type copied from the C prototype.
macro_rules! lib_table {
    ($($lib:ident: $name:ident: $ty:ty,)*) => {
        /// Entry points resolved from librados.so.2 and librbd.so.1.
        pub struct Lib {
            $(pub $name: $ty,)*
        }

        impl Lib {
            fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Lib, String> {
                Ok(Lib {
                    $($name: {
                        let (h, lib) = match stringify!($lib) {
                            "rados" => (rados, RADOS_SO),
                            _ => (rbd, RBD_SO),
                        };
                        let name = concat!(stringify!($name), "\0");
                        let p = sym(h, lib, name)?;
                        // SAFETY: the symbol is the C function of this name,
                        // whose prototype in librados.h / librbd.h is `$ty`.
                        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
                    },)*
                })
            }
        }
    };
}

const RADOS_SO: &CStr = c"librados.so.2";
const RBD_SO: &CStr = c"librbd.so.1";

lib_table! {
    rados: rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    rados: rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados: rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    rados: rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados: rados_shutdown: unsafe extern "C" fn(RadosT),
    rados: rados_ioctx_create:
        unsafe extern "C" fn(RadosT, *const c_char, *mut RadosIoctxT) -> c_int,
    rados: rados_ioctx_destroy: unsafe extern "C" fn(RadosIoctxT),
    rbd: rbd_open:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    rbd: rbd_open_read_only:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    rbd: rbd_close: unsafe extern "C" fn(RbdImageT) -> c_int,
    rbd: rbd_get_size: unsafe extern "C" fn(RbdImageT, *mut u64) -> c_int,
    rbd: rbd_stat: unsafe extern "C" fn(RbdImageT, *mut RbdImageInfo, usize) -> c_int,
    rbd: rbd_set_image_notification: unsafe extern "C" fn(RbdImageT, c_int, c_int) -> c_int,
    rbd: rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, RbdCallbackT, *mut RbdCompletionT) -> c_int,
    rbd: rbd_aio_readv:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    rbd: rbd_aio_writev:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    rbd: rbd_aio_flush: unsafe extern "C" fn(RbdImageT, RbdCompletionT) -> c_int,
    rbd: rbd_aio_discard: unsafe extern "C" fn(RbdImageT, u64, u64, RbdCompletionT) -> c_int,
    rbd: rbd_aio_write_zeroes:
        unsafe extern "C" fn(RbdImageT, u64, usize, RbdCompletionT, c_int, c_int) -> c_int,
    rbd: rbd_poll_io_events: unsafe extern "C" fn(RbdImageT, *mut RbdCompletionT, c_int) -> c_int,
    rbd: rbd_aio_get_return_value: unsafe extern "C" fn(RbdCompletionT) -> isize,
    rbd: rbd_aio_get_arg: unsafe extern "C" fn(RbdCompletionT) -> *mut c_void,
    rbd: rbd_aio_release: unsafe extern "C" fn(RbdCompletionT),
    rbd: rbd_version: unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int),
    rbd: rbd_config_image_list:
        unsafe extern "C" fn(RbdImageT, *mut RbdConfigOption, *mut c_int) -> c_int,
    rbd: rbd_config_image_list_cleanup: unsafe extern "C" fn(*mut RbdConfigOption, c_int),
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

fn sym(h: *mut c_void, lib: &CStr, name: &str) -> Result<*mut c_void, String> {
    let shown = name.trim_end_matches('\0');
    let Ok(cname) = CStr::from_bytes_with_nul(name.as_bytes()) else {
        return Err(format!("bad symbol name {shown}"));
    };
    // SAFETY: h is a live dlopen handle and cname is NUL-terminated.
    let p = unsafe { libc::dlsym(h, cname.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "{} has no symbol {shown} (is it older than Ceph 16 / Pacific?)",
            lib.to_string_lossy()
        ));
    }
    Ok(p)
}

impl Lib {
    fn load() -> Result<Lib, String> {
        // librbd first: it needs librados, so without Ceph the message
        // names the package to install (librbd1 pulls in librados2)
        let rbd = open(RBD_SO, "librbd1")?;
        let rados = open(RADOS_SO, "librados2")?;
        Lib::resolve(rados, rbd)
    }
}

/// The process-wide function table, loaded on first use.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_names_its_package() {
        let e = open(c"libquern-absent.so.1", "quern-absent1").unwrap_err();
        assert!(
            e.starts_with("libquern-absent.so.1 not found: install quern-absent1"),
            "{e}"
        );
    }

    #[test]
    fn the_table_resolves_where_ceph_is_installed() {
        // the test machines have librbd1 (scripts/install-test-deps.sh)
        let lib = lib().expect("librbd.so.1 and librados.so.2 load");
        let (mut a, mut b, mut c) = (0, 0, 0);
        // SAFETY: three out-pointers to locals.
        unsafe { (lib.rbd_version)(&mut a, &mut b, &mut c) };
        assert!(a >= 1, "librbd {a}.{b}.{c}");
    }
}
