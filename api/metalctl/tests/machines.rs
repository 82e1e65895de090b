//! metalctl's machine commands against a real metal-api, with simulated agents that boot,
//! register, wait, install and phone home over the real agent contract.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Api, SimAgent, ADMIN_TOKEN};
use metal_types::{Allocation, Machine, MachineEvent, ProvisioningEvent, TokenResponse};
use tokio::io::{AsyncBufReadExt, BufReader};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMetalctlTestKeyOnlyForTests ci@test";

struct Lab {
    api: Api,
    pixie: String,
    tenant: String,
}

fn lab() -> Lab {
    let api = Api::start();
    api.create_examples();
    let pixie: TokenResponse = api.admin(&["token", "create", "--role", "pixie", "-o", "json"]).json(&["pixie token"]);
    let tenant: TokenResponse =
        api.admin(&["token", "create", "--role", "tenant", "--project", "tenant-a", "-o", "json"]).json(&["tenant token"]);
    Lab { api, pixie: pixie.token, tenant: tenant.token }
}

fn allocate_args<'a>(hostname: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v =
        vec!["machine", "allocate", "--project", "tenant-a", "--partition", "lab", "--image", "test-os", "--hostname", hostname];
    v.extend_from_slice(extra);
    v
}

async fn output(cmd: tokio::process::Command) -> common::Run {
    let mut cmd = cmd;
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("metalctl did not finish within 90 s")
        .expect("run metalctl");
    common::Run::from(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_follow_and_free_a_machine() {
    let lab = lab();
    let api = &lab.api;
    let agent = SimAgent::boot_and_register(api, &lab.pixie, 1).await.expect("simulated agent registers");
    let id = agent.id().to_string();

    // The waiting machine, in a table and as JSON.
    let table = api.admin_ok(&["machine", "ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("ID ") && lines[0].contains("LAST SEEN") && lines[0].ends_with("FLAGS"), "{table}");
    assert!(lines[1].starts_with(&format!("{id}  lab        lab-small  Waiting")), "{table}");
    let ms: Vec<Machine> = api.admin(&["machine", "ls", "-o", "json"]).json(&["machine ls"]);
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].state, Some(ProvisioningEvent::Waiting));
    assert_eq!(ms[0].size, "lab-small");
    assert!(api.admin_ok(&["machine", "ls", "--state", "installing"]).lines().count() == 1);

    let view = api.admin_ok(&["machine", "describe", &id]);
    for want in [
        format!("id:          {id}\n"),
        "size:        lab-small\n".to_string(),
        "allocation:  none\n".to_string(),
        "  memory:    2 GiB\n".to_string(),
        "    - vda 10 GiB virtio QEMU HARDDISK disk-1 ssd sectors 512/512\n".to_string(),
        "    - eth0 52:54:00:00:00:01 virtio_net link up\n".to_string(),
    ] {
        assert!(view.contains(&want), "machine describe lacks {want:?}:\n{view}");
    }
    assert!(view.contains("\nevents:      last "), "{view}");
    assert!(view.trim_end().lines().last().unwrap().contains("  Waiting  "), "{view}");
    let timeline = api.admin_ok(&["machine", "events", &id]);
    assert!(timeline.starts_with("AGENT TIME (UTC)"), "{timeline}");
    assert!(timeline.lines().last().unwrap().contains("  Waiting  "), "{timeline}");

    // Allocate and wait for "Phoned Home" while an operator watches the same timeline.
    let mut alloc = api.ctl_command(
        Some(&lab.tenant),
        &allocate_args(
            "web-1",
            &[
                "--size",
                "lab-small",
                "--ssh-key",
                KEY,
                "--user-data",
                "hello",
                "--wait-for",
                "Phoned Home",
                "--timeout-s",
                "60",
                "-o",
                "json",
            ],
        ),
    );
    alloc.stdout(Stdio::piped()).stderr(Stdio::piped());
    let alloc = tokio::spawn(output(alloc.into()));
    let mut watch =
        api.ctl_command(Some(ADMIN_TOKEN), &["machine", "events", &id, "--until", "phoned home", "--timeout-s", "60"]);
    watch.stdout(Stdio::piped()).stderr(Stdio::piped());
    let watch = tokio::spawn(output(watch.into()));

    let ins = agent.wait(Duration::from_secs(30)).await.expect("the allocation reaches the agent");
    assert_eq!(ins.hostname, "web-1");
    assert_eq!(ins.ssh_keys, [KEY]);
    assert_eq!(ins.user_data, "hello");
    assert_eq!(ins.image.id, "test-os-20261124");
    agent.install_and_phone_home(&ins).await.expect("install and phone home");

    let run = alloc.await.unwrap();
    let stderr = run.stderr.clone();
    let a: Allocation = run.json(&["machine allocate --wait-for"]);
    assert_eq!(a.machine, agent.id());
    assert_eq!(a.id, ins.allocation);
    assert_eq!(a.hostname, "web-1");
    for want in ["Installing", "Booting New Kernel", "Phoned Home", &format!("machine {id} reached Phoned Home")] {
        assert!(stderr.contains(want), "allocate --wait-for stderr lacks {want:?}:\n{stderr}");
    }
    let run = watch.await.unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.lines().last().unwrap().contains("Phoned Home"), "{run:?}");

    // The tenant sees its machine with the allocation.
    let table = api.ctl(Some(&lab.tenant), &["machine", "ls"]).ok(&["tenant machine ls"]);
    assert!(table.contains("Phoned Home") && table.contains("web-1") && table.contains("test-os-20261124  tenant-a"), "{table}");
    let allocs: Vec<Allocation> = api.ctl(Some(&lab.tenant), &["allocation", "ls", "-o", "yaml"]).yaml(&["allocation ls"]);
    assert_eq!(allocs, vec![a.clone()]);
    let view = api.ctl(Some(&lab.tenant), &["machine", "describe", &id]).ok(&["describe"]);
    assert!(view.contains("  hostname:  web-1\n") && view.contains("  root uuid: 0b4e7d1c"), "{view}");
    let events: Vec<MachineEvent> = api.admin(&["machine", "events", &id, "-o", "json"]).json(&["events -o json"]);
    assert!(events.iter().any(|e| e.event == ProvisioningEvent::PhonedHome));

    // Another tenant neither sees nor frees it: it looks like a machine that does not exist.
    let other = api.dir.path().join("tenant-b.json");
    std::fs::write(&other, r#"{"id": "tenant-b"}"#).unwrap();
    api.admin_ok(&["project", "create", "-f", other.to_str().unwrap()]);
    let b: TokenResponse =
        api.admin(&["token", "create", "--role", "tenant", "--project", "tenant-b", "-o", "json"]).json(&["tenant-b token"]);
    for args in [&["machine", "describe", &id][..], &["machine", "free", &id], &["machine", "events", &id]] {
        let err = api.ctl(Some(&b.token), args).fails(1, "another tenant's machine");
        assert!(err.trim_end().ends_with("(not_found, HTTP 404)"), "{args:?}: {err}");
    }
    assert_eq!(api.ctl(Some(&b.token), &["allocation", "ls", "-o", "json"]).ok(&["b allocations"]).trim(), "[]");
    let b_machines: Vec<Machine> = api.ctl(Some(&b.token), &["machine", "ls", "-o", "json"]).json(&["b machines"]);
    assert!(b_machines.iter().all(|m| m.id != agent.id()), "{b_machines:?}");

    // Nothing else is free.
    let err =
        api.ctl(Some(&lab.tenant), &allocate_args("web-2", &["--size", "lab-small"])).fails(1, "allocate with no machine free");
    assert!(err.starts_with("error: ") && err.trim_end().ends_with("(no_machine_available, HTTP 409)"), "{err}");

    // Free: reclaim.
    let out = api.ctl(Some(&lab.tenant), &["machine", "free", &id]).ok(&["machine free"]);
    assert_eq!(out.trim(), format!("freed machine {id} (state: Machine Reclaim)"));
    let timeline = api.admin_ok(&["machine", "events", &id]);
    assert!(timeline.lines().last().unwrap().contains("Machine Reclaim"), "{timeline}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_ends_on_timeout_and_on_crash() {
    let lab = lab();
    let api = &lab.api;
    let idle = SimAgent::boot_and_register(api, &lab.pixie, 1).await.expect("agent 1");
    let crashing = SimAgent::boot_and_register(api, &lab.pixie, 2).await.expect("agent 2");

    // Nobody installs machine 1: the wait times out with exit 3.
    let r = api.ctl(
        Some(&lab.tenant),
        &allocate_args("slow", &["--machine", &idle.id().to_string(), "--wait-for", "Phoned Home", "--timeout-s", "3"]),
    );
    assert!(r.stdout.contains(&idle.id().to_string()), "{r:?}");
    let err = r.fails(3, "wait-for timeout");
    assert!(err.contains("timed out waiting for Phoned Home") && err.contains("last event: none since the allocation"), "{err}");

    // Machine 2 crashes during the install: exit 4.
    let mut cmd = api.ctl_command(
        Some(&lab.tenant),
        &allocate_args("crash", &["--machine", &crashing.id().to_string(), "--wait-for", "Phoned Home", "--timeout-s", "60"]),
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let run = tokio::spawn(output(cmd.into()));
    let ins = crashing.wait(Duration::from_secs(30)).await.expect("allocation reaches agent 2");
    crashing.events(&[(ProvisioningEvent::Installing, "installing")]).await.unwrap();
    crashing.events(&[(ProvisioningEvent::Crashed, "image checksum mismatch")]).await.unwrap();
    let run = run.await.unwrap();
    assert!(run.stdout.contains("Installing"), "the table timeline goes to stdout: {run:?}");
    let err = run.fails(4, "wait-for crash");
    assert!(err.contains("reported Crashed: image checksum mismatch"), "{err}");
    assert_eq!(ins.hostname, "crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_ends_when_the_machine_crash_loops() {
    let lab = lab();
    let api = &lab.api;
    let agent = SimAgent::boot_and_register(api, &lab.pixie, 1).await.expect("agent");
    let args = allocate_args("looping", &["--size", "lab-small", "--wait-for", "Phoned Home", "--timeout-s", "60"]);
    let mut cmd = api.ctl_command(Some(&lab.tenant), &args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let run = tokio::spawn(output(cmd.into()));
    agent.wait(Duration::from_secs(30)).await.expect("allocation reaches the agent");
    // The machine starts installing, PXE boots and metal-hammer starts again, over and over.
    for _ in 0..3 {
        agent.events(&[(ProvisioningEvent::Installing, "installing")]).await.unwrap();
        agent.pxe_boot(&lab.pixie).await.unwrap();
        agent.events(&[(ProvisioningEvent::Preparing, "starting again")]).await.unwrap();
    }
    let m: Machine = api.admin(&["machine", "describe", &agent.id().to_string(), "-o", "json"]).json(&["describe"]);
    assert!(m.crash_loop, "the API did not flag the crash loop: {m:?}");
    let run = run.await.unwrap();
    let err = run.fails(4, "wait-for on a crash-looping machine");
    assert!(err.contains("is crash-looping"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_never_allocates_twice() {
    let lab = lab();
    let api = &lab.api;
    let _a = SimAgent::boot_and_register(api, &lab.pixie, 1).await.expect("agent 1");
    let _b = SimAgent::boot_and_register(api, &lab.pixie, 2).await.expect("agent 2");
    let args = allocate_args("idem", &["--size", "lab-small", "--idempotency-key", "order-42", "-o", "json"]);
    let first: Allocation = api.ctl(Some(&lab.tenant), &args).json(&["first"]);
    let again = api.ctl(Some(&lab.tenant), &args);
    assert!(again.stderr.contains("an earlier request with this idempotency key"), "{again:?}");
    let second: Allocation = again.json(&["second"]);
    assert_eq!(first, second);
    assert_eq!(first.idempotency_key.as_deref(), Some("order-42"));
    let allocs: Vec<Allocation> = api.admin(&["allocation", "ls", "-o", "json"]).json(&["allocation ls"]);
    assert_eq!(allocs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_redraw_and_stop_on_ctrl_c() {
    let lab = lab();
    let api = &lab.api;
    let agent = SimAgent::boot_and_register(api, &lab.pixie, 1).await.expect("agent");

    // machine ls --watch, piped: one snapshot after the other, every 2 s.
    let mut cmd: tokio::process::Command = api.ctl_command(Some(ADMIN_TOKEN), &["machine", "ls", "--watch"]).into();
    cmd.stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = tokio::time::Instant::now();
    let mut snapshots = 0;
    let mut rows = 0;
    while snapshots < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("machine ls --watch printed nothing for 10 s")
            .unwrap()
            .expect("machine ls --watch ended");
        snapshots += usize::from(line.starts_with("every 2s: machine ls"));
        rows += usize::from(line.starts_with(&agent.id().to_string()));
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "redrawn too fast: {:?}", started.elapsed());
    assert!(rows >= 1);
    interrupt(&child);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));

    // With -o json a watch writes one event per line; --until an event that already is the
    // latest one ends at once.
    let id = agent.id().to_string();
    let out = api.admin(&["machine", "events", &id, "--until", "Waiting", "-o", "json"]).ok(&["events --until -o json"]);
    let events: Vec<MachineEvent> = out.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    assert_eq!(events.last().map(|e| e.event), Some(ProvisioningEvent::Waiting), "{out}");

    // machine events --watch prints new events as they come and ends with Ctrl-C, exit 0.
    let mut cmd: tokio::process::Command = api
        .ctl_command(Some(ADMIN_TOKEN), &["machine", "events", &agent.id().to_string(), "--watch", "--interval-s", "0.2"])
        .into();
    cmd.stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.expect("no line for 10 s").unwrap().expect("ended")
    };
    assert!(next().await.starts_with("AGENT TIME (UTC)"));
    let mut line = next().await;
    while !line.contains("Waiting") {
        line = next().await;
    }
    agent.events(&[(ProvisioningEvent::PlannedReboot, "operator reboot")]).await.unwrap();
    let line = next().await;
    assert!(line.contains("Planned Reboot") && line.contains("operator reboot"), "{line}");
    interrupt(&child);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_survives_an_api_restart() {
    let mut lab = lab();
    let agent = SimAgent::boot_and_register(&lab.api, &lab.pixie, 1).await.expect("agent");
    let args = allocate_args("survivor", &["--size", "lab-small", "--wait-for", "Phoned Home", "--timeout-s", "60"]);
    let mut cmd: tokio::process::Command = lab.api.ctl_command(Some(&lab.tenant), &args).into();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let stdout = tokio::spawn(async move {
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut s).await.unwrap();
        s
    });
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();

    let ins = agent.wait(Duration::from_secs(30)).await.expect("allocation reaches the agent");
    agent.events(&[(ProvisioningEvent::Installing, "installing")]).await.unwrap();
    lab.api.kill();
    // metalctl notices the API is gone and keeps polling.
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
            .await
            .expect("metalctl said nothing for 10 s after the API went away")
            .unwrap()
            .expect("metalctl ended while the API was down");
        if line.starts_with("warning: cannot reach the API") && line.ends_with("(retrying)") {
            break;
        }
    }
    lab.api.restart();
    agent.install_and_phone_home(&ins).await.expect("install after the restart");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    let out = stdout.await.unwrap();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("survivor") && out.lines().last().unwrap().contains("Phoned Home"), "{out}");
}

/// Ctrl-C for a child we started.
fn interrupt(child: &tokio::process::Child) {
    let pid = child.id().expect("child still running").to_string();
    let ok = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success();
    assert!(ok, "kill -INT {pid}");
}
