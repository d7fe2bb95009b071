//! The control socket: a Unix stream socket (owner-only, mode 0600) speaking JSON lines —
//! one request object per line, one response object per line.
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"streams":[{"id":1,"program":"curl",...}]}
//! → {"cmd":"move","id":3,"interface":"radio0"}          (no "id": every stream)
//! ← {"ok":true,"moved":[3]}
//! ← {"ok":false,"error":"interface \"eth9\" is not configured"}
//! ```
//!
//! [`client`] is the side `msocks status` and `msocks move` use.

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// List the streams.
    Status,
    /// Move streams onto an interface (both directions) and keep them there while it is
    /// usable; the interface `auto` hands them back to the policy.
    Move {
        /// One stream, or every stream when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The interface name, or `auto`.
        interface: String,
    },
}

/// One stream as `msocks status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRow {
    /// The agent's stream number (what `msocks move` takes).
    pub id: u64,
    /// `connect`, `bind` or `udp` (a UDP association).
    #[serde(default)]
    pub kind: String,
    /// The local program's name, when known.
    pub program: Option<String>,
    /// Its process id, when known.
    pub pid: Option<u32>,
    /// Its user id, when known.
    pub uid: Option<u32>,
    /// The destination as the program asked for it (for BIND the peer expected, for UDP
    /// the address the program said it sends from).
    pub destination: String,
    /// The rule that placed the stream (`default` when none matched).
    pub rule: String,
    /// The interface data leaves by (`-` while waiting).
    pub outbound: String,
    /// The interface data arrives on (`-` while waiting).
    pub inbound: String,
    /// Bytes from the program to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the program.
    pub bytes_down: u64,
    /// Completed moves (migrations and automatic reconnects).
    pub moves: u64,
    /// `waiting`, `connecting`, `connected`, `moving`, `closed` or `failed`; `associated`
    /// for a UDP association with a path.
    pub state: String,
    /// The interface the stream was moved to by hand, if any.
    pub pinned: Option<String>,
    /// Seconds since the stream was opened.
    pub age_secs: u64,
}

/// One interface as `msocks status --interfaces` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceRow {
    /// The kernel's interface name.
    pub name: String,
    /// `usable` (up, with an address of its proxy's family), `down`, `no address`,
    /// `no IPv4 address` / `no IPv6 address` (up, but without an address of its proxy's
    /// family), or `absent` (no such kernel interface).
    pub link: String,
    /// `alive`, `failed` or `-` (not probed: unusable link, no proxy address, probing off).
    pub probe: String,
    /// Round-trip time of the last answered probe, in microseconds.
    pub rtt_us: Option<u64>,
    /// A standby connection is ready, so the next move onto this interface is warm.
    pub standby_ready: bool,
    /// Why the probe failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Streams whose data leaves by this interface.
    pub streams_out: u64,
    /// Streams whose data arrives on this interface.
    pub streams_in: u64,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamRow>,
    /// For `status`: the configured interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceRow>,
    /// For `move`: the streams now on the interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<u64>,
}

/// The client side of the control protocol, blocking (the CLI needs no runtime for it).
pub mod client {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use super::{InterfaceRow, Request, Response, StreamRow};
    use crate::error::ControlError;

    /// Sends one request and reads its answer. A refusal is [`ControlError::Refused`].
    pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        // A move waits for the streams to be moved; the agent bounds that well below this.
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        (&stream).write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer)?;
        if answer.is_empty() {
            return Err(ControlError::NoAnswer);
        }
        let response: Response = serde_json::from_str(&answer)?;
        if !response.ok {
            return Err(ControlError::Refused(
                response
                    .error
                    .unwrap_or_else(|| "the agent refused the request".into()),
            ));
        }
        Ok(response)
    }

    /// The agent's streams.
    pub fn status(path: &Path) -> Result<Vec<StreamRow>, ControlError> {
        Ok(request(path, &Request::Status)?.streams)
    }

    /// The agent's interfaces: link state, probe verdict and round trip, standby readiness.
    pub fn interfaces(path: &Path) -> Result<Vec<InterfaceRow>, ControlError> {
        Ok(request(path, &Request::Status)?.interfaces)
    }

    /// A human-readable table of interfaces.
    pub fn format_interfaces(rows: &[InterfaceRow]) -> String {
        let header = ["INTERFACE", "LINK", "PROBE", "RTT", "STANDBY", "OUT", "IN"];
        let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in rows {
            let probe = match &r.error {
                Some(e) => format!("{} ({e})", r.probe),
                None => r.probe.clone(),
            };
            table.push(vec![
                r.name.clone(),
                r.link.clone(),
                probe,
                r.rtt_us
                    .map(|us| format!("{:.2} ms", us as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                if r.standby_ready { "ready" } else { "-" }.into(),
                r.streams_out.to_string(),
                r.streams_in.to_string(),
            ]);
        }
        render(&table)
    }

    /// Moves stream `id` (or all streams when `None`) to `interface` (or back to the
    /// policy with `auto`); returns the streams moved.
    pub fn move_streams(
        path: &Path,
        id: Option<u64>,
        interface: &str,
    ) -> Result<Vec<u64>, ControlError> {
        let req = Request::Move {
            id,
            interface: interface.to_owned(),
        };
        Ok(request(path, &req)?.moved)
    }

    /// A human-readable table of streams.
    pub fn format_table(rows: &[StreamRow]) -> String {
        let header = [
            "ID",
            "PROGRAM",
            "DESTINATION",
            "OUT",
            "IN",
            "UP",
            "DOWN",
            "MOVES",
            "STATE",
            "RULE",
        ];
        let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in rows {
            let program = match (&r.program, r.pid) {
                (Some(p), Some(pid)) => format!("{p}[{pid}]"),
                (Some(p), None) => p.clone(),
                (None, _) => r
                    .uid
                    .map(|u| format!("uid {u}"))
                    .unwrap_or_else(|| "?".into()),
            };
            let state = match &r.pinned {
                Some(p) => format!("{} (pinned {p})", r.state),
                None => r.state.clone(),
            };
            table.push(vec![
                r.id.to_string(),
                program,
                match r.kind.as_str() {
                    "connect" | "" => r.destination.clone(),
                    other => format!("{other} {}", r.destination),
                },
                r.outbound.clone(),
                r.inbound.clone(),
                human_bytes(r.bytes_up),
                human_bytes(r.bytes_down),
                r.moves.to_string(),
                state,
                r.rule.clone(),
            ]);
        }
        let mut out = render(&table);
        if rows.is_empty() {
            out.push_str("(no streams)\n");
        }
        out
    }

    /// Left-aligned columns, two spaces apart; the first row is the header.
    fn render(table: &[Vec<String>]) -> String {
        let columns = table.first().map_or(0, Vec::len);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                table
                    .iter()
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in table {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    fn human_bytes(n: u64) -> String {
        const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
        let mut v = n as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            format!("{n} B")
        } else {
            format!("{v:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let m: Request = serde_json::from_str(r#"{"cmd":"move","interface":"radio0"}"#).unwrap();
        assert_eq!(
            m,
            Request::Move {
                id: None,
                interface: "radio0".into()
            }
        );
        let r = Response {
            ok: false,
            error: Some("no".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
        assert!(client::format_table(&[]).contains("no streams"));
    }
}
