//! Interrupt mode: the reactor sleeps even with I/O in flight, on the
//! ring's completion eventfd (io_uring task work included), and must wake
//! for every completion. A missed wake-up would cost the one-second epoll
//! timeout per request, which the elapsed-time bound catches.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quern_tests::client::Client;

const CONFIG: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "interrupt"
[[bdev]]
name = "slow"
driver = "uring"
path = "slow.img"
size = "64M"
delay_us = 2000
[[vhost_blk]]
name = "vm0"
bdev = "slow"
socket = "vm0.sock"
num_queues = 2
"#;

#[test]
fn interrupt_mode_sleeps_with_io_in_flight_and_wakes_for_each_completion() {
    let r = quern_tests::start(CONFIG);
    let mut c = Client::connect(&r.dir.path().join("vm0.sock"), 2).unwrap();
    const QD: usize = 16;
    const ROUNDS: usize = 8;
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        for q in 0..2 {
            for i in 0..QD {
                let slot = q * QD + i;
                c.buf(slot * 4096, 4096).fill((round * 37 + slot) as u8);
                let off = ((round * 2 * QD + slot) * 4096) as u64;
                c.write(q, off, slot * 4096, 4096, slot);
            }
        }
        for q in 0..2 {
            for (tag, res) in c.wait(q, QD) {
                assert_eq!(res, 0, "write {tag} failed");
            }
        }
    }
    for round in 0..ROUNDS {
        for q in 0..2 {
            for i in 0..QD {
                let slot = q * QD + i;
                let off = ((round * 2 * QD + slot) * 4096) as u64;
                c.read(q, off, (1 << 20) + slot * 4096, 4096, slot);
            }
        }
        for q in 0..2 {
            for (tag, res) in c.wait(q, QD) {
                assert_eq!(res, 0, "read {tag} failed");
            }
        }
        for slot in 0..2 * QD {
            let want = (round * 37 + slot) as u8;
            assert!(
                c.buf((1 << 20) + slot * 4096, 4096)
                    .iter()
                    .all(|&b| b == want),
                "round {round} slot {slot} read back other data"
            );
        }
    }
    let elapsed = t0.elapsed();
    // 16 rounds of 2 ms each, in parallel per round: well under a second
    // unless wake-ups are missed
    assert!(
        elapsed < Duration::from_secs(3),
        "took {elapsed:?}: missed wake-ups"
    );
    let sleeps: u64 = r
        .engine
        .reactors
        .iter()
        .map(|x| x.stats.sleeps.load(Ordering::Relaxed))
        .sum();
    assert!(
        sleeps >= (2 * ROUNDS) as u64,
        "reactors slept only {sleeps} times"
    );
}
