//! `quern ctl`: the management API's command line. One subcommand per
//! method, built from the same method list and parameter types the server
//! uses (a parameter `num_queues` is `--num-queues`), tables for people by
//! default, `--json` for programs, and `quern ctl rpc METHOD 'JSON'` for
//! anything. A refused call exits 1 with the server's message.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::mgmt::Client;
use crate::rpc;

/// The `ctl` command with a subcommand per method.
pub fn command() -> Command {
    let mut c = Command::new("ctl")
        .about("Talk to a running quern over its management socket")
        .arg(
            Arg::new("socket")
                .long("socket")
                .short('s')
                .value_name("SOCKET")
                .help("The management socket (default: the one --config names, or $TMPDIR/quern/quern.sock)"),
        )
        .arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .value_name("FILE.toml")
                .help("Take the socket from this configuration file"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print the result as JSON"),
        )
        .subcommand_required(true)
        .subcommand(
            Command::new("top")
                .about("A live view: reactors, devices and queues (IOPS, MB/s, latency, throttling), busiest first")
                .arg(
                    Arg::new("once")
                        .long("once")
                        .action(ArgAction::SetTrue)
                        .help("Print one screen, taken over one interval, and exit"),
                )
                .arg(
                    Arg::new("interval")
                        .long("interval")
                        .short('i')
                        .value_name("SECONDS")
                        .default_value("1")
                        .value_parser(clap::value_parser!(f64))
                        .help("Time between refreshes"),
                ),
        )
        .subcommand(
            Command::new("rpc")
                .about("Call any method with JSON parameters")
                .arg(Arg::new("method").required(true))
                .arg(Arg::new("params").help("A JSON object (default {})")),
        );
    for m in rpc::methods() {
        let mut sc = Command::new(m.name).about(m.summary);
        for p in m.params() {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let ty = p["type"].as_str().unwrap_or("string").to_string();
            let mut help = p["description"].as_str().unwrap_or_default().to_string();
            if let Some(values) = p["values"].as_array() {
                let v: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
                help = format!("{help} [{}]", v.join(", "));
            }
            if let Some(d) = p.get("default") {
                help = format!("{help} (default {d})");
            }
            let mut a = Arg::new(name.clone())
                .long(name.replace('_', "-"))
                .help(help.trim().to_string())
                .required(p["required"] == true);
            a = if ty == "boolean" {
                a.num_args(0..=1)
                    .default_missing_value("true")
                    .value_parser(["true", "false"])
                    .value_name("BOOL")
            } else {
                a.value_name(ty.to_uppercase().replace(' ', "_"))
            };
            sc = sc.arg(a);
        }
        c = c.subcommand(sc);
    }
    c
}

/// The parameters a subcommand's arguments give, typed as `rpc_list` says.
fn params_of(method: &rpc::Method, m: &ArgMatches) -> Result<Value, String> {
    let mut out = Map::new();
    for p in method.params() {
        let name = p["name"].as_str().unwrap_or_default();
        let Some(raw) = m.get_one::<String>(name) else {
            continue;
        };
        let ty = p["type"].as_str().unwrap_or("string");
        out.insert(
            name.to_string(),
            typed(raw, ty).map_err(|e| format!("--{}: {e}", name.replace('_', "-")))?,
        );
    }
    Ok(Value::Object(out))
}

fn typed(raw: &str, ty: &str) -> Result<Value, String> {
    let int = |s: &str| -> Result<Value, String> {
        s.trim()
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| s.trim().parse::<i64>().map(Value::from))
            .map_err(|_| format!("`{s}` is not an integer"))
    };
    Ok(match ty {
        "integer" => int(raw)?,
        "boolean" => Value::Bool(raw == "true"),
        "integer or string" => int(raw).unwrap_or_else(|_| Value::String(raw.into())),
        t if t.starts_with("array of ") => {
            let item = &t["array of ".len()..];
            Value::Array(
                raw.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| typed(s.trim(), item))
                    .collect::<Result<_, _>>()?,
            )
        }
        "object" => object(raw)?,
        _ => Value::String(raw.into()),
    })
}

/// An object parameter: JSON (`{"iops": 5000}`) or `key=value` pairs
/// separated by commas (`iops=5000,burst_ms=50`), values typed as
/// integers, booleans or strings.
fn object(raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    if raw.starts_with('{') {
        let v: Value = serde_json::from_str(raw).map_err(|e| format!("not a JSON object: {e}"))?;
        return match v {
            Value::Object(_) => Ok(v),
            _ => Err("not a JSON object".into()),
        };
    }
    let mut out = Map::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not key=value"));
        };
        let v = v.trim();
        let value = typed(v, "integer")
            .or_else(|_| match v {
                "true" | "false" => Ok(Value::Bool(v == "true")),
                _ => Err(()),
            })
            .unwrap_or_else(|_| Value::String(v.into()));
        out.insert(k.trim().to_string(), value);
    }
    Ok(Value::Object(out))
}

fn socket(m: &ArgMatches) -> Result<PathBuf, String> {
    if let Some(s) = m.get_one::<String>("socket") {
        return Ok(PathBuf::from(s));
    }
    if let Some(c) = m.get_one::<String>("config") {
        let cfg = Config::load_unvalidated(std::path::Path::new(c))
            .map_err(|e| format!("invalid configuration: {e}"))?;
        return cfg
            .management_socket()
            .ok_or_else(|| format!("{c} disables the management socket"));
    }
    Ok(std::env::temp_dir().join("quern/quern.sock"))
}

/// Run `quern ctl` with its matches.
pub fn run(m: &ArgMatches) -> ExitCode {
    match try_run(m) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quern ctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn try_run(m: &ArgMatches) -> Result<(), String> {
    let sock = socket(m)?;
    let (name, sub) = m.subcommand().ok_or("no subcommand")?;
    if name == "top" {
        let secs = sub.get_one::<f64>("interval").copied().unwrap_or(1.0);
        if !(0.05..=3600.0).contains(&secs) {
            return Err(format!("--interval {secs}: outside 0.05..=3600 seconds"));
        }
        let mut client = Client::connect(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
        return crate::top::run(
            &mut client,
            std::time::Duration::from_secs_f64(secs),
            sub.get_flag("once"),
        )
        .map_err(|e| format!("{}: {e}", sock.display()));
    }
    let (method, params) = if name == "rpc" {
        let method = sub.get_one::<String>("method").cloned().unwrap_or_default();
        let params = match sub.get_one::<String>("params") {
            Some(p) => serde_json::from_str(p).map_err(|e| format!("params: not JSON: {e}"))?,
            None => json!({}),
        };
        (method, params)
    } else {
        let def = rpc::methods()
            .iter()
            .find(|x| x.name == name)
            .ok_or_else(|| format!("unknown method {name}"))?;
        (name.to_string(), params_of(def, sub)?)
    };
    let mut client = Client::connect(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let result = client
        .call(&method, params)
        .map_err(|e| format!("{}: {e}", sock.display()))?
        .map_err(|e| format!("{} (code {})", e.message, e.code))?;
    if m.get_flag("json") {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    } else {
        print!("{}", render(&method, &result));
    }
    Ok(())
}

/// A result for people: tables for lists, the file for `config_save`.
pub fn render(method: &str, v: &Value) -> String {
    let s = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    match method {
        "bdev_list" => table(
            &["NAME", "DRIVER", "CAPACITY", "BLOCK", "RO", "BASE"],
            v,
            |b| {
                vec![
                    s(&b["name"]),
                    s(&b["driver"]),
                    human_bytes(b["capacity_bytes"].as_u64().unwrap_or(0)),
                    s(&b["block_size"]),
                    s(&b["read_only"]),
                    s(&b["base"]),
                ]
            },
        ),
        "vhost_blk_list" => table(
            &[
                "NAME",
                "BDEV",
                "QUEUES",
                "REACTORS",
                "FRONTEND",
                "COMPLETED",
                "SOCKET",
            ],
            v,
            |d| {
                let q = d["queues"].as_array().cloned().unwrap_or_default();
                let reactors: Vec<String> = q.iter().map(|x| s(&x["reactor"])).collect();
                let done: u64 = q.iter().filter_map(|x| x["completed"].as_u64()).sum();
                vec![
                    s(&d["name"]),
                    s(&d["bdev"]),
                    s(&d["num_queues"]),
                    reactors.join(","),
                    if d["connected"] == true {
                        "attached".into()
                    } else {
                        "-".into()
                    },
                    done.to_string(),
                    s(&d["socket"]),
                ]
            },
        ),
        "reactor_list" => table(
            &[
                "ID", "CORE", "BUSY%", "POLLERS", "IOS", "MERGED", "SLEEPS", "STATE",
            ],
            v,
            |r| {
                let (b, i) = (
                    r["busy_ns"].as_u64().unwrap_or(0),
                    r["idle_ns"].as_u64().unwrap_or(0),
                );
                let busy = 100.0 * b as f64 / (b + i).max(1) as f64;
                let (mi, mo) = (
                    r["merge_requests_in"].as_u64().unwrap_or(0),
                    r["merge_requests_out"].as_u64().unwrap_or(0),
                );
                vec![
                    s(&r["id"]),
                    s(&r["core"]),
                    format!("{busy:.1}"),
                    s(&r["pollers"]),
                    s(&r["ios_completed"]),
                    mi.saturating_sub(mo).to_string(),
                    s(&r["sleeps"]),
                    match &r["failed"] {
                        Value::String(f) => format!("FAILED: {f}"),
                        _ => "running".into(),
                    },
                ]
            },
        ),
        "rpc_list" => {
            let mut out = String::new();
            for m in v.as_array().into_iter().flatten() {
                out += &format!("{}  {}\n", s(&m["name"]), s(&m["summary"]));
                for p in m["params"].as_array().into_iter().flatten() {
                    let req = if p["required"] == true {
                        " (required)"
                    } else {
                        ""
                    };
                    let def = p
                        .get("default")
                        .map_or(String::new(), |d| format!(" [default {d}]"));
                    out += &format!(
                        "    --{} {}{req}{def}\n",
                        s(&p["name"]).replace('_', "-"),
                        s(&p["type"])
                    );
                }
            }
            out
        }
        "config_save" => s(&v["toml"]),
        _ => match v {
            Value::Object(o) if o.contains_key("deleted") => {
                format!("deleted {}\n", s(&v["deleted"]))
            }
            Value::Object(o) if o.contains_key("name") && method.ends_with("_create") => {
                format!("created {}\n", s(&v["name"]))
            }
            other => format!(
                "{}\n",
                serde_json::to_string_pretty(other).unwrap_or_default()
            ),
        },
    }
}

fn table(head: &[&str], v: &Value, row: impl Fn(&Value) -> Vec<String>) -> String {
    let rows: Vec<Vec<String>> = v.as_array().into_iter().flatten().map(row).collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l += c;
            } else {
                l += &format!("{c:<width$}  ", width = w[i]);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_typed_as_the_schema_says() {
        assert_eq!(typed("4", "integer").unwrap(), json!(4));
        assert!(typed("four", "integer").unwrap_err().contains("four"));
        assert_eq!(typed("64M", "integer or string").unwrap(), json!("64M"));
        assert_eq!(typed("4096", "integer or string").unwrap(), json!(4096));
        assert_eq!(typed("0,1", "array of integer").unwrap(), json!([0, 1]));
        assert_eq!(typed("true", "boolean").unwrap(), json!(true));
    }

    #[test]
    fn every_method_has_a_subcommand_whose_flags_parse() {
        let c = command();
        for m in rpc::methods() {
            assert!(c.find_subcommand(m.name).is_some(), "{}", m.name);
        }
        let m = command()
            .try_get_matches_from([
                "ctl",
                "bdev_create",
                "--name",
                "m",
                "--driver",
                "malloc",
                "--size",
                "16M",
            ])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        let def = rpc::methods()
            .iter()
            .find(|x| x.name == "bdev_create")
            .unwrap();
        assert_eq!(
            params_of(def, sub).unwrap(),
            json!({"name": "m", "driver": "malloc", "size": "16M"})
        );
        let m = command()
            .try_get_matches_from(["ctl", "vhost_blk_delete", "--name", "d", "--force"])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        let def = rpc::methods()
            .iter()
            .find(|x| x.name == "vhost_blk_delete")
            .unwrap();
        assert_eq!(
            params_of(def, sub).unwrap(),
            json!({"name": "d", "force": true})
        );
    }

    #[test]
    fn lists_render_as_tables() {
        let v = json!([{"name": "m0", "driver": "malloc", "capacity_bytes": 16777216, "block_size": 512, "read_only": false, "base": null}]);
        let t = render("bdev_list", &v);
        assert!(t.starts_with("NAME"), "{t}");
        assert!(t.contains("m0") && t.contains("16M"), "{t}");
    }
}
