//! `/ipxe` for every decision and architecture, through pixie's real HTTP server on loopback
//! with an in-memory decider (`pixie::api::StaticDecider`) in place of the API: metal-hammer,
//! the local disk (BIOS and UEFI differ), the retry script when the API fails, the MAC and UUID
//! as pixie reads them off the query, and a request without a MAC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metal_types::{Arch, BootDecision};
use pixie::api::{BootDecider, DecisionCache, StaticDecider};
use pixie::http::{HttpLimits, HttpState, StaticDirs};
use pixie::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PUBLIC: &str = "http://10.99.0.1:8081";

async fn start(decider: Arc<StaticDecider>) -> SocketAddr {
    let state = Arc::new(HttpState {
        // No reuse between requests: each case sees its own answer.
        decisions: DecisionCache::shared(decider as Arc<dyn BootDecider>, Duration::ZERO),
        hammer: None,
        hammer_upstream: None,
        boot: None,
        partition: "lab".into(),
        public_url: PUBLIC.into(),
        metrics: Arc::new(Metrics::default()),
        limits: HttpLimits::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { pixie::http::serve(listener, state, &StaticDirs { images: None }, std::future::pending()).await });
    addr
}

/// (status, body) of `GET <path>`.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pixie\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn hammer() -> BootDecision {
    BootDecision::Hammer {
        kernel_url: format!("{PUBLIC}/hammer/vmlinuz"),
        initrd_url: format!("{PUBLIC}/hammer/initrd.img"),
        cmdline: "console=ttyS0 metal.api=https://10.99.0.1:8080 metal.token=abc metal.partition=lab".into(),
    }
}

const ARCHES: [(&str, Arch); 5] = [
    ("bios_x86", Arch::BiosX86),
    ("uefi_x64", Arch::UefiX64),
    ("uefi_x64_http", Arch::UefiX64Http),
    ("uefi_arm64", Arch::UefiArm64),
    ("something-else", Arch::Unknown),
];

#[tokio::test]
async fn every_decision_for_every_architecture() {
    let mut decider = StaticDecider::default();
    for (i, _) in ARCHES.iter().enumerate() {
        decider = decider
            .with(&format!("52:54:00:00:01:0{i}"), Ok(hammer()))
            .with(&format!("52:54:00:00:02:0{i}"), Ok(BootDecision::LocalDisk))
            .with(&format!("52:54:00:00:03:0{i}"), Err("database unavailable".into()));
    }
    let decider = Arc::new(decider);
    let addr = start(decider.clone()).await;
    for (i, (name, arch)) in ARCHES.iter().enumerate() {
        // metal-hammer: kernel with the decision's command line, initrd, boot; a retry on failure.
        let (status, s) = get(addr, &format!("/ipxe?mac=52:54:00:00:01:0{i}&arch={name}")).await;
        assert_eq!(status, 200, "{name}: {s}");
        assert!(s.starts_with("#!ipxe\n"), "{name}: {s}");
        assert!(
            s.contains(&format!(
                "\nkernel {PUBLIC}/hammer/vmlinuz console=ttyS0 metal.api=https://10.99.0.1:8080 metal.token=abc \
                 metal.partition=lab initrd=initrd.img || goto failed\n"
            )),
            "{name}: {s}"
        );
        assert!(s.contains(&format!("\ninitrd --name initrd.img {PUBLIC}/hammer/initrd.img || goto failed\n")), "{name}: {s}");
        assert!(s.contains("\nboot || goto failed\n"), "{name}: {s}");

        // The local disk: SAN boot of drive 0x80 on BIOS; on UEFI (and unknown) leave iPXE
        // failing, so the firmware goes on to the disk's boot entry.
        let (status, s) = get(addr, &format!("/ipxe?mac=52:54:00:00:02:0{i}&arch={name}")).await;
        assert_eq!(status, 200);
        if *arch == Arch::BiosX86 {
            assert!(s.contains("\nsanboot --no-describe --drive 0x80\n") && !s.contains("exit"), "{name}: {s}");
        } else {
            assert!(s.ends_with("\nexit 1\n") && !s.contains("sanboot"), "{name}: {s}");
        }
        assert!(!s.contains("kernel "), "{name}: {s}");

        // The API failed: wait and ask again, the attempt counted up in the URL; nothing boots.
        let (status, s) = get(addr, &format!("/ipxe?mac=52:54:00:00:03:0{i}&arch={name}&attempt=2")).await;
        assert_eq!(status, 200);
        let arch_label = if *arch == Arch::Unknown { "unknown" } else { name };
        assert!(
            s.contains(&format!("chain --replace {PUBLIC}/ipxe?mac=52:54:00:00:03:0{i}&arch={arch_label}&attempt=3")),
            "{name}: {s}"
        );
        assert!(s.contains("\nsleep "), "{name}: {s}");
        assert!(!s.contains("kernel ") && !s.contains("sanboot") && !s.contains("exit"), "{name}: {s}");
    }
    // What the decider was asked: the partition, the architecture as parsed, no UUID.
    let seen = decider.seen();
    assert_eq!(seen.len(), 3 * ARCHES.len());
    for (i, (_, arch)) in ARCHES.iter().enumerate() {
        let r = &seen[3 * i];
        assert_eq!((r.partition.as_str(), r.arch, r.uuid), ("lab", *arch, None));
    }
}

#[tokio::test]
async fn the_mac_and_uuid_as_the_api_is_asked_for_them() {
    let decider = Arc::new(StaticDecider::always(Ok(hammer())));
    let addr = start(decider.clone()).await;
    // A dashed upper-case MAC (iPXE's `${net0/mac:hexhyp}`) reaches the API canonical.
    let (status, _) = get(addr, "/ipxe?mac=52-54-00-AA-BB-CC&uuid=6b1f2c3d-0000-4000-8000-000000000001&arch=bios_x86").await;
    assert_eq!(status, 200);
    // An unexpanded `${uuid}` is left out, the API matches by MAC.
    let (status, _) = get(addr, "/ipxe?mac=52:54:00:aa:bb:cd&uuid=%24%7Buuid%7D&arch=bios_x86").await;
    assert_eq!(status, 200);
    let seen = decider.seen();
    assert_eq!(seen[0].mac, "52:54:00:aa:bb:cc");
    assert_eq!(seen[0].uuid.map(|u| u.to_string()).as_deref(), Some("6b1f2c3d-0000-4000-8000-000000000001"));
    assert_eq!((seen[1].mac.as_str(), seen[1].uuid), ("52:54:00:aa:bb:cd", None));

    // No MAC, or not a MAC: 400 and the decider is not asked.
    for bad in ["/ipxe", "/ipxe?mac=nonsense", "/ipxe?mac=52:54:00:aa:bb"] {
        let (status, body) = get(addr, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(decider.seen().len(), 2);
}
