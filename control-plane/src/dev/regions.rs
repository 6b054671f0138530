//! The regions of `cellplane dev`: which cells run where, and the agent processes that run
//! them.
//!
//! Each region gets one `cell-agent` process, started from the binary beside `cellplane`,
//! with a config file in the dev data directory. Cell ports are chosen on the first run and
//! kept in those files, so a restarted `cellplane dev` finds its cells' data and addresses
//! again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cellplane_api::dir_lock::{DirLock, DirLockError};
use cellplane_api::tls::TlsPaths;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::{Child, Command};

use super::DevError;

/// One cell of the dev system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevCell {
    pub cell_id: String,
    pub region: String,
    pub zone: String,
    pub tier: String,
    pub endpoint: String,
    /// The primary this cell is a standby of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_of: Option<String>,
}

/// A cell of the layout: `(cell_id, zone, tier, standby_of)`.
pub type CellLayout = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

/// The dev system's cells by region, as the tiers say: every NORMAL primary has an in-region
/// standby in another zone; every HIGH primary has one too, and a remote standby in the other
/// region; LOW cells have none. Two NORMAL primaries in cn-hangzhou give `--demo` somewhere to
/// move a tenant.
pub const LAYOUT: &[(&str, &[CellLayout])] = &[
    (
        "cn-hangzhou",
        &[
            ("hz-a-high-1", "hz-a", "HIGH", None),
            ("hz-a-normal-1", "hz-a", "NORMAL", None),
            ("hz-b-normal-2", "hz-b", "NORMAL", None),
            ("hz-c-low-1", "hz-c", "LOW", None),
            ("hz-b-high-s1", "hz-b", "HIGH", Some("hz-a-high-1")),
            ("hz-c-normal-s1", "hz-c", "NORMAL", Some("hz-a-normal-1")),
            ("hz-c-normal-s2", "hz-c", "NORMAL", Some("hz-b-normal-2")),
            ("hz-c-high-r1", "hz-c", "HIGH", Some("bj-a-high-1")),
        ],
    ),
    (
        "cn-beijing",
        &[
            ("bj-a-high-1", "bj-a", "HIGH", None),
            ("bj-b-normal-1", "bj-b", "NORMAL", None),
            ("bj-c-low-1", "bj-c", "LOW", None),
            ("bj-b-high-s1", "bj-b", "HIGH", Some("bj-a-high-1")),
            ("bj-c-normal-s1", "bj-c", "NORMAL", Some("bj-b-normal-1")),
            ("bj-c-high-r1", "bj-c", "HIGH", Some("hz-a-high-1")),
        ],
    ),
];

const DEV_CELL_CAPACITY: u64 = 10_000;

/// How long an agent may take to stop its cells before it is killed.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

fn io_error(path: &Path, source: std::io::Error) -> DevError {
    DevError::DataDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Tries at picking a cell's port before giving up.
const PORT_TRIES: usize = 1_000;

/// A loopback address with a port that was free a moment ago, below the kernel's ephemeral
/// range (32768 and up on Linux): a port the kernel hands out for `:0` is also what it hands
/// the next outgoing connection, which could take it before the cell binds it, and the cell
/// would then fail to start.
fn free_address(dir: &Path) -> Result<String, DevError> {
    let mut last = None;
    for _ in 0..PORT_TRIES {
        let port: u16 = rand::random_range(20_000..32_000);
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => return Ok(format!("127.0.0.1:{port}")),
            Err(error) => last = Some(error),
        }
    }
    Err(io_error(
        dir,
        last.unwrap_or_else(|| std::io::Error::other("no free port")),
    ))
}

/// The cells of `region` with their addresses: read from its agent config when one exists,
/// else chosen now.
fn region_cells(
    agents_dir: &Path,
    region: &str,
    cells: &[CellLayout],
) -> Result<Vec<DevCell>, DevError> {
    let config_path = agents_dir.join(format!("{region}.toml"));
    let known: Vec<(String, String)> = match std::fs::read_to_string(&config_path) {
        Ok(text) => {
            let parsed: toml::Table = toml::from_str(&text).map_err(|e| DevError::ClusterFile {
                path: config_path.clone(),
                message: e.to_string(),
            })?;
            parsed
                .get("cells")
                .and_then(|c| c.as_array())
                .map(|cells| {
                    cells
                        .iter()
                        .filter_map(|c| {
                            Some((
                                c.get("cell_id")?.as_str()?.to_string(),
                                c.get("listen")?.as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error(&config_path, e)),
    };
    let mut out = Vec::new();
    for (cell_id, zone, tier, standby_of) in cells {
        let endpoint = match known.iter().find(|(id, _)| id == cell_id) {
            Some((_, listen)) => listen.clone(),
            None => free_address(agents_dir)?,
        };
        out.push(DevCell {
            cell_id: cell_id.to_string(),
            region: region.to_string(),
            zone: zone.to_string(),
            tier: tier.to_string(),
            endpoint,
            standby_of: standby_of.map(str::to_string),
        });
    }
    Ok(out)
}

/// Writes the agent config of `region`; standbys name their primary's endpoint, which for a
/// remote standby is another region's cell.
fn write_config(
    agents_dir: &Path,
    region: &str,
    all: &[DevCell],
    tls: Option<&TlsPaths>,
) -> Result<(), DevError> {
    let config_path = agents_dir.join(format!("{region}.toml"));
    let mut config = format!(
        "# Written by `cellplane dev`.\ndata_dir = {:?}\nheartbeat_interval_ms = 1000\n",
        agents_dir.join(region)
    );
    if let Some(tls) = tls {
        config.push_str(&format!(
            "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            tls.ca, tls.cert, tls.key
        ));
        let auth = super::certs::dev_auth();
        config.push_str(&format!(
            "\n[cell_auth]\nadmin = {:?}\nagent = {:?}\nreader = {:?}\nnode = {:?}\n",
            auth.admin, auth.agent, auth.reader, auth.node
        ));
    }
    for cell in all.iter().filter(|c| c.region == region) {
        config.push_str(&format!(
            "\n[[cells]]\ncell_id = {:?}\nzone = {:?}\ntier = {:?}\nlisten = {:?}\ncapacity = {DEV_CELL_CAPACITY}\n",
            cell.cell_id, cell.zone, cell.tier, cell.endpoint
        ));
        if let Some(primary) = &cell.standby_of {
            let endpoint = all
                .iter()
                .find(|c| c.cell_id == *primary)
                .map(|c| c.endpoint.as_str())
                .unwrap_or_default();
            config.push_str(&format!(
                "standby_of = {primary:?}\nprimary_endpoint = {endpoint:?}\n"
            ));
        }
    }
    std::fs::write(&config_path, config).map_err(|e| io_error(&config_path, e))
}

/// How long an agent of an earlier run may take to go: it stops with the `cellplane dev` that
/// started it (within 200 ms), after its cells (each within 5 s).
const EARLIER_RUN_GRACE: Duration = Duration::from_secs(20);

/// Waits until no process holds an agent's data directory: an agent of an earlier run that
/// was killed outright is still stopping its cells. Starting a second one beside it would
/// only see its cells refused.
async fn wait_for_earlier_agent(dir: &Path) -> Result<(), DevError> {
    let deadline = Instant::now() + EARLIER_RUN_GRACE;
    let mut told = false;
    loop {
        match DirLock::acquire(dir) {
            Ok(_free) => return Ok(()),
            Err(DirLockError::Held { pid, .. }) if Instant::now() < deadline => {
                if !told {
                    println!(
                        "waiting for process {pid} of an earlier run to stop ({})",
                        dir.display()
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(DevError::Lock(err)),
        }
    }
}

/// The running agents of the dev system.
pub struct Agents {
    children: Vec<(String, Child)>,
    pub cells: Vec<DevCell>,
}

/// The `cell-agent` binary beside this executable.
fn agent_binary() -> Result<PathBuf, DevError> {
    let exe = std::env::current_exe().map_err(|e| io_error(Path::new("."), e))?;
    let path = exe.with_file_name("cell-agent");
    if path.exists() {
        Ok(path)
    } else {
        Err(DevError::MissingBinary(path))
    }
}

impl Agents {
    /// Starts one agent per region of [`LAYOUT`], each once an agent of an earlier run of
    /// this data directory is gone.
    pub async fn start(
        data_dir: &Path,
        control_plane: &[String],
        identities: Option<&BTreeMap<String, TlsPaths>>,
    ) -> Result<Self, DevError> {
        let binary = agent_binary()?;
        let agents_dir = data_dir.join("agents");
        std::fs::create_dir_all(&agents_dir).map_err(|e| io_error(&agents_dir, e))?;
        let mut children = Vec::new();
        let mut all = Vec::new();
        for (region, cells) in LAYOUT {
            all.extend(region_cells(&agents_dir, region, cells)?);
        }
        for (region, _) in LAYOUT {
            wait_for_earlier_agent(&agents_dir.join(region)).await?;
            let tls = identities.and_then(|i| i.get(&super::certs::agent_name(region)));
            write_config(&agents_dir, region, &all, tls)?;
            let log_path = agents_dir.join(format!("{region}.log"));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| io_error(&log_path, e))?;
            let mut command = Command::new(&binary);
            command.arg("serve");
            cellplane_api::serve::exit_with_this_process(&mut command);
            let child = command
                .arg("--region")
                .arg(region)
                .arg("--control-plane")
                .arg(control_plane.join(","))
                .arg("--config")
                .arg(agents_dir.join(format!("{region}.toml")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| io_error(&binary, e))?;
            children.push((region.to_string(), child));
        }
        Ok(Self {
            children,
            cells: all,
        })
    }

    /// The first agent that exited, if any: the dev system cannot run without it.
    pub fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|(region, child)| {
            matches!(child.try_wait(), Ok(Some(_))).then(|| region.clone())
        })
    }

    /// Asks every agent to stop its cells and waits for them.
    pub async fn stop(mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for (region, child) in &mut self.children {
            if tokio::time::timeout(AGENT_STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(%region, "agent did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
    }
}
