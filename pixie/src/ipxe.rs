//! iPXE scripts as a pure function of the API's boot decision (or of why there is none).

use metal_types::{Arch, BootDecision};

/// What the script is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptInput<'a> {
    Decision {
        decision: &'a BootDecision,
        arch: Arch,
        retry_url: &'a str,
        attempt: u32,
    },
    /// No usable decision: iPXE waits and asks again at `retry_url` (which carries `attempt + 1`).
    Retry {
        reason: &'a str,
        retry_url: &'a str,
        attempt: u32,
    },
}

/// Seconds to wait before attempt `attempt + 1`: 2, 4, 8, 16, 32, then 60.
pub fn backoff_s(attempt: u32) -> u32 {
    if attempt >= 5 {
        60
    } else {
        2u32 << attempt
    }
}

/// Text that goes into an `echo` line: no newlines and nothing iPXE would expand or split on.
fn echo_safe(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() || matches!(c, '$' | '{' | '}' | '|' | '&' | '#' | '\\') { ' ' } else { c })
        .collect();
    cleaned.chars().take(200).collect()
}

/// Whether a value from the API can be put on a script line as is: a URL or command line with
/// no line breaks and no iPXE setting expansion.
fn line_safe(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_control() || c == '$')
}

fn retry(reason: &str, retry_url: &str, attempt: u32) -> String {
    let wait = backoff_s(attempt);
    format!(
        "#!ipxe\n\
         echo pixie: no boot decision: {reason}\n\
         echo pixie: asking again in {wait} s (attempt {next})\n\
         sleep {wait}\n\
         chain --replace {retry_url} || goto retry\n\
         :retry\n\
         sleep {wait}\n\
         chain --replace {retry_url}\n",
        reason = echo_safe(reason),
        next = attempt + 1,
    )
}

/// Renders the script.
pub fn render(input: &ScriptInput<'_>) -> String {
    match input {
        ScriptInput::Retry { reason, retry_url, attempt } => retry(reason, retry_url, *attempt),
        ScriptInput::Decision { decision, arch, retry_url, attempt } => match decision {
            BootDecision::Hammer { kernel_url, initrd_url, cmdline } => {
                if !line_safe(kernel_url) || !line_safe(initrd_url) || cmdline.chars().any(|c| c.is_control() || c == '$') {
                    return retry("the API's boot decision contains characters iPXE cannot take", retry_url, *attempt);
                }
                let args = if cmdline.trim().is_empty() { String::new() } else { format!(" {}", cmdline.trim()) };
                format!(
                    "#!ipxe\n\
                     echo pixie: booting metal-hammer\n\
                     kernel {kernel_url}{args} initrd=initrd.img || goto failed\n\
                     initrd --name initrd.img {initrd_url} || goto failed\n\
                     boot || goto failed\n\
                     :failed\n\
                     echo pixie: loading metal-hammer failed, asking again in {wait} s\n\
                     sleep {wait}\n\
                     chain --replace {retry_url}\n",
                    wait = backoff_s(*attempt),
                )
            }
            BootDecision::LocalDisk => match arch {
                Arch::BiosX86 => "#!ipxe\n\
                     echo pixie: booting from the local disk\n\
                     sanboot --no-describe --drive 0x80\n"
                    .to_string(),
                // UEFI (and anything unknown): leave iPXE with a failure status. EDK2's boot
                // manager treats a boot option that returns success as "done" and opens its
                // setup menu; on a failure it tries the next boot option.
                _ => "#!ipxe\n\
                     echo pixie: booting from the local disk\n\
                     exit 1\n"
                    .to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://10.99.0.1:8081/ipxe?mac=52:54:00:12:34:56&arch=bios_x86&attempt=1";

    #[test]
    fn hammer_script() {
        let d = BootDecision::Hammer {
            kernel_url: "http://10.99.0.1:8081/hammer/vmlinuz".into(),
            initrd_url: "http://10.99.0.1:8081/hammer/initrd.img".into(),
            cmdline: "console=ttyS0 metal.api=http://10.99.0.1:8080 metal.token=abc".into(),
        };
        let s = render(&ScriptInput::Decision { decision: &d, arch: Arch::BiosX86, retry_url: URL, attempt: 0 });
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "#!ipxe");
        assert_eq!(
            lines[2],
            "kernel http://10.99.0.1:8081/hammer/vmlinuz console=ttyS0 metal.api=http://10.99.0.1:8080 metal.token=abc initrd=initrd.img || goto failed"
        );
        assert_eq!(lines[3], "initrd --name initrd.img http://10.99.0.1:8081/hammer/initrd.img || goto failed");
        assert_eq!(lines[4], "boot || goto failed");
        assert!(s.ends_with(&format!("chain --replace {URL}\n")));
    }

    #[test]
    fn local_disk_by_arch() {
        let d = BootDecision::LocalDisk;
        let bios = render(&ScriptInput::Decision { decision: &d, arch: Arch::BiosX86, retry_url: URL, attempt: 0 });
        assert!(bios.contains("\nsanboot --no-describe --drive 0x80\n"));
        for arch in [Arch::UefiX64, Arch::UefiArm64, Arch::Unknown] {
            let efi = render(&ScriptInput::Decision { decision: &d, arch, retry_url: URL, attempt: 0 });
            assert!(efi.ends_with("\nexit 1\n") && !efi.contains("sanboot"), "{arch:?}");
        }
    }

    #[test]
    fn retry_script_backs_off_and_boots_nothing() {
        let s = render(&ScriptInput::Retry { reason: "API unreachable\n${evil} || shell", retry_url: URL, attempt: 2 });
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("\nsleep 8\n"));
        assert!(s.contains(&format!("chain --replace {URL}")));
        for l in s.lines() {
            assert!(
                !l.starts_with("kernel") && !l.starts_with("boot") && !l.starts_with("sanboot") && !l.starts_with("exit"),
                "{l}"
            );
        }
        assert!(!s.contains("${"));
        assert_eq!(s.lines().filter(|l| l.starts_with("echo")).count(), 2, "{s}");
        assert_eq!((backoff_s(0), backoff_s(4), backoff_s(5), backoff_s(1000)), (2, 32, 60, 60));
    }

    #[test]
    fn unsafe_decision_turns_into_a_retry() {
        let d = BootDecision::Hammer {
            kernel_url: "http://x/k\nshell".into(),
            initrd_url: "http://x/i".into(),
            cmdline: String::new(),
        };
        let s = render(&ScriptInput::Decision { decision: &d, arch: Arch::BiosX86, retry_url: URL, attempt: 0 });
        assert!(!s.contains("kernel ") && s.contains("sleep"));
    }
}
