//! The VM layer against real QEMU: VMs Quern starts and VMs it attaches
//! to, disks inserted and removed under names that never change (checked
//! against what the guest itself lists: every /sys/block/vd* and its
//! serial), Quern restarted between steps, and QMP faults.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quern::engine::codes;
use quern_tests::{disk_tempdir, guest_dir, QuernProcess};
use serde_json::{json, Value};

const CONFIG: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "blk"
driver = "malloc"
size = "16M"
"#;

/// `n` one-queue devices d0..d{n-1} on the shared bdev; their UUIDs.
fn devices(q: &QuernProcess, range: std::ops::Range<usize>) {
    for i in range {
        q.ok("vhost_blk_create",
            json!({"name": format!("d{i}"), "bdev": "blk", "socket": format!("d{i}.sock"), "read_only": true}),
        );
    }
}

/// The guest's console (disks mode of the test initramfs).
struct Console {
    s: UnixStream,
    r: BufReader<UnixStream>,
}

impl Console {
    fn connect(path: &Path) -> Console {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("console {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Console { s, r }
    }

    /// The guest's disks: name → serial.
    fn list(&mut self) -> Option<Vec<(String, String)>> {
        self.s.write_all(b"list\n").ok()?;
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match self.r.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
            let l = line.trim();
            if l == "QUERN-LIST-END" {
                out.sort();
                return Some(out);
            }
            if let Some(rest) = l.strip_prefix("QUERN-DISK ") {
                let mut w = rest.split_whitespace();
                let name = w.next().unwrap_or_default().to_string();
                let serial = w.next().unwrap_or_default().to_string();
                out.push((name, serial));
            }
        }
    }

    /// Wait until the guest lists exactly `want`, for up to `secs`.
    fn expect(&mut self, want: &[(String, String)], secs: u64, step: &str) {
        let t0 = Instant::now();
        let mut last = None;
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Some(got) = self.list() {
                if got == want {
                    return;
                }
                last = Some(got);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("{step}: the guest lists\n{last:?}\nQuern's map says\n{want:?}");
    }
}

/// What the guest should list for a VM, from Quern's map: each attached
/// disk under its name with its serial, each placeholder as quern-gap.
fn expected(q: &QuernProcess, vm: &str) -> Vec<(String, String)> {
    let m = q.ok("vm_disks", json!({"vm": vm}));
    let list = q.ok("vhost_blk_list", json!({}));
    let serial_of = |dev: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == dev)
            .map(|d| d["serial"].as_str().unwrap().to_string())
            .unwrap()
    };
    let mut out: Vec<(String, String)> = m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["attached"] == true)
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                serial_of(d["device"].as_str().unwrap()),
            )
        })
        .collect();
    for p in m["placeholders"].as_array().unwrap() {
        out.push((p.as_str().unwrap().to_string(), "quern-gap".into()));
    }
    for f in m["foreign"].as_array().unwrap() {
        out.push((f.as_str().unwrap().to_string(), "foreign".into()));
    }
    out.sort();
    out
}

fn name_of(q: &QuernProcess, vm: &str, dev: &str) -> String {
    let m = q.ok("vm_disks", json!({"vm": vm}));
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == dev)
        .map(|d| d["name"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn uuid_of(q: &QuernProcess, dev: &str) -> String {
    let list = q.ok("vhost_blk_list", json!({}));
    list.as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == dev)
        .map(|d| d["uuid"].as_str().unwrap().to_string())
        .unwrap()
}

fn vm_spec(name: &str, disks: &[&str]) -> Value {
    let g = guest_dir();
    json!({
        "name": name,
        "kernel": g.join("vmlinuz"),
        "initrd": g.join("initrd-fio.gz"),
        "append": "console=ttyS0 quiet panic=-1 quern.mode=disks",
        "disks": disks,
        "memory_mib": 256,
        "vcpus": 1,
        "accel": ["tcg"],
    })
}

fn state(q: &QuernProcess, vm: &str) -> (String, String) {
    let l = q.ok("vm_list", json!({}));
    let v = l
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vm)
        .unwrap_or_else(|| panic!("{vm} not in {l}"));
    (
        v["state"].as_str().unwrap_or_default().to_string(),
        v["detail"].as_str().unwrap_or_default().to_string(),
    )
}

/// Boot with two disks, insert a third, remove the second, restart Quern,
/// re-insert the second, refuse a different disk asking for the second's
/// name, remove the second again and insert a new disk while its name is
/// reserved, reset the VM, then insert until more than 26 disks: after
/// every step the guest's names and serials are Quern's map.
#[test]
fn disks_keep_their_names_through_inserts_removes_restarts_and_reboots() {
    let dir = disk_tempdir("quern-vm");
    let mut q = QuernProcess::start(dir.path(), CONFIG);
    q.wait_ready(Duration::from_secs(20));
    devices(&q, 0..30);
    let created = q.ok("vm_create", vm_spec("vm0", &["d0", "d1"]));
    assert_eq!(created["state"], "running", "{created}");
    let console = PathBuf::from(created["console"].as_str().unwrap());
    let mut c = Console::connect(&console);
    c.expect(&expected(&q, "vm0"), 120, "boot with two disks");
    assert_eq!(name_of(&q, "vm0", "d0"), "vda");
    assert_eq!(name_of(&q, "vm0", "d1"), "vdb");

    let r = q.ok("vm_disk_insert", json!({"vm": "vm0", "device": "d2"}));
    assert_eq!(r["name"], "vdc", "{r}");
    c.expect(&expected(&q, "vm0"), 60, "insert a third");
    // inserting it again changes nothing
    let again = q.ok("vm_disk_insert", json!({"vm": "vm0", "device": "d2"}));
    assert_eq!(
        (again["name"].clone(), again["inserted"].clone()),
        (json!("vdc"), json!(false))
    );

    let r = q.ok("vm_disk_remove", json!({"vm": "vm0", "device": "d1"}));
    assert_eq!(r["reserved"], true);
    c.expect(&expected(&q, "vm0"), 60, "remove the second");

    // Quern restarts (SIGKILL); the VM runs on and Quern carries on
    drop(c);
    q.kill();
    q.restart();
    q.wait_ready(Duration::from_secs(20));
    assert_eq!(state(&q, "vm0").0, "running");
    let mut c = Console::connect(&console);
    c.expect(&expected(&q, "vm0"), 60, "after a Quern restart");

    let r = q.ok("vm_disk_insert", json!({"vm": "vm0", "device": "d1"}));
    assert_eq!(r["name"], "vdb", "the second gets its name back: {r}");
    c.expect(&expected(&q, "vm0"), 60, "re-insert the second");

    // a different disk asking for the second's name is refused, naming it
    let e = q.err(
        "vm_disk_insert",
        json!({"vm": "vm0", "device": "d3", "name": "vdb"}),
    );
    assert_eq!(e.code, codes::IN_USE);
    assert!(e.message.contains(&uuid_of(&q, "d1")), "{e}");

    // while the second's name is reserved, a new disk gets the next one
    q.ok("vm_disk_remove", json!({"vm": "vm0", "device": "d1"}));
    let r = q.ok("vm_disk_insert", json!({"vm": "vm0", "device": "d3"}));
    assert_eq!(r["name"], "vdd", "{r}");
    c.expect(&expected(&q, "vm0"), 60, "a new disk while vdb is reserved");

    // a reboot: the same names
    q.ok("vm_reset", json!({"name": "vm0"}));
    std::thread::sleep(Duration::from_secs(2));
    drop(c);
    let mut c = Console::connect(&console);
    c.expect(&expected(&q, "vm0"), 120, "after a reboot");

    // beyond 26: vdaa and on
    for i in 4..30 {
        q.ok(
            "vm_disk_insert",
            json!({"vm": "vm0", "device": format!("d{i}")}),
        );
        if i == 10 {
            // another restart in the middle
            drop(c);
            q.kill();
            q.restart();
            q.wait_ready(Duration::from_secs(20));
            c = Console::connect(&console);
        }
    }
    assert_eq!(name_of(&q, "vm0", "d29"), "vdad");
    c.expect(&expected(&q, "vm0"), 120, "30 disks");
    // release the reserved name: the next new disk may take it
    q.ok("vm_disk_release", json!({"vm": "vm0", "device": "d1"}));
    assert_eq!(name_of(&q, "vm0", "d1"), "");
    let e = q.err("vm_disk_remove", json!({"vm": "vm0", "device": "d1"}));
    assert_eq!(e.code, codes::NOT_FOUND);
    // a disk of a VM cannot be deleted from under it
    let e = q.err("vhost_blk_delete", json!({"name": "d0"}));
    assert!(e.code == codes::IN_USE && e.message.contains("vm0"), "{e}");

    q.ok("vm_stop", json!({"name": "vm0", "force": true}));
    let (st, detail) = state(&q, "vm0");
    assert_eq!(st, "shut down", "{detail}");
    q.ok("vm_delete", json!({"name": "vm0"}));
    assert!(q.stop());
}

/// A QEMU the test starts itself (with Quern's bridge and its own virtio
/// disk), controlled by vm_attach: Quern's first disk is vdb, and insert
/// and remove work as on its own VMs.
#[test]
fn vm_attach_controls_a_qemu_started_elsewhere() {
    let dir = disk_tempdir("quern-vmattach");
    let mut q = QuernProcess::start(dir.path(), CONFIG);
    q.wait_ready(Duration::from_secs(20));
    devices(&q, 0..2);
    let qmp = dir.path().join("other-qmp.sock");
    let console = dir.path().join("other-console.sock");
    let mut qemu = own_qemu(dir.path(), &qmp, &console);
    let r = q.ok("vm_attach", json!({"name": "other", "qmp_socket": qmp}));
    assert_eq!(r["owner"], "attached", "{r}");
    let mut c = Console::connect(&console);
    let r = q.ok("vm_disk_insert", json!({"vm": "other", "device": "d0"}));
    assert_eq!(r["name"], "vdb", "its own disk holds vda: {r}");
    q.ok("vm_disk_insert", json!({"vm": "other", "device": "d1"}));
    // the foreign disk's serial is its own
    let fix = |mut v: Vec<(String, String)>| {
        for e in &mut v {
            if e.1 == "foreign" {
                e.1 = "test-own-disk".into();
            }
        }
        v.sort();
        v
    };
    c.expect(
        &fix(expected(&q, "other")),
        120,
        "attached, two disks inserted",
    );
    q.ok("vm_disk_remove", json!({"vm": "other", "device": "d0"}));
    c.expect(&fix(expected(&q, "other")), 60, "attached, one removed");
    // forgetting it leaves the QEMU running
    q.ok("vm_delete", json!({"name": "other"}));
    assert!(
        qemu.try_wait().unwrap().is_none(),
        "vm_delete killed an attached QEMU"
    );
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(q.stop());
}

/// A QEMU as an orchestrator would start it for Quern: guest RAM shared,
/// Quern's PCI bridge, a QMP socket, and a virtio disk of its own.
fn own_qemu(dir: &Path, qmp: &Path, console: &Path) -> Child {
    let g = guest_dir();
    Command::new("qemu-system-x86_64")
        .args([
            "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", "256M",
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=con,path={},server=on,wait=off",
            console.display()
        ))
        .args(["-serial", "chardev:con"])
        .arg("-kernel")
        .arg(g.join("vmlinuz"))
        .arg("-initrd")
        .arg(g.join("initrd-fio.gz"))
        .args(["-append", "console=ttyS0 quiet panic=-1 quern.mode=disks"])
        .args([
            "-device",
            "pci-bridge,id=quern-br0,chassis_nr=1,bus=pci.0,addr=0x10",
        ])
        .args([
            "-blockdev",
            "driver=null-co,node-name=own,size=1048576,read-zeroes=on",
        ])
        .args([
            "-device",
            "virtio-blk-pci,drive=own,serial=test-own-disk,bus=pci.0,addr=0x5",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("other-qemu.log")).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64")
}

/// QMP faults: a socket that speaks garbage; a guest that does not let go
/// of a disk (paused) and lets go later; QEMU killed in the middle of an
/// insert. Quern's map stays what QEMU and the guest have, and each error
/// names what failed.
#[test]
fn qmp_faults_leave_the_map_consistent() {
    let dir = disk_tempdir("quern-vmfault");
    let mut q = QuernProcess::start(dir.path(), CONFIG);
    q.wait_ready(Duration::from_secs(20));
    devices(&q, 0..4);

    // garbage on a QMP socket
    let bogus = dir.path().join("bogus.sock");
    let l = UnixListener::bind(&bogus).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten().take(1) {
            let mut s = s;
            let _ = s.write_all(b"\x01\x02 this is not QMP\n");
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let e = q.err("vm_attach", json!({"name": "bogus", "qmp_socket": bogus}));
    assert!(
        e.code == codes::FAILED && e.message.contains("not a QMP greeting"),
        "{e}"
    );
    let e = q.err(
        "vm_attach",
        json!({"name": "none", "qmp_socket": dir.path().join("none.sock")}),
    );
    assert!(e.message.contains("cannot connect"), "{e}");
    assert_eq!(q.ok("vm_list", json!({})), json!([]));

    let created = q.ok("vm_create", vm_spec("vm1", &["d0", "d1"]));
    let mut c = Console::connect(Path::new(created["console"].as_str().unwrap()));
    c.expect(&expected(&q, "vm1"), 120, "boot");

    // a guest that does not let go (paused): an error, nothing freed
    q.ok("vm_pause", json!({"name": "vm1"}));
    assert_eq!(state(&q, "vm1").0, "paused");
    let e = q.err(
        "vm_disk_remove",
        json!({"vm": "vm1", "device": "d1", "timeout_secs": 3}),
    );
    assert!(e.message.contains("did not release vdb"), "{e}");
    let m = q.ok("vm_disks", json!({"vm": "vm1"}));
    assert_eq!(m["disks"][1]["attached"], true, "{m}");
    // it lets go once running again: Quern finishes the removal
    q.ok("vm_resume", json!({"name": "vm1"}));
    let t0 = Instant::now();
    while q.ok("vm_disks", json!({"vm": "vm1"}))["disks"][1]["attached"] == true {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the late removal never finished"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.expect(&expected(&q, "vm1"), 60, "after the late release");

    // QEMU killed while an insert is under way (re-inserting d1 first
    // removes its placeholder, and waits for the guest)
    let pid = q.ok("vm_list", json!({}))[0]["pid"].as_u64().unwrap() as i32;
    let sock = q.mgmt_socket();
    let inserter = std::thread::spawn(move || {
        let mut c = quern::mgmt::Client::connect(&sock).unwrap();
        c.call("vm_disk_insert", json!({"vm": "vm1", "device": "d1"}))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: killing the QEMU this test had Quern start.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let r = inserter.join().unwrap();
    eprintln!("insert under a QEMU killed 30 ms in: {r:?}");
    let m = q.ok("vm_disks", json!({"vm": "vm1"}));
    match r {
        Err(e) => {
            assert!(
                e.message.contains("QMP connection closed") || e.message.contains("is crashed"),
                "{e:?}"
            );
            assert_eq!(
                m["disks"][1]["attached"], false,
                "a failed insert recorded: {m}"
            );
        }
        Ok(v) => assert_eq!(m["disks"][1]["attached"], true, "{v} {m}"),
    }
    let t0 = Instant::now();
    while state(&q, "vm1").0 != "crashed" {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            state(&q, "vm1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        state(&q, "vm1").1.contains("signal 9"),
        "{:?}",
        state(&q, "vm1")
    );
    let e = q.err("vm_disk_insert", json!({"vm": "vm1", "device": "d2"}));
    assert!(e.message.contains("crashed"), "{e}");
    // started again, the guest has the map's names
    let r = q.ok("vm_start", json!({"name": "vm1"}));
    assert_eq!(r["state"], "running");
    drop(c);
    let mut c = Console::connect(Path::new(created["console"].as_str().unwrap()));
    c.expect(&expected(&q, "vm1"), 120, "started again after the crash");
    // bad specs are refused naming the key
    let mut bad = vm_spec("vm2", &["d3"]);
    bad["machine"] = json!("q35");
    let e = q.err("vm_create", bad);
    assert!(
        e.code == codes::INVALID_PARAMS && e.message.contains("machine"),
        "{e}"
    );
    let e = q.err("vm_create", vm_spec("vm2", &["d0"]));
    assert!(e.code == codes::IN_USE && e.message.contains("vm1"), "{e}");
    let e = q.err("vm_delete", json!({"name": "vm1"}));
    assert_eq!(e.code, codes::IN_USE);
    q.ok("vm_delete", json!({"name": "vm1", "force": true}));
    assert!(q.stop());
}
