//! Output: plain-text tables, the machine view, the event timeline, and JSON/YAML.
//!
//! Every renderer here is a pure function that returns a `String`; the commands print it. Times
//! are shown in UTC, as the API sends them.

use std::fmt::Write as _;

use clap::ValueEnum;
use metal_types::{
    Allocation, ConstraintKind, FilesystemLayout, Image, Inventory, Liveliness, Machine, MachineEvent, Partition, Project, Size,
    SizeConstraint, TokenInfo, TokenResponse, TokenRole,
};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// JSON (pretty, with a final newline) or YAML of any value.
pub fn serialize<T: Serialize + ?Sized>(format: Format, value: &T) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        // `Table` callers only get here for objects that have no table: YAML reads best.
        Format::Yaml | Format::Table => serde_yaml::to_string(value)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

/// A left-aligned text table: columns separated by two spaces, no trailing blanks.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - width(cell)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Types that `ls` shows as a table.
pub trait Tabular {
    fn table(items: &[Self]) -> Table
    where
        Self: Sized;
}

impl Tabular for Partition {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "API URL", "KERNEL", "INITRD", "CMDLINE", "DESCRIPTION"]);
        for p in items {
            t.row(vec![
                p.id.clone(),
                p.boot.api_url.clone(),
                p.boot.kernel_url.clone(),
                p.boot.initrd_url.clone(),
                p.boot.cmdline.clone(),
                p.description.clone(),
            ]);
        }
        t
    }
}

impl Tabular for Size {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "CORES", "MEMORY", "STORAGE", "DESCRIPTION"]);
        for s in items {
            let range =
                |kind| s.constraints.iter().filter(|c| c.kind == kind).map(constraint_range).collect::<Vec<_>>().join(", ");
            t.row(vec![
                s.id.clone(),
                range(ConstraintKind::Cores),
                range(ConstraintKind::Memory),
                range(ConstraintKind::Storage),
                s.description.clone(),
            ]);
        }
        t
    }
}

impl Tabular for Image {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "NAME", "VERSION", "FORMAT", "SIZE", "CLASSIFICATION", "EXPIRES", "URL"]);
        for i in items {
            t.row(vec![
                i.id.clone(),
                i.manifest.name.clone(),
                i.manifest.version.clone(),
                i.manifest.format.extension().to_string(),
                human_bytes(i.manifest.uncompressed_size),
                enum_name(&i.classification),
                i.expires_at.clone().unwrap_or_default(),
                i.url.clone(),
            ]);
        }
        t
    }
}

impl Tabular for FilesystemLayout {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "PARTITIONS", "FILESYSTEMS", "SIZES", "IMAGES", "DESCRIPTION"]);
        for l in items {
            let parts = l
                .disks
                .iter()
                .map(|d| {
                    let ps = d
                        .partitions
                        .iter()
                        .map(|p| {
                            let size = if p.size_mib == 0 { "rest".to_string() } else { human_bytes(p.size_mib << 20) };
                            format!("{}:{} {} {}", d.device, p.number, enum_name(&p.gpt_type), size)
                        })
                        .collect::<Vec<_>>();
                    ps.join(", ")
                })
                .collect::<Vec<_>>()
                .join("; ");
            let fss = l
                .filesystems
                .iter()
                .map(|f| format!("{} {} {}", f.source, enum_name(&f.kind), f.mount.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>()
                .join(", ");
            t.row(vec![l.id.clone(), parts, fss, or_all(&l.sizes), or_all(&l.images), l.description.clone()]);
        }
        t
    }
}

impl Tabular for Project {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "DESCRIPTION"]);
        for p in items {
            t.row(vec![p.id.clone(), p.description.clone()]);
        }
        t
    }
}

impl Tabular for Allocation {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "MACHINE", "PROJECT", "PARTITION", "HOSTNAME", "IMAGE", "LAYOUT", "CREATED"]);
        for a in items {
            t.row(vec![
                a.id.to_string(),
                a.machine.to_string(),
                a.project.clone(),
                a.partition.clone(),
                a.hostname.clone(),
                a.image.clone(),
                a.layout.clone(),
                a.created_at.clone(),
            ]);
        }
        t
    }
}

impl Tabular for TokenResponse {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "ROLE", "PROJECT", "EXPIRES", "TOKEN"]);
        for tok in items {
            t.row(vec![
                tok.id.clone(),
                role_name(tok.role).to_string(),
                tok.project.clone().unwrap_or_default(),
                tok.expires_at.clone().unwrap_or_else(|| "never".into()),
                tok.token.clone(),
            ]);
        }
        t
    }
}

impl Tabular for TokenInfo {
    fn table(items: &[Self]) -> Table {
        let mut t = Table::new(&["ID", "ROLE", "PROJECT", "CREATED", "EXPIRES", "DESCRIPTION"]);
        for tok in items {
            t.row(vec![
                tok.id.clone(),
                role_name(tok.role).to_string(),
                tok.project.clone().unwrap_or_default(),
                tok.created_at.clone(),
                tok.expires_at.clone().unwrap_or_else(|| "never".into()),
                tok.description.clone(),
            ]);
        }
        t
    }
}

/// `machine ls`. `now` is passed in so ages are testable.
pub fn machines_table(machines: &[Machine], now: OffsetDateTime) -> Table {
    let mut t =
        Table::new(&["ID", "PARTITION", "SIZE", "STATE", "LIVELINESS", "HOSTNAME", "IMAGE", "PROJECT", "LAST SEEN", "FLAGS"]);
    for m in machines {
        let alloc = m.allocation.as_ref();
        t.row(vec![
            m.id.to_string(),
            m.partition.clone().unwrap_or_default(),
            m.size.clone(),
            m.state.map(|s| s.to_string()).unwrap_or_default(),
            liveliness_name(m.liveliness).to_string(),
            alloc.map(|a| a.hostname.clone()).unwrap_or_default(),
            alloc.map(|a| a.image.clone()).unwrap_or_default(),
            alloc.map(|a| a.project.clone()).unwrap_or_default(),
            m.last_seen.as_deref().map(|t| age(t, now)).unwrap_or_default(),
            machine_flags(m).join(","),
        ]);
    }
    t
}

pub fn machine_flags(m: &Machine) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if m.crash_loop {
        flags.push("crash-loop");
    }
    if m.failed_reclaim {
        flags.push("failed-reclaim");
    }
    flags
}

// ---------------------------------------------------------------------------------------------
// machine describe
// ---------------------------------------------------------------------------------------------

/// How many of the latest events `machine describe` shows.
pub const RECENT_EVENTS: usize = 5;

/// The full view of one machine, YAML-like, with the inventory summarised.
/// The last [`RECENT_EVENTS`] of `events` (the machine's timeline) are shown at the end.
pub fn machine_view(m: &Machine, events: &[MachineEvent], now: OffsetDateTime) -> String {
    let mut o = String::new();
    let w = &mut o;
    // `write!` into a String cannot fail.
    let _ = writeln!(w, "id:          {}", m.id);
    let _ = writeln!(w, "partition:   {}", m.partition.as_deref().unwrap_or("-"));
    let _ = writeln!(w, "size:        {}", m.size);
    let _ = writeln!(w, "state:       {}", m.state.map(|s| s.as_str()).unwrap_or("-"));
    let _ = writeln!(w, "liveliness:  {}", liveliness_name(m.liveliness));
    match &m.last_seen {
        Some(t) => {
            let _ = writeln!(w, "last seen:   {} ({})", show_time(t), age(t, now));
        }
        None => {
            let _ = writeln!(w, "last seen:   never");
        }
    }
    let flags = machine_flags(m);
    let _ = writeln!(w, "flags:       {}", if flags.is_empty() { "-".to_string() } else { flags.join(", ") });

    match &m.allocation {
        None => {
            let _ = writeln!(w, "allocation:  none");
        }
        Some(a) => {
            let _ = writeln!(w, "allocation:");
            let _ = writeln!(w, "  id:        {}", a.id);
            let _ = writeln!(w, "  project:   {}", a.project);
            let _ = writeln!(w, "  hostname:  {}", a.hostname);
            let _ = writeln!(w, "  image:     {}", a.image);
            let _ = writeln!(w, "  layout:    {}", a.layout);
            let _ = writeln!(w, "  created:   {}", show_time(&a.created_at));
            let _ = writeln!(w, "  ssh keys:  {}", a.ssh_keys.len());
            for k in &a.ssh_keys {
                let _ = writeln!(w, "    - {}", abbreviate_key(k));
            }
            let _ = writeln!(w, "  user data: {} bytes", a.user_data.len());
            if let Some(k) = &a.idempotency_key {
                let _ = writeln!(w, "  idempotency key: {k}");
            }
        }
    }

    if let Some(b) = &m.boot {
        let _ = writeln!(w, "boot:");
        let _ = writeln!(w, "  root uuid: {}", b.root_uuid);
        let _ = writeln!(w, "  kernel:    {}", b.kernel);
        let _ = writeln!(w, "  initrd:    {}", if b.initrd.is_empty() { "-" } else { &b.initrd });
        let _ = writeln!(w, "  cmdline:   {}", b.cmdline);
    }

    match &m.inventory {
        None => {
            let _ = writeln!(w, "inventory:   none (not registered yet)");
        }
        Some(inv) => inventory_view(w, inv),
    }

    let skip = events.len().saturating_sub(RECENT_EVENTS);
    if events.is_empty() {
        let _ = writeln!(w, "events:      none");
    } else {
        let _ =
            writeln!(w, "events:      last {} of {} (all: metalctl machine events {})", events.len() - skip, events.len(), m.id);
        for e in &events[skip..] {
            let _ = writeln!(w, "  {}", timeline_line(e));
        }
    }
    o
}

fn inventory_view(w: &mut String, inv: &Inventory) {
    let _ = writeln!(w, "inventory:");
    let _ =
        writeln!(w, "  cpu:       {} cores, {} threads", inv.cores(), inv.cpus.iter().map(|c| u64::from(c.threads)).sum::<u64>());
    for c in &inv.cpus {
        let _ = writeln!(w, "    - {} ({} cores, {} threads)", c.model, c.cores, c.threads);
    }
    let _ = writeln!(w, "  memory:    {}", human_bytes(inv.memory_bytes));
    let _ = writeln!(w, "  storage:   {} on {} disk(s)", human_bytes(inv.storage_bytes()), inv.disks.len());
    for d in &inv.disks {
        let mut line = format!("    - {} {}", d.name, human_bytes(d.size_bytes));
        for extra in [&d.bus, &d.model, &d.serial] {
            if !extra.is_empty() {
                line.push(' ');
                line.push_str(extra);
            }
        }
        let _ = write!(line, " {}", if d.rotational { "hdd" } else { "ssd" });
        let _ = write!(line, " sectors {}/{}", d.logical_sector_size, d.physical_sector_size);
        let _ = writeln!(w, "{line}");
    }
    let _ = writeln!(w, "  nics:      {}", inv.nics.len());
    for n in &inv.nics {
        let speed = n.speed_mbps.map(|s| format!(" {s} Mbit/s")).unwrap_or_default();
        let driver = if n.driver.is_empty() { String::new() } else { format!(" {}", n.driver) };
        let link = if n.carrier { "link up" } else { "no link" };
        let _ = writeln!(w, "    - {} {}{}{} {}", n.name, n.mac, driver, speed, link);
    }
    let d = &inv.dmi;
    let _ = writeln!(w, "  dmi:       {} {} (serial {})", d.sys_vendor, d.product_name, or_dash(&d.product_serial));
    let _ = writeln!(w, "  board:     {} {}", d.board_vendor, d.board_name);
    let _ = writeln!(w, "  bios:      {} {} ({})", d.bios_vendor, d.bios_version, d.bios_date);
    if !inv.lldp.is_empty() {
        let _ = writeln!(w, "  lldp:");
        for l in &inv.lldp {
            let _ = writeln!(
                w,
                "    - {}: {} port {}{}",
                l.interface,
                l.chassis_id,
                l.port_id,
                if l.system_name.is_empty() { String::new() } else { format!(" ({})", l.system_name) }
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Event timeline
// ---------------------------------------------------------------------------------------------

pub const TIMELINE_HEADER: &str = "AGENT TIME (UTC)         RECEIVED      EVENT               MESSAGE";

/// One line of a machine's timeline: agent time, receive time, event, message, and a flag when
/// the event was not allowed after the one before it.
pub fn timeline_line(e: &MachineEvent) -> String {
    let agent = parse_time(&e.time);
    let received = parse_time(&e.received);
    let agent_s = agent.map(full_time).unwrap_or_else(|| e.time.clone());
    // The receive time is shown without its date when it is the agent's date.
    let received_s = match (agent, received) {
        (Some(a), Some(r)) if a.date() == r.date() => clock_time(r),
        (_, Some(r)) => full_time(r),
        (_, None) => e.received.clone(),
    };
    let message = e.message.replace(['\r', '\n'], " ").trim().to_string();
    let mut line = format!("{agent_s:<23}  {received_s:<12}  {:<18}  {message}", e.event.as_str());
    let sep = if message.is_empty() { "" } else { "  " };
    if e.unexpected {
        line.push_str(sep);
        line.push_str("!! UNEXPECTED");
    }
    if e.ignored {
        // A sighting by pixie that did not change the state (metal-hammer was alive, or an
        // install was under way): shown, but marked so nobody reads it as a reboot.
        line.push_str(sep);
        line.push_str("(seen by pixie; state kept)");
    }
    line.trim_end().to_string()
}

/// The whole timeline with its header.
pub fn timeline(events: &[MachineEvent]) -> String {
    let mut out = String::from(TIMELINE_HEADER);
    out.push('\n');
    for e in events {
        out.push_str(&timeline_line(e));
        out.push('\n');
    }
    out
}

/// One event as a watch writes it: a timeline line (table), one JSON object per line (json),
/// or one YAML document (yaml), each ending with a newline.
pub fn event_record(format: Format, e: &MachineEvent) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table => timeline_line(e) + "\n",
        Format::Json => serde_json::to_string(e)? + "\n",
        Format::Yaml => format!("---\n{}", serde_yaml::to_string(e)?),
    })
}

// ---------------------------------------------------------------------------------------------
// Small formatting helpers
// ---------------------------------------------------------------------------------------------

/// An error and its sources on one line, `a: b: c`, as `main` prints errors.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok().map(|t| t.to_offset(UtcOffset::UTC))
}

fn full_time(t: OffsetDateTime) -> String {
    format!("{:04}-{:02}-{:02} {}", t.year(), u8::from(t.month()), t.day(), clock_time(t))
}

fn clock_time(t: OffsetDateTime) -> String {
    format!("{:02}:{:02}:{:02}.{:03}", t.hour(), t.minute(), t.second(), t.millisecond())
}

/// An RFC 3339 time as `2026-11-24 11:20:01.123`, or as it came when it does not parse.
pub fn show_time(s: &str) -> String {
    parse_time(s).map(full_time).unwrap_or_else(|| s.to_string())
}

/// How long ago: `4s ago`, `3m ago`, `2h ago`, `5d ago`.
pub fn age(s: &str, now: OffsetDateTime) -> String {
    let Some(t) = parse_time(s) else {
        return s.to_string();
    };
    let secs = (now - t).whole_seconds();
    if secs < 0 {
        return "just now".to_string();
    }
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Binary units: `512 MiB`, `1.5 GiB`, `20 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{n} B");
    }
    let div = 1u64 << (10 * unit);
    if n.is_multiple_of(div) {
        format!("{} {}", n / div, UNITS[unit])
    } else {
        format!("{:.1} {}", n as f64 / div as f64, UNITS[unit])
    }
}

fn constraint_range(c: &SizeConstraint) -> String {
    let show = |v: u64| match c.kind {
        ConstraintKind::Cores => v.to_string(),
        ConstraintKind::Memory | ConstraintKind::Storage => human_bytes(v),
    };
    if c.min == c.max {
        show(c.min)
    } else {
        format!("{} - {}", show(c.min), show(c.max))
    }
}

/// The serde name of a unit enum variant (`tar.zst`, `supported`, `efi`).
fn enum_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

pub fn role_name(r: TokenRole) -> &'static str {
    match r {
        TokenRole::Admin => "admin",
        TokenRole::Tenant => "tenant",
        TokenRole::Pixie => "pixie",
    }
}

pub fn liveliness_name(l: Liveliness) -> &'static str {
    match l {
        Liveliness::Alive => "Alive",
        Liveliness::Dead => "Dead",
        Liveliness::Unknown => "Unknown",
    }
}

fn or_all(v: &[String]) -> String {
    if v.is_empty() {
        "(all)".to_string()
    } else {
        v.join(",")
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// `ssh-ed25519 AAAAC3Nz…x9k user@host`: type, the key's ends, comment.
fn abbreviate_key(k: &str) -> String {
    let mut parts = k.split_whitespace();
    let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
        return k.to_string();
    };
    let comment = parts.collect::<Vec<_>>().join(" ");
    let chars: Vec<char> = body.chars().collect();
    let body = if chars.len() > 20 {
        format!("{}…{}", chars[..8].iter().collect::<String>(), chars[chars.len() - 6..].iter().collect::<String>())
    } else {
        body.to_string()
    };
    format!("{kind} {body} {comment}").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metal_types::{
        AllocationId, Cpu, Disk, Dmi, ImageClassification, ImageFormat, ImageManifest, MachineId, Nic, PartitionBoot,
        ProvisioningEvent,
    };

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-11-24T12:00:00Z", &Rfc3339).unwrap()
    }

    fn machine(n: u128) -> Machine {
        Machine {
            id: MachineId(uuid::Uuid::from_u128(n)),
            partition: Some("lab".into()),
            size: "small".into(),
            state: Some(ProvisioningEvent::Waiting),
            liveliness: Liveliness::Alive,
            crash_loop: false,
            failed_reclaim: false,
            allocation: None,
            inventory: None,
            boot: None,
            last_seen: Some("2026-11-24T11:59:55Z".into()),
        }
    }

    fn allocation(m: MachineId) -> Allocation {
        Allocation {
            id: AllocationId(uuid::Uuid::from_u128(99)),
            machine: m,
            project: "acme".into(),
            partition: "lab".into(),
            image: "test-os-20261124".into(),
            hostname: "web-1".into(),
            layout: "efi-ext4".into(),
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFoo0123456789 me@laptop".into()],
            user_data: "#cloud-config\n".into(),
            created_at: "2026-11-24T11:58:00Z".into(),
            idempotency_key: None,
        }
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let mut t = Table::new(&["ID", "NAME", "X"]);
        t.row(vec!["1".into(), "long name".into(), "".into()]);
        t.row(vec!["22222".into(), "ä".into(), "y".into()]);
        assert_eq!(t.render(), "ID     NAME       X\n1      long name\n22222  ä          y\n");
    }

    #[test]
    fn machine_table_shows_allocation_age_and_flags() {
        let mut a = machine(1);
        let mut b = machine(2);
        b.allocation = Some(allocation(b.id));
        b.state = Some(ProvisioningEvent::PhonedHome);
        b.crash_loop = true;
        b.failed_reclaim = true;
        b.last_seen = Some("2026-11-24T10:00:00Z".into());
        a.last_seen = None;
        let out = machines_table(&[a, b], now()).render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "ID                                    PARTITION  SIZE   STATE        LIVELINESS  HOSTNAME  IMAGE             PROJECT  LAST SEEN  FLAGS"
        );
        assert_eq!(lines[1], "00000000-0000-0000-0000-000000000001  lab        small  Waiting      Alive");
        assert_eq!(
            lines[2],
            "00000000-0000-0000-0000-000000000002  lab        small  Phoned Home  Alive       web-1     test-os-20261124  acme     2h ago     crash-loop,failed-reclaim"
        );
    }

    #[test]
    fn catalog_tables() {
        let s = Size {
            id: "small".into(),
            description: "lab VMs".into(),
            constraints: vec![
                SizeConstraint { kind: ConstraintKind::Cores, min: 1, max: 4 },
                SizeConstraint { kind: ConstraintKind::Memory, min: 1 << 30, max: 8 << 30 },
                SizeConstraint { kind: ConstraintKind::Storage, min: 10 << 30, max: 10 << 30 },
            ],
        };
        assert_eq!(
            Size::table(&[s]).render(),
            "ID     CORES  MEMORY         STORAGE  DESCRIPTION\nsmall  1 - 4  1 GiB - 8 GiB  10 GiB   lab VMs\n"
        );

        let i = Image {
            id: "test-os-20261124".into(),
            url: "http://x/i.tar.zst".into(),
            classification: ImageClassification::Preview,
            expires_at: None,
            manifest: ImageManifest {
                name: "test-os".into(),
                version: "20261124".into(),
                os: String::new(),
                format: ImageFormat::TarZst,
                compressed_size: 1,
                uncompressed_size: 3 << 19,
                sha256: String::new(),
                kernel: "boot/vmlinuz".into(),
                initrd: String::new(),
                cmdline: String::new(),
                packages: vec![],
            },
        };
        let out = Image::table(&[i]).render();
        assert!(
            out.lines().nth(1).unwrap().starts_with("test-os-20261124  test-os  20261124  tar.zst  1.5 MiB  preview"),
            "{out}"
        );

        let p = Partition {
            id: "lab".into(),
            description: String::new(),
            boot: PartitionBoot {
                kernel_url: "k".into(),
                initrd_url: "i".into(),
                cmdline: "console=ttyS0".into(),
                api_url: "http://10.99.0.1:8080".into(),
            },
        };
        assert_eq!(
            Partition::table(&[p]).render().lines().nth(1).unwrap(),
            "lab  http://10.99.0.1:8080  k       i       console=ttyS0"
        );

        let l: FilesystemLayout = serde_yaml::from_str(
            "id: efi-ext4\ndisks: [{device: first, partitions: [{number: 1, label: efi, size_mib: 512, type: efi}, {number: 2, label: root, size_mib: 0, type: linux}]}]\nfilesystems: [{source: 'first:2', kind: ext4, mount: /}, {source: 'first:1', kind: vfat, mount: /boot/efi}]\n",
        )
        .unwrap();
        assert_eq!(
            FilesystemLayout::table(&[l]).render().lines().nth(1).unwrap(),
            "efi-ext4  first:1 efi 512 MiB, first:2 linux rest  first:2 ext4 /, first:1 vfat /boot/efi  (all)  (all)"
        );
    }

    #[test]
    fn timeline_lines() {
        let e = MachineEvent {
            event: ProvisioningEvent::BootingNewKernel,
            message: "kexec\ninto test-os".into(),
            time: "2026-11-24T11:20:01.123Z".into(),
            received: "2026-11-24T11:20:01.135+00:00".into(),
            unexpected: false,
            source: metal_types::EventSource::Agent,
            ignored: false,
        };
        assert_eq!(timeline_line(&e), "2026-11-24 11:20:01.123  11:20:01.135  Booting New Kernel  kexec into test-os");
        let late = MachineEvent {
            event: ProvisioningEvent::Installing,
            message: String::new(),
            time: "2026-11-23T23:59:59.999Z".into(),
            received: "2026-11-24T01:00:00.000+01:00".into(),
            unexpected: true,
            source: metal_types::EventSource::Agent,
            ignored: false,
        };
        assert_eq!(timeline_line(&late), "2026-11-23 23:59:59.999  2026-11-24 00:00:00.000  Installing          !! UNEXPECTED");
        let odd = MachineEvent {
            event: ProvisioningEvent::PxeBooting,
            message: "mac 52:54:00:00:00:01".into(),
            time: "garbage".into(),
            received: "2026-11-24T11:20:01Z".into(),
            unexpected: true,
            source: metal_types::EventSource::Agent,
            ignored: false,
        };
        assert_eq!(
            timeline_line(&odd),
            "garbage                  2026-11-24 11:20:01.000  PXE Booting         mac 52:54:00:00:00:01  !! UNEXPECTED"
        );
        let sighting = MachineEvent { ignored: true, unexpected: false, source: metal_types::EventSource::Pixie, ..odd.clone() };
        assert_eq!(
            timeline_line(&sighting),
            "garbage                  2026-11-24 11:20:01.000  PXE Booting         mac 52:54:00:00:00:01  (seen by pixie; state kept)"
        );
        assert_eq!(event_record(Format::Table, &e).unwrap(), timeline_line(&e) + "\n");
        let json = event_record(Format::Json, &e).unwrap();
        assert_eq!(json.lines().count(), 1);
        assert_eq!(serde_json::from_str::<MachineEvent>(&json).unwrap(), e);
        let yaml = event_record(Format::Yaml, &e).unwrap();
        assert!(yaml.starts_with("---\nevent: Booting New Kernel\n"), "{yaml}");
        let all = timeline(&[e, late]);
        assert_eq!(all.lines().count(), 3);
        assert!(all.starts_with(TIMELINE_HEADER));
    }

    #[test]
    fn describe_shows_allocation_and_inventory() {
        let mut m = machine(7);
        m.allocation = Some(allocation(m.id));
        m.crash_loop = true;
        m.inventory = Some(Inventory {
            uuid: m.id,
            cpus: vec![Cpu { model: "QEMU Virtual CPU".into(), cores: 2, threads: 2 }],
            memory_bytes: 2 << 30,
            disks: vec![Disk {
                name: "vda".into(),
                size_bytes: 10 << 30,
                bus: "virtio".into(),
                rotational: false,
                logical_sector_size: 512,
                physical_sector_size: 512,
                ..Default::default()
            }],
            nics: vec![Nic {
                name: "eth0".into(),
                mac: "52:54:00:00:00:07".into(),
                driver: "virtio_net".into(),
                speed_mbps: None,
                carrier: true,
            }],
            dmi: Dmi { sys_vendor: "QEMU".into(), product_name: "Standard PC".into(), ..Default::default() },
            lldp: vec![],
        });
        let ev = |event, s: u32| MachineEvent {
            event,
            message: String::new(),
            time: format!("2026-11-24T11:00:{s:02}Z"),
            received: format!("2026-11-24T11:00:{s:02}Z"),
            unexpected: false,
            source: metal_types::EventSource::Agent,
            ignored: false,
        };
        let events: Vec<MachineEvent> = (0..7).map(|s| ev(ProvisioningEvent::Waiting, s)).collect();
        let v = machine_view(&m, &events, now());
        assert!(v.contains("events:      last 5 of 7 (all: metalctl machine events 00000000-0000-0000-0000-000000000007)\n  2026-11-24 11:00:02.000"), "{v}");
        assert!(!v.contains("11:00:01.000"), "{v}");
        assert!(machine_view(&m, &[], now()).ends_with("events:      none\n"));
        for want in [
            "id:          00000000-0000-0000-0000-000000000007\n",
            "state:       Waiting\n",
            "last seen:   2026-11-24 11:59:55.000 (5s ago)\n",
            "flags:       crash-loop\n",
            "  hostname:  web-1\n",
            "    - ssh-ed25519 AAAAC3Nz…456789 me@laptop\n",
            "  user data: 14 bytes\n",
            "  cpu:       2 cores, 2 threads\n",
            "  memory:    2 GiB\n",
            "  storage:   10 GiB on 1 disk(s)\n",
            "    - vda 10 GiB virtio ssd sectors 512/512\n",
            "    - eth0 52:54:00:00:00:07 virtio_net link up\n",
            "  dmi:       QEMU Standard PC (serial -)\n",
        ] {
            assert!(v.contains(want), "missing {want:?} in\n{v}");
        }
    }

    #[test]
    fn sizes_and_ages() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(age("2026-11-24T11:59:59Z", now()), "1s ago");
        assert_eq!(age("2026-11-24T11:57:00Z", now()), "3m ago");
        assert_eq!(age("2026-11-20T12:00:00Z", now()), "4d ago");
        assert_eq!(age("2026-11-24T12:00:09Z", now()), "just now");
        assert_eq!(age("yesterday", now()), "yesterday");
    }

    #[test]
    fn json_and_yaml_output() {
        let p = Project { id: "acme".into(), description: String::new() };
        assert_eq!(serialize(Format::Json, &p).unwrap(), "{\n  \"id\": \"acme\",\n  \"description\": \"\"\n}\n");
        assert_eq!(serialize(Format::Yaml, &[p]).unwrap(), "- id: acme\n  description: ''\n");
    }
}
