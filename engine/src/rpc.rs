//! The management API: JSON-RPC 2.0 methods over the engine.
//!
//! One request object per line, one response per line; a batch (an array
//! of requests) gets one array of responses. Errors carry JSON-RPC's codes
//! (-32700 parse error, -32600 invalid request, -32601 unknown method,
//! -32602 invalid params, naming the parameter and why) or Quern's stable
//! application codes ([`crate::engine::codes`]).
//!
//! Each method's parameters are a Rust type: the TOML table's own type for
//! the `*_create` methods, so they take exactly the table's keys and are
//! checked by the same code. `rpc_list` describes every method from the
//! same types' JSON schemas, and `quern ctl` builds its subcommands from
//! that description: nothing is written twice.

use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::{BdevSection, QosGroupSection, QosLimits, VhostBlkSection};
use crate::engine::{codes, vm_error, ApiError, Engine};

/// Most requests in one batch.
pub const MAX_BATCH: usize = 128;

/// A method's parameters when it takes none.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// An object by name.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    /// The object's name.
    pub name: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceDeleteParams {
    /// The device's name.
    pub name: String,
    /// Delete it even with a frontend attached: its requests fail with an
    /// I/O error from then on, until the frontend lets go.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQosParams {
    /// The device's name.
    pub name: String,
    /// Its new limits (all zero or {}: none).
    pub qos: QosLimits,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQosGroupParams {
    /// The device's name.
    pub name: String,
    /// The qos_group it joins (absent: it leaves its group).
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LatencyParams {
    /// The device's name.
    pub name: String,
    /// Start a new interval after reading.
    #[serde(default)]
    pub reset: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BdevLatencyParams {
    /// The bdev's name (absent: every bdev).
    #[serde(default)]
    pub name: Option<String>,
    /// Start a new interval after reading.
    #[serde(default)]
    pub reset: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatsParams {
    /// Add each queue's latency histogram buckets (for `quern ctl top`).
    #[serde(default)]
    pub buckets: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetHistogramsParams {
    /// Keep latency histograms (true) or stop (false).
    pub enabled: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmAttachParams {
    /// The name Quern will know the VM by.
    pub name: String,
    /// The QEMU's QMP socket (a UNIX socket QEMU listens on).
    pub qmp_socket: std::path::PathBuf,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStopParams {
    /// The VM's name.
    pub name: String,
    /// Quit QEMU at once instead of asking the guest to power off.
    #[serde(default)]
    pub force: bool,
    /// How long the guest has to power off.
    #[serde(default = "sixty")]
    pub timeout_secs: u64,
}

fn sixty() -> u64 {
    60
}
fn thirty() -> u64 {
    30
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDeleteParams {
    /// The VM's name.
    pub name: String,
    /// Delete it even while it runs (a QEMU Quern started is quit; an
    /// attached one is left running).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmParams {
    /// The VM's name.
    pub vm: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskInsertParams {
    /// The VM's name.
    pub vm: String,
    /// The Quern device (vhost_blk) to insert.
    pub device: String,
    /// The name to give a disk the VM has never had (vdb, vdaa, ...);
    /// default the lowest free one. Refused if another disk holds it.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskRemoveParams {
    /// The VM's name.
    pub vm: String,
    /// The device to unplug.
    pub device: String,
    /// How long the guest has to let go of the disk.
    #[serde(default = "thirty")]
    pub timeout_secs: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskReleaseParams {
    /// The VM's name.
    pub vm: String,
    /// The removed device whose name is to be freed.
    pub device: String,
}

type Call = Box<dyn Fn(&Engine, Value) -> Result<Value, ApiError> + Send + Sync>;

/// One method of the API.
pub struct Method {
    pub name: &'static str,
    pub summary: &'static str,
    /// Whether it changes the engine (logged with the caller's identity).
    pub mutating: bool,
    schema: fn() -> Value,
    call: Call,
}

impl Method {
    fn new<P: DeserializeOwned + JsonSchema + 'static>(
        name: &'static str,
        summary: &'static str,
        mutating: bool,
        f: fn(&Engine, P) -> Result<Value, ApiError>,
    ) -> Method {
        Method {
            name,
            summary,
            mutating,
            schema: || serde_json::to_value(schemars::schema_for!(P)).unwrap_or(Value::Null),
            call: Box::new(move |e, v| f(e, params::<P>(v)?)),
        }
    }

    /// The parameters as `rpc_list` shows them.
    pub fn params(&self) -> Vec<Value> {
        describe_params(&(self.schema)())
    }
}

/// Every method, in the order `rpc_list` gives them.
pub fn methods() -> &'static [Method] {
    static M: OnceLock<Vec<Method>> = OnceLock::new();
    M.get_or_init(|| {
        vec![
            Method::new::<BdevSection>(
                "bdev_create",
                "Create a bdev; takes the keys of a [[bdev]] table",
                true,
                |e, p| e.bdev_create(p),
            ),
            Method::new::<NameParams>(
                "bdev_delete",
                "Delete a bdev no device or overlay uses",
                true,
                |e, p| e.bdev_delete(&p.name),
            ),
            Method::new::<NoParams>("bdev_list", "The bdevs", false, |e, _| Ok(e.bdev_list())),
            Method::new::<VhostBlkSection>(
                "vhost_blk_create",
                "Create a vhost-user-blk device; takes the keys of a [[vhost_blk]] table",
                true,
                |e, p| e.vhost_blk_create(p),
            ),
            Method::new::<DeviceDeleteParams>(
                "vhost_blk_delete",
                "Delete a device (refused with a frontend attached unless force)",
                true,
                |e, p| e.vhost_blk_delete(&p.name, p.force),
            ),
            Method::new::<NoParams>(
                "vhost_blk_list",
                "The devices, each queue's reactor and whether a frontend is attached",
                false,
                |e, _| Ok(e.vhost_blk_list()),
            ),
            Method::new::<SetQosParams>(
                "vhost_blk_set_qos",
                "Set a device's QoS limits (IOPS, bytes/s; 0 clears), across all its queues",
                true,
                |e, p| e.vhost_blk_set_qos(&p.name, p.qos),
            ),
            Method::new::<SetQosGroupParams>(
                "vhost_blk_set_qos_group",
                "Put a device in a qos_group, move it, or take it out (no group)",
                true,
                |e, p| e.vhost_blk_set_qos_group(&p.name, p.group),
            ),
            Method::new::<LatencyParams>(
                "vhost_blk_latency",
                "A device's latency per queue and operation (µs percentiles), since creation or reset",
                false,
                |e, p| e.vhost_blk_latency(&p.name, p.reset),
            ),
            Method::new::<BdevLatencyParams>(
                "bdev_latency",
                "The bdevs' own service time (µs percentiles), since creation or reset",
                false,
                |e, p| e.bdev_latency(p.name.as_deref(), p.reset),
            ),
            Method::new::<SetHistogramsParams>(
                "metrics_set_histograms",
                "Switch the latency histograms of every device and bdev on or off (kept across restarts)",
                true,
                |e, p| e.metrics_set_histograms(p.enabled),
            ),
            Method::new::<QosGroupSection>(
                "qos_group_create",
                "Create a QoS group (limits shared by its devices); takes the keys of a [[qos_group]] table",
                true,
                |e, p| e.qos_group_create(p),
            ),
            Method::new::<QosGroupSection>(
                "qos_group_set",
                "Change a QoS group's limits",
                true,
                |e, p| e.qos_group_set(p),
            ),
            Method::new::<NameParams>(
                "qos_group_delete",
                "Delete a QoS group no device is in",
                true,
                |e, p| e.qos_group_delete(&p.name),
            ),
            Method::new::<NoParams>(
                "qos_group_list",
                "The QoS groups, their limits, devices and throttling",
                false,
                |e, _| Ok(e.qos_group_list()),
            ),
            Method::new::<quern_vm::VmSpec>(
                "vm_create",
                "Start and supervise a QEMU VM from a spec (its disks get vda, vdb, ... in order)",
                true,
                |e, p| e.vms.create(p).map_err(vm_error),
            ),
            Method::new::<VmAttachParams>(
                "vm_attach",
                "Control a QEMU started elsewhere through its QMP socket",
                true,
                |e, p| e.vms.attach(&p.name, &p.qmp_socket).map_err(vm_error),
            ),
            Method::new::<NoParams>(
                "vm_list",
                "The VMs: state (running, paused, shut down, crashed), QEMU's exit status, disks",
                false,
                |e, _| Ok(e.vms.list()),
            ),
            Method::new::<NameParams>(
                "vm_start",
                "Start again a VM Quern runs that is shut down or crashed",
                true,
                |e, p| e.vms.start(&p.name).map_err(vm_error),
            ),
            Method::new::<VmStopParams>(
                "vm_stop",
                "Power a VM off (ACPI), or quit its QEMU with force",
                true,
                |e, p| {
                    e.vms
                        .stop(&p.name, p.force, std::time::Duration::from_secs(p.timeout_secs))
                        .map_err(vm_error)
                },
            ),
            Method::new::<NameParams>("vm_reset", "Reset a VM (the guest boots again)", true, |e, p| {
                e.vms.reset(&p.name).map_err(vm_error)
            }),
            Method::new::<NameParams>("vm_pause", "Pause a VM's vCPUs", true, |e, p| {
                e.vms.pause(&p.name, true).map_err(vm_error)
            }),
            Method::new::<NameParams>("vm_resume", "Resume a paused VM", true, |e, p| {
                e.vms.pause(&p.name, false).map_err(vm_error)
            }),
            Method::new::<VmDeleteParams>(
                "vm_delete",
                "Forget a VM (refused while it runs unless force)",
                true,
                |e, p| e.vms.delete(&p.name, p.force).map_err(vm_error),
            ),
            Method::new::<DiskInsertParams>(
                "vm_disk_insert",
                "Hot-plug a device into a VM under the name its UUID has there (or the lowest free)",
                true,
                |e, p| {
                    e.vms
                        .disk_insert(&p.vm, &p.device, p.name.as_deref())
                        .map_err(vm_error)
                },
            ),
            Method::new::<DiskRemoveParams>(
                "vm_disk_remove",
                "Unplug a disk once the guest lets go; its name stays reserved",
                true,
                |e, p| {
                    e.vms
                        .disk_remove(&p.vm, &p.device, std::time::Duration::from_secs(p.timeout_secs))
                        .map_err(vm_error)
                },
            ),
            Method::new::<DiskReleaseParams>(
                "vm_disk_release",
                "Free the reserved name of a removed disk",
                true,
                |e, p| e.vms.disk_release(&p.vm, &p.device).map_err(vm_error),
            ),
            Method::new::<VmParams>(
                "vm_disks",
                "A VM's disk map: UUID, name, device, attached or reserved",
                false,
                |e, p| e.vms.disks_of(&p.vm).map_err(vm_error),
            ),
            Method::new::<NoParams>(
                "reactor_list",
                "The reactors: core, busy and idle time, I/O and merge counters, failure",
                false,
                |e, _| Ok(e.reactor_list()),
            ),
            Method::new::<StatsParams>(
                "stats",
                "Reactors, bdevs and devices at once",
                false,
                |e, p| Ok(e.stats(p.buckets)),
            ),
            Method::new::<NoParams>(
                "config_save",
                "The whole current state as a configuration file quern --config accepts",
                false,
                |e, _| Ok(json!({ "toml": e.config_save() })),
            ),
            Method::new::<NoParams>(
                "rpc_list",
                "Every method with its parameters, their types and defaults",
                false,
                |_, _| Ok(rpc_list()),
            ),
            Method::new::<NoParams>("version", "Quern's version", false, |_, _| {
                Ok(json!({ "version": env!("CARGO_PKG_VERSION") }))
            }),
        ]
    })
}

fn rpc_list() -> Value {
    Value::Array(
        methods()
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "summary": m.summary,
                    "mutating": m.mutating,
                    "params": m.params(),
                })
            })
            .collect(),
    )
}

/// A method's parameters from the request's `params`, or -32602 naming the
/// parameter and why.
fn params<P: DeserializeOwned>(v: Value) -> Result<P, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let at = e.path().to_string();
        let msg = e.into_inner().to_string();
        let msg = if at == "." || at.is_empty() {
            msg
        } else {
            format!("{at}: {msg}")
        };
        ApiError::new(codes::INVALID_PARAMS, format!("invalid params: {msg}"))
    })
}

/// Who asked (from the socket's peer credentials), for the log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
}

/// The answer to one line: `None` when it held only notifications.
pub fn handle_line(engine: &Engine, line: &str, caller: Caller) -> Option<Value> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_response(
                Value::Null,
                ApiError::new(codes::PARSE_ERROR, format!("parse error: {e}")),
            ))
        }
    };
    match v {
        Value::Array(reqs) if reqs.is_empty() => Some(error_response(
            Value::Null,
            ApiError::new(codes::INVALID_REQUEST, "invalid request: an empty batch"),
        )),
        Value::Array(reqs) if reqs.len() > MAX_BATCH => Some(error_response(
            Value::Null,
            ApiError::new(
                codes::INVALID_REQUEST,
                format!(
                    "invalid request: a batch of {} requests, more than {MAX_BATCH}",
                    reqs.len()
                ),
            ),
        )),
        Value::Array(reqs) => {
            let out: Vec<Value> = reqs
                .into_iter()
                .filter_map(|r| handle_request(engine, r, caller))
                .collect();
            (!out.is_empty()).then_some(Value::Array(out))
        }
        other => handle_request(engine, other, caller),
    }
}

/// One request object; `None` for a notification (no `id`).
fn handle_request(engine: &Engine, req: Value, caller: Caller) -> Option<Value> {
    let Value::Object(mut obj) = req else {
        return Some(error_response(
            Value::Null,
            ApiError::new(codes::INVALID_REQUEST, "invalid request: not an object"),
        ));
    };
    let id = obj.remove("id");
    let is_notification = id.is_none();
    let id = id.unwrap_or(Value::Null);
    let answer = |r: Result<Value, ApiError>| {
        if is_notification {
            return None;
        }
        Some(match r {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id.clone(), "result": result}),
            Err(e) => error_response(id.clone(), e),
        })
    };
    if !matches!(id, Value::Null | Value::String(_) | Value::Number(_)) {
        return Some(error_response(
            Value::Null,
            ApiError::new(
                codes::INVALID_REQUEST,
                "invalid request: id must be a string, a number or null",
            ),
        ));
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return answer(Err(ApiError::new(
            codes::INVALID_REQUEST,
            "invalid request: jsonrpc must be \"2.0\"",
        )));
    }
    let Some(Value::String(method)) = obj.remove("method") else {
        return answer(Err(ApiError::new(
            codes::INVALID_REQUEST,
            "invalid request: method must be a string",
        )));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "jsonrpc" | "params"))
    {
        return answer(Err(ApiError::new(
            codes::INVALID_REQUEST,
            format!("invalid request: unknown member `{k}`"),
        )));
    }
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return answer(Err(ApiError::new(
                codes::INVALID_PARAMS,
                "invalid params: params must be an object of named parameters",
            )))
        }
    };
    let Some(m) = methods().iter().find(|m| m.name == method) else {
        return answer(Err(ApiError::new(
            codes::METHOD_NOT_FOUND,
            format!(
                "unknown method `{}` (rpc_list lists them)",
                method.escape_debug()
            ),
        )));
    };
    if m.mutating {
        tracing::info!(method = m.name, pid = caller.pid, uid = caller.uid, %params, "management call");
    }
    let r = (m.call)(engine, params);
    if m.mutating {
        if let Err(e) = &r {
            tracing::warn!(
                method = m.name,
                pid = caller.pid,
                code = e.code,
                "refused: {}",
                e.message
            );
        }
    }
    answer(r)
}

pub fn error_response(id: Value, e: ApiError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

/// A simplified view of a parameters schema: one entry per parameter with
/// its name, type, whether it is required, its default and description.
fn describe_params(schema: &Value) -> Vec<Value> {
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, p)| {
            let mut d = json!({
                "name": name,
                "type": type_of(p, &defs),
                "required": required.contains(&name.as_str()),
            });
            if let Some(def) = p.get("default") {
                d["default"] = def.clone();
            }
            let desc = p
                .get("description")
                .or_else(|| resolve(p, &defs).and_then(|r| r.get("description")));
            if let Some(desc) = desc {
                d["description"] = desc.clone();
            }
            if let Some(values) = enum_values(p, &defs) {
                d["values"] = Value::Array(values);
            }
            d
        })
        .collect()
}

fn resolve<'a>(p: &'a Value, defs: &'a Value) -> Option<&'a Value> {
    let r = p.get("$ref")?.as_str()?;
    defs.get(r.rsplit('/').next()?)
}

fn enum_values(p: &Value, defs: &Value) -> Option<Vec<Value>> {
    let t = resolve(p, defs).unwrap_or(p);
    if let Some(e) = t.get("enum").and_then(Value::as_array) {
        return Some(e.clone());
    }
    // documented variants: oneOf [{const, description}, ...]
    let one = t.get("oneOf")?.as_array()?;
    let v: Vec<Value> = one.iter().filter_map(|x| x.get("const").cloned()).collect();
    (!v.is_empty()).then_some(v)
}

/// A parameter's type in words: `string`, `integer`, `boolean`,
/// `array of integer`, `one of ...`, `integer or string`.
fn type_of(p: &Value, defs: &Value) -> String {
    if let Some(r) = resolve(p, defs) {
        return type_of(r, defs);
    }
    if enum_values(p, defs).is_some() {
        return "string".into();
    }
    for k in ["anyOf", "oneOf"] {
        if let Some(alts) = p.get(k).and_then(Value::as_array) {
            let mut ts: Vec<String> = alts
                .iter()
                .map(|a| type_of(a, defs))
                .filter(|t| t != "null")
                .collect();
            ts.dedup();
            return ts.join(" or ");
        }
    }
    match &p["type"] {
        Value::String(t) if t == "array" => format!("array of {}", type_of(&p["items"], defs)),
        Value::String(t) => t.clone(),
        Value::Array(ts) => {
            let ts: Vec<String> = ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .map(|t| {
                    if t == "array" {
                        format!("array of {}", type_of(&p["items"], defs))
                    } else {
                        t.to_string()
                    }
                })
                .collect();
            ts.join(" or ")
        }
        _ => "any".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param<'a>(m: &'a [Value], name: &str) -> &'a Value {
        m.iter().find(|p| p["name"] == name).expect(name)
    }

    #[test]
    fn rpc_list_describes_parameters_from_the_table_types() {
        let m = methods().iter().find(|m| m.name == "bdev_create").unwrap();
        let p = m.params();
        assert_eq!(param(&p, "name")["type"], "string");
        assert_eq!(param(&p, "name")["required"], true);
        assert_eq!(param(&p, "driver")["type"], "string");
        let values = param(&p, "driver")["values"].as_array().unwrap();
        assert!(values.iter().any(|v| v == "qcow2"), "{values:?}");
        assert_eq!(param(&p, "direct")["default"], true);
        assert_eq!(param(&p, "size")["type"], "integer or string");
        assert_eq!(param(&p, "read_only")["required"], false);
        let d = methods()
            .iter()
            .find(|m| m.name == "vhost_blk_create")
            .unwrap();
        let p = d.params();
        assert_eq!(param(&p, "num_queues")["default"], 1);
        assert_eq!(param(&p, "cores")["type"], "array of integer");
        let del = methods()
            .iter()
            .find(|m| m.name == "vhost_blk_delete")
            .unwrap();
        assert_eq!(param(&del.params(), "force")["type"], "boolean");
    }

    #[test]
    fn bad_params_name_the_parameter() {
        let e = params::<VhostBlkSection>(
            json!({"name": "d", "bdev": "b", "socket": "s", "num_queues": "two"}),
        )
        .unwrap_err();
        assert_eq!(e.code, codes::INVALID_PARAMS);
        assert!(e.message.contains("num_queues"), "{}", e.message);
        let e = params::<NameParams>(json!({})).unwrap_err();
        assert!(e.message.contains("missing field `name`"), "{}", e.message);
        let e = params::<NameParams>(json!({"name": "x", "colour": 1})).unwrap_err();
        assert!(e.message.contains("colour"), "{}", e.message);
    }
}
