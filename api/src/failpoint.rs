//! Crash points: named places where a process can be made to die at once, as a SIGKILL
//! there would kill it, so that tests crash every step of a protocol in turn rather than at
//! whatever moment a timer hits. Inert unless armed: a process arms the points its
//! `CELLPLANE_CRASH_AT` environment variable names when it starts (`fail` crate).

/// The variable that arms crash points: `name` or `name=actions` (the `fail` crate's, such as
/// `3*off->return` to crash on the fourth pass), separated by `;`.
pub const ENV: &str = "CELLPLANE_CRASH_AT";

/// A `CELLPLANE_CRASH_AT` that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{ENV}: {0}")]
pub struct ArmError(String);

/// Arms the crash points `CELLPLANE_CRASH_AT` names, if it is set.
pub fn arm_from_env() -> Result<(), ArmError> {
    std::env::var(ENV).map_or(Ok(()), |points| arm(&points))
}

/// Arms `points`, in `CELLPLANE_CRASH_AT`'s format.
fn arm(points: &str) -> Result<(), ArmError> {
    for point in points.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, actions) = point.split_once('=').unwrap_or((point, "return"));
        fail::cfg(name.trim(), actions.trim()).map_err(|e| ArmError(format!("{point:?}: {e}")))?;
    }
    Ok(())
}

/// Ends the process here with SIGKILL, as a crash would, when `name` is armed. Not `exit`:
/// that runs the C library's exit handlers, which can wait on locks other threads hold.
pub fn crash_point(name: &str) {
    fail::fail_point!(name, |_| {
        eprintln!("crash point {name}: killing this process");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught or ignored; nothing runs after it is delivered.
        loop {
            std::thread::park();
        }
    });
}

/// Whether a process ended at a crash point (or any other SIGKILL).
pub fn killed(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_armed_with_their_actions_and_a_bad_one_is_named() {
        // Armed with an action that does nothing, so passing it here is safe.
        arm("test-plain; test-counted=2*off").expect("armed");
        let armed = fail::list();
        assert!(
            armed.contains(&("test-plain".into(), "return".into())),
            "{armed:?}"
        );
        assert!(
            armed.contains(&("test-counted".into(), "2*off".into())),
            "{armed:?}"
        );
        crash_point("test-counted");
        crash_point("never-armed");
        let error = arm("test-bad=no-such-action").expect_err("refused");
        assert!(error.to_string().contains("test-bad"), "{error}");
    }
}
