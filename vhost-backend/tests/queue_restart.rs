//! Queue restarts under load. QEMU sends SET_VRING_CALL while a queue runs
//! (the guest masks an MSI-X vector) and ADD_MEM_REG on memory hot-plug;
//! each stops the queue and starts it again. Stopping used to wait for the
//! queue's in-flight count to reach zero while it kept taking new
//! requests, so a frontend that keeps the queue full never got its reply.
//! Here a raw frontend keeps 32 reads in flight on a queue and changes the
//! call fd and adds a memory region meanwhile: both are answered within a
//! bound, and I/O carries on.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{read_reply, region_bytes, send_msg, GuestMem, Ring, NEED_REPLY};
use quern_bdev::drivers::{UringBdev, UringOptions};
use quern_bdev::poller::spawn_io_reactor;
use quern_bdev::{BdevRef, EngineConfig};
use quern_reactor::{PollMode, ReactorConfig};
use quern_vhost::{serve, DeviceConfig, QueueBinding};

const QD: u16 = 32;
const QSIZE: u16 = 128;
/// Guest layout: the ring at 0, request headers at 64 KiB, data at 1 MiB,
/// status bytes at 512 KiB.
const HDR: usize = 64 << 10;
const STATUS: usize = 512 << 10;
const DATA: usize = 1 << 20;
const UVA: u64 = 0x7f00_0000_0000;

fn ack(s: &mut UnixStream, req: u32, payload: &[u8], fds: &[i32]) -> Duration {
    let t = Instant::now();
    send_msg(s, req, NEED_REPLY, payload, fds);
    let (r, p) = read_reply(s).expect("a reply");
    assert_eq!(r, req);
    assert_eq!(
        u64::from_le_bytes(p[..8].try_into().unwrap()),
        0,
        "request {req} refused"
    );
    t.elapsed()
}

fn u64b(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

#[test]
fn call_fd_change_and_memory_hotplug_finish_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("q.sock");
    let (r, _) = spawn_io_reactor(
        ReactorConfig {
            id: 0,
            core: None,
            mode: PollMode::Busy,
            idle_spin: Duration::from_micros(100),
        },
        EngineConfig::default(),
    )
    .unwrap();
    // 200 µs per request, so requests are always in flight
    let bdev: BdevRef = Arc::new(
        UringBdev::open(&UringOptions {
            create_size: Some(64 << 20),
            direct: false,
            delay_us: 200,
            ..UringOptions::new("slow", dir.path().join("disk.img"))
        })
        .unwrap(),
    );
    let b = bdev.clone();
    let h = r.call(move |w| w.io.add_device(b).unwrap()).unwrap();
    let dev = serve(
        DeviceConfig {
            name: "restart".into(),
            socket: socket.clone(),
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            serial: "restart".into(),
            binding: QueueBinding::RoundRobin(vec![0]),
            timing: true,
            event_idx: true,
            qos: quern_vhost::qos::QosBinding::unlimited("test"),
        },
        bdev,
        vec![r.clone()],
        vec![h],
    )
    .unwrap();

    let mem = GuestMem::new(4 << 20);
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // VERSION_1, SEG_MAX, protocol features; REPLY_ACK and the memory slots
    // (no reply asked until REPLY_ACK is negotiated)
    send_msg(&s, 1, 0, &[], &[]);
    read_reply(&mut s).expect("GET_FEATURES");
    send_msg(&s, 2, 0, &u64b((1 << 32) | (1 << 30) | (1 << 2)), &[]);
    send_msg(&s, 16, 0, &u64b(0x8008 | 0x1), &[]); // MQ, REPLY_ACK, CONFIGURE_MEM_SLOTS
    let mut table = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
    table.extend(region_bytes(0, mem.len as u64, UVA, 0));
    ack(&mut s, 5, &table, &[mem.file.as_raw_fd()]);
    let mut ring = Ring::new(0, QSIZE);
    ack(
        &mut s,
        8,
        &[0u32.to_le_bytes(), u32::from(QSIZE).to_le_bytes()].concat(),
        &[],
    );
    let mut addr = Vec::new();
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend_from_slice(&0u32.to_le_bytes());
    for v in [
        UVA + ring.desc as u64,
        UVA + ring.used as u64,
        UVA + ring.avail as u64,
        0,
    ] {
        addr.extend_from_slice(&v.to_le_bytes());
    }
    ack(&mut s, 9, &addr, &[]);
    ack(
        &mut s,
        10,
        &[0u32.to_le_bytes(), 0u32.to_le_bytes()].concat(),
        &[],
    );
    let kick = common::eventfd();
    let call = common::eventfd();
    ack(&mut s, 13, &u64b(0), &[call.as_raw_fd()]);
    ack(&mut s, 12, &u64b(0), &[kick.as_raw_fd()]);
    ack(
        &mut s,
        18,
        &[0u32.to_le_bytes(), 1u32.to_le_bytes()].concat(),
        &[],
    );

    // QD requests: head 3i -> header, 4 KiB data, status
    for i in 0..QD {
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes()); // a read
        mem.write(HDR + 16 * i as usize, &hdr);
        let d = 3 * i;
        ring.set_desc(&mem, d, (HDR + 16 * i as usize) as u64, 16, 1, d + 1);
        ring.set_desc(
            &mem,
            d + 1,
            (DATA + 4096 * i as usize) as u64,
            4096,
            1 | 2,
            d + 2,
        );
        ring.set_desc(&mem, d + 2, (STATUS + i as usize) as u64, 1, 2, 0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let driver = {
        let (stop, done) = (stop.clone(), done.clone());
        let kick = kick.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut kick = kick;
            // offered one at a time, 10 µs apart, so that they complete
            // one at a time too: the queue is never empty, at no moment
            let spin = |us: u64| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(us) {}
            };
            for i in 0..QD {
                ring.push(&mem, 3 * i);
                let _ = kick.write_all(&1u64.to_ne_bytes());
                spin(10);
            }
            let mut got = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                got.clear();
                ring.reap(&mem, &mut got);
                for &head in &got {
                    assert_eq!(
                        mem.read(STATUS + head as usize / 3, 1)[0],
                        0,
                        "a read failed"
                    );
                    // keep the queue full
                    ring.push(&mem, head);
                    let _ = kick.write_all(&1u64.to_ne_bytes());
                    spin(2);
                }
                done.fetch_add(got.len() as u64, Ordering::Relaxed);
            }
            mem
        })
    };
    let wait_for = |n: u64| {
        let t = Instant::now();
        while done.load(Ordering::Relaxed) < n {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "I/O stalled at {}",
                done.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for(2000);
    // a new call fd while 32 requests are in flight and more keep coming
    let call2 = common::eventfd();
    let took = ack(&mut s, 13, &u64b(0), &[call2.as_raw_fd()]);
    assert!(
        took < Duration::from_secs(5),
        "SET_VRING_CALL took {took:?}"
    );
    let n = done.load(Ordering::Relaxed);
    wait_for(n + 2000);
    // memory hot-plug: a second region
    let extra = common::memfd("quern-test-hotplug", 1 << 20);
    let mut reg = u64b(0);
    reg.extend(region_bytes(1 << 30, 1 << 20, UVA + (1 << 30), 0));
    let took2 = ack(&mut s, 37, &reg, &[extra.as_raw_fd()]);
    assert!(took2 < Duration::from_secs(5), "ADD_MEM_REG took {took2:?}");
    let n = done.load(Ordering::Relaxed);
    wait_for(n + 2000);
    eprintln!(
        "SET_VRING_CALL answered in {took:?}, ADD_MEM_REG in {took2:?}, {} reads",
        done.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    let _mem = driver.join().expect("driver");
    drop(s);
    dev.stop();
    r.stop();
}
