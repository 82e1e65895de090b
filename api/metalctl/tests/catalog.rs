//! metalctl against a real metal-api: the catalog from the example files, listed in every
//! output format; tokens; configuration precedence; error paths.

mod common;

use common::{clean_ctl, example, listening_addr, Api, Run, ADMIN_TOKEN};
use metal_types::{FilesystemLayout, Image, Partition, Project, Size, TokenResponse};

#[test]
fn catalog_from_the_example_files_in_every_format() {
    let api = Api::start();

    // Create: one object in, one object out (the project file holds a list).
    let p: Partition =
        api.admin(&["partition", "create", "-f", &example("partition.yaml"), "-o", "json"]).json(&["partition create"]);
    assert_eq!(p.id, "lab");
    assert_eq!(p.boot.api_url, "http://10.99.0.1:8080");
    let s: Size = api.admin(&["-o", "yaml", "size", "create", "-f", &example("size.yaml")]).yaml(&["size create"]);
    assert_eq!(s.id, "lab-small");
    let out = api.admin_ok(&["layout", "create", "-f", &example("layout.yaml")]);
    assert!(out.starts_with("ID ") && out.contains("lab-efi-ext4"), "{out}");
    let projects: Vec<Project> =
        api.admin(&["project", "create", "-f", &example("project.yaml"), "-o", "json"]).json(&["project create"]);
    assert_eq!(projects.len(), 1);
    let image: Image = api.admin(&["image", "create", "-f", &example("image.yaml"), "-o", "json"]).json(&["image create"]);
    assert_eq!(image.id, "test-os-20261124");

    // ls in the three formats.
    let table = api.admin_ok(&["partition", "ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("ID   API URL"), "{table}");
    assert!(lines[1].starts_with("lab  http://10.99.0.1:8080"), "{table}");
    let json: Vec<Partition> = api.admin(&["partition", "ls", "-o", "json"]).json(&["partition ls"]);
    assert_eq!(json, vec![p.clone()]);
    let yaml: Vec<Partition> = api.admin(&["partition", "ls", "-o", "yaml"]).yaml(&["partition ls"]);
    assert_eq!(yaml, vec![p]);

    let sizes: Vec<Size> = api.admin(&["size", "ls", "-o", "yaml"]).yaml(&["size ls"]);
    assert_eq!(sizes, vec![s]);
    assert!(api.admin_ok(&["size", "ls"]).contains("lab-small  1 - 64  512 MiB - 64 GiB  1 GiB - 1 TiB"));
    let layouts: Vec<FilesystemLayout> = api.admin(&["layout", "ls", "-o", "json"]).json(&["layout ls"]);
    assert_eq!(layouts[0].filesystems[1].mount.as_deref(), Some("/"));
    assert!(api.admin_ok(&["layout", "ls"]).contains("first:1 efi 64 MiB, first:2 linux rest"));
    let images: Vec<Image> = api.admin(&["image", "ls", "-o", "json"]).json(&["image ls"]);
    assert_eq!(images, vec![image.clone()]);
    assert!(api.admin_ok(&["image", "ls"]).contains("test-os-20261124  test-os  20261124  tar.zst  12 MiB"));
    assert!(api.admin_ok(&["project", "ls"]).contains("tenant-a  lab tenant"));

    // describe: YAML by default; an image by bare name is the newest of that name.
    let d: Image = api.admin(&["image", "describe", "test-os"]).yaml(&["image describe"]);
    assert_eq!(d, image);
    let d: Project = api.admin(&["project", "describe", "tenant-a", "-o", "json"]).json(&["project describe"]);
    assert_eq!(d.id, "tenant-a");

    // Creating the same object again changes nothing; other content under the same id is the
    // API's conflict, reported as such.
    let r = api.admin(&["size", "create", "-f", &example("size.yaml")]);
    assert!(r.stderr.contains("size lab-small exists already with this content: unchanged"), "{r:?}");
    r.ok(&["size create again"]);
    let changed = api.dir.path().join("size.yaml");
    let text = std::fs::read_to_string(example("size.yaml")).unwrap().replace("lab VM", "changed");
    std::fs::write(&changed, text).unwrap();
    let err = api.admin(&["size", "create", "-f", changed.to_str().unwrap()]).fails(1, "changed size");
    assert!(err.starts_with("error: ") && err.trim_end().ends_with("(conflict, HTTP 409)"), "{err}");

    // delete, then it is gone.
    let r = api.admin(&["project", "delete", "tenant-a"]);
    assert!(r.stderr.contains("deleted project tenant-a"), "{r:?}");
    r.ok(&["project delete"]);
    let err = api.admin(&["project", "describe", "tenant-a"]).fails(1, "describe deleted project");
    assert!(err.contains("(not_found, HTTP 404)"), "{err}");
    assert_eq!(api.admin_ok(&["project", "ls", "-o", "json"]).trim(), "[]");
}

#[test]
fn image_from_a_builder_manifest() {
    let api = Api::start();
    let manifest = api.dir.path().join("debian-12-20261124.1.tar.zst.json");
    std::fs::write(
        &manifest,
        r#"{"name":"debian-12","version":"20261124.1","os":"Debian GNU/Linux 12 (bookworm)","format":"tar.zst",
            "compressed_size":300000000,"uncompressed_size":1200000000,
            "sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "kernel":"boot/vmlinuz","initrd":"boot/initrd.img","cmdline":"console=ttyS0","packages":["bash 5.2"]}"#,
    )
    .unwrap();
    let url = "http://10.99.0.1:8081/images/debian-12-20261124.1.tar.zst";
    let image: Image = api
        .admin(&[
            "image",
            "create",
            "--manifest",
            manifest.to_str().unwrap(),
            "--url",
            url,
            "--classification",
            "preview",
            "-o",
            "json",
        ])
        .json(&["image create --manifest"]);
    assert_eq!(image.id, "debian-12-20261124.1");
    assert_eq!(image.url, url);
    assert_eq!(image.manifest.packages, ["bash 5.2"]);
    let err = api.admin(&["image", "create", "--manifest", "/nonexistent.json", "--url", url]).fails(1, "missing manifest");
    assert!(err.contains("cannot read /nonexistent.json"), "{err}");
    api.admin_ok(&["image", "delete", "debian-12-20261124.1"]);
    assert_eq!(api.admin_ok(&["image", "ls", "-o", "json"]).trim(), "[]");
}

#[test]
fn wrong_or_missing_tokens_are_clear_errors() {
    let api = Api::start();
    let err = api.ctl(Some("not-a-token"), &["partition", "ls"]).fails(1, "wrong token");
    assert!(err.starts_with("error: ") && err.trim_end().ends_with("(unauthorized, HTTP 401)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let err = api.ctl(None, &["size", "ls"]).fails(1, "no token");
    assert!(err.contains("(unauthorized, HTTP 401)"), "{err}");
    // A watch with a bad token ends instead of polling forever.
    let err = api.ctl(Some("not-a-token"), &["machine", "ls", "--watch"]).fails(1, "watch with a wrong token");
    assert!(err.contains("(unauthorized, HTTP 401)"), "{err}");
    // Health needs no token.
    assert_eq!(api.ctl(None, &["health"]).ok(&["health"]).trim(), "ok");
}

#[test]
fn tenant_tokens_are_scoped() {
    let api = Api::start();
    api.create_examples();
    let err = api.admin(&["token", "create", "--role", "tenant"]).fails(1, "tenant token without project");
    assert!(err.contains("--project"), "{err}");
    let t: TokenResponse =
        api.admin(&["token", "create", "--role", "tenant", "--project", "tenant-a", "-o", "json"]).json(&["token create"]);
    assert_eq!(t.project.as_deref(), Some("tenant-a"));
    assert!(!t.token.is_empty());
    let table = api.admin_ok(&["token", "create", "--role", "pixie", "--description", "lab pixie"]);
    assert!(table.starts_with("ID ") && table.contains("pixie"), "{table}");

    // A tenant lists its (empty) allocations but cannot change the catalog.
    assert_eq!(api.ctl(Some(&t.token), &["allocation", "ls", "-o", "json"]).ok(&["allocation ls"]).trim(), "[]");
    let err = api.ctl(Some(&t.token), &["size", "delete", "lab-small"]).fails(1, "tenant deletes a size");
    assert!(err.contains("(forbidden, HTTP 403)"), "{err}");
}

#[test]
fn flags_beat_env_beat_config_file() {
    let api = Api::start();
    let home = tempfile::tempdir().unwrap();
    let cfg_dir = home.path().join(".config/metalctl");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(cfg_dir.join("config.yaml"), format!("api_url: {}\ntoken: {ADMIN_TOKEN}\n", api.url)).unwrap();
    let run = |envs: &[(&str, &str)], args: &[&str]| -> Run {
        let mut cmd = clean_ctl(home.path());
        cmd.envs(envs.iter().copied()).args(args);
        Run::from(cmd.output().unwrap())
    };

    // The default config file alone is enough; a token in a file others can read is pointed out.
    use std::os::unix::fs::PermissionsExt;
    let cfg = cfg_dir.join("config.yaml");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run(&[], &["project", "ls", "-o", "json"]);
    assert!(r.stderr.contains("readable by others (mode 0644)"), "{r:?}");
    assert_eq!(r.ok(&["config file"]).trim(), "[]");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = run(&[], &["project", "ls"]);
    assert_eq!(r.stderr, "");
    r.ok(&["private config file"]);
    // The environment beats the file …
    let err = run(&[("METAL_TOKEN", "wrong")], &["project", "ls"]).fails(1, "env token");
    assert!(err.contains("HTTP 401"), "{err}");
    // … and the flag beats the environment.
    run(&[("METAL_TOKEN", "wrong")], &["--token", ADMIN_TOKEN, "project", "ls"]).ok(&["flag token"]);
    // The same for the URL: a dead URL in the environment, the real one as a flag.
    let dead = "http://127.0.0.1:9";
    let err = run(&[("METAL_API_URL", dead)], &["project", "ls"]).fails(1, "dead env url");
    assert!(err.contains("cannot reach the API: GET http://127.0.0.1:9/v1/projects"), "{err}");
    run(&[("METAL_API_URL", dead)], &["--api-url", &api.url, "project", "ls"]).ok(&["flag url"]);

    // --config names another file, which must exist and be valid.
    let other = home.path().join("other.yaml");
    std::fs::write(&other, format!("api_url: {}\ntoken: wrong\n", api.url)).unwrap();
    let err = run(&[], &["--config", other.to_str().unwrap(), "project", "ls"]).fails(1, "--config");
    assert!(err.contains("HTTP 401"), "{err}");
    std::fs::write(&other, "api_url: x\ntokn: y\n").unwrap();
    let err = run(&[], &["--config", other.to_str().unwrap(), "project", "ls"]).fails(1, "bad --config");
    assert!(err.contains("is not valid") && err.contains("tokn"), "{err}");
    let err = run(&[], &["--config", "/nonexistent/c.yaml", "health"]).fails(1, "missing --config");
    assert!(err.contains("cannot read config file /nonexistent/c.yaml"), "{err}");

    // No URL anywhere.
    let empty = tempfile::tempdir().unwrap();
    let err = Run::from(clean_ctl(empty.path()).args(["project", "ls"]).output().unwrap()).fails(1, "no url");
    assert!(err.contains("no API URL") && err.contains("--api-url") && err.contains("METAL_API_URL"), "{err}");
}

#[test]
fn bad_files_name_the_problem() {
    let api = Api::start();
    let f = api.dir.path().join("size.yaml");
    std::fs::write(&f, "id: x\nconstraints: []\ncolour: blue\n").unwrap();
    let err = api.admin(&["size", "create", "-f", f.to_str().unwrap()]).fails(1, "unknown field");
    assert!(err.contains("is not a valid size (YAML)") && err.contains("colour") && err.contains("line"), "{err}");

    // A list stops at the first failure; the ones before it stay created.
    let c = "constraints: [{kind: cores, min: 1, max: 2}]";
    std::fs::write(&f, format!("- {{id: a, {c}}}\n- {{id: a, description: other, {c}}}\n- {{id: c, {c}}}\n")).unwrap();
    let r = api.admin(&["size", "create", "-f", f.to_str().unwrap()]);
    assert!(r.stdout.contains("\na "), "{r:?}");
    let err = r.fails(1, "duplicate in a list");
    assert!(err.contains(r#"size "a" (2 of 3)"#) && err.contains("HTTP 409"), "{err}");
    let sizes: Vec<Size> = api.admin(&["size", "ls", "-o", "json"]).json(&["size ls"]);
    assert_eq!(sizes.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a"]);
}

#[test]
fn finds_the_listening_address_in_any_log_format() {
    let plain = "2026-11-24T11:00:00Z  INFO metal_api: listening on 127.0.0.1:41234\n";
    assert_eq!(listening_addr(plain), Some("127.0.0.1:41234".parse().unwrap()));
    let json = r#"{"level":"INFO","fields":{"message":"listening on http://127.0.0.1:5555/"}}"#;
    assert_eq!(listening_addr(json), Some("127.0.0.1:5555".parse().unwrap()));
    let kv = "INFO metal_api: listening on addr=127.0.0.1:80 db=sqlite";
    assert_eq!(listening_addr(kv), Some("127.0.0.1:80".parse().unwrap()));
    assert_eq!(listening_addr("starting\n"), None);
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let api = Api::start();
    api.create_examples();
    // The reader of stdout goes away before metalctl writes (it first asks the API).
    let mut cmd = api.ctl_command(Some(ADMIN_TOKEN), &["partition", "ls"]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
