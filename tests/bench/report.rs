//! The benchmark report: the machine it ran on, then one table per benchmark.

use std::process::Command;

pub struct Report {
    sections: Vec<String>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!(
        "- CPU: {model}, {cores} cores\n- memory: {mem_gib:.1} GiB\n- kernel: {}\n- rustc: {}\n- date: {}\n",
        first_line("uname", &["-sr"]),
        first_line("rustc", &["--version"]),
        first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}

impl Report {
    pub fn new() -> Self {
        Self {
            sections: Vec::new(),
        }
    }

    pub fn section(&mut self, text: String) {
        eprintln!("{text}");
        self.sections.push(text);
    }

    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Benchmarks\n\n\
             Measured by `cellplane-bench` (tests/bench/) against real `cellplane serve` processes \
             (release build) on loopback, every node durable (fsync per log append), with the load \
             generator on the same machine. Reproduce with:\n\n\
             ```sh\ncargo build --release --workspace --bins\n\
             target/release/cellplane-bench all --out docs/benchmarks.md\n```\n\n\
             ## Machine\n\n",
        );
        out.push_str(&machine());
        for section in &self.sections {
            out.push('\n');
            out.push_str(section);
        }
        out
    }
}
