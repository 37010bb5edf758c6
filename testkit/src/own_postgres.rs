//! A PostgreSQL server of a test's own, for tests that stop the database or
//! change how it serves (TLS): `initdb` into a temporary directory, served on
//! a free port on 127.0.0.1 with its socket in that directory, stopped and
//! started again on the same port and data, and stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root, which tests here often are: then every
//! server command runs as the `postgres` OS user (Debian's `postgresql`
//! package creates it, with the binaries under /usr/lib/postgresql/<v>/bin),
//! and that user owns the directory.

use std::{
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::free_port;

pub struct OwnPostgres {
    pub port: u16,
    bin: PathBuf,
    /// Holds the data directory, the socket and the server log.
    dir: tempfile::TempDir,
    /// The `postgres` user's uid and gid, when the tests run as root.
    run_as: Option<(u32, u32)>,
}

impl OwnPostgres {
    /// A fresh cluster (user `postgres`, trust authentication), with
    /// `settings` added to postgresql.conf and `files` written into the data
    /// directory before the first start (e.g. `server.crt` and `server.key`
    /// for `ssl = on`, or a `pg_hba.conf` of the test's own); then started.
    ///
    /// initdb's own pg_hba.conf (with `--auth=trust`) already lets
    /// 127.0.0.1 connect for replication, which [`Self::replica`] needs; a
    /// `pg_hba.conf` in `files` replaces it and must allow that itself.
    pub async fn init(settings: &[(&str, &str)], files: &[(&str, &[u8])]) -> Self {
        let own = Self::unborn();
        let data = own.data_dir();
        let data = data.to_str().expect("a UTF-8 temporary directory");
        own.run(
            "initdb",
            &[
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await;
        own.serve_here();
        own.add_settings(settings);
        for (name, contents) in files {
            let path = own.data_dir().join(name);
            fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            // Private keys must be readable by their owner only.
            own.hand_over(&path, 0o600);
        }
        own.start().await;
        own
    }

    /// A streaming replica of this server on a free port: `pg_basebackup -R`
    /// from it, with `settings` added to its postgresql.conf (e.g.
    /// `recovery_min_apply_delay`, to make it lag), then started; it accepts
    /// (read-only) connections and is in recovery.
    ///
    /// It starts with a copy of this server's configuration and files (so
    /// `ssl = on` and its certificate carry over), and streams from it as
    /// `postgres` over 127.0.0.1, which this server's pg_hba.conf must allow
    /// (see [`Self::init`]). With `recovery_min_apply_delay`, everything
    /// committed here, `CREATE DATABASE` included, shows there only after the
    /// delay. Dropping either server leaves the other running.
    pub async fn replica(&self, settings: &[(&str, &str)]) -> OwnPostgres {
        let replica = Self::unborn();
        let data = replica.data_dir();
        let data = data.to_str().expect("a UTF-8 temporary directory");
        let port = self.port.to_string();
        // As this server's command: if it refuses, its log says why. `-R`
        // writes standby.signal and the primary_conninfo to stream from
        // here. A fast checkpoint, because the default spreads the backup's
        // first checkpoint out: after a CREATE DATABASE that took 93 s
        // rather than under one.
        self.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                data,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )
        .await;
        // The copied configuration still names this server's port and directory.
        replica.serve_here();
        replica.add_settings(&[("hot_standby", "on")]);
        replica.add_settings(settings);
        replica.start().await;
        replica
    }

    /// A free port and a fresh directory owned by the server user, with no
    /// cluster in it yet (dropping it then stops nothing, quietly).
    fn unborn() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rt-own-postgres-")
            .tempdir()
            .expect("a temporary directory");
        let own = Self {
            port: free_port(),
            bin: binaries(),
            dir,
            run_as: running_as_root().then(postgres_user),
        };
        own.hand_over(own.dir.path(), 0o700);
        own
    }

    /// Serves on its own port, on 127.0.0.1 only, with its socket in its own
    /// directory rather than the system's, and without fsync: the data is
    /// thrown away.
    fn serve_here(&self) {
        let port = self.port.to_string();
        let socket = self.dir.path().to_str().expect("a UTF-8 temporary directory");
        self.add_settings(&[
            ("port", &port),
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", socket),
            ("fsync", "off"),
        ]);
    }

    /// Appends `settings` to postgresql.conf; the last line for a setting
    /// wins, so they override what is there already.
    fn add_settings(&self, settings: &[(&str, &str)]) {
        let path = self.data_dir().join("postgresql.conf");
        let mut conf = String::from("\n");
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.display()));
    }

    /// DATABASE_URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server the way an operator would (fast: sessions are
    /// terminated) and waits until it is down.
    pub async fn stop(&self) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "-t", "30", "stop"],
        )
        .await;
    }

    /// Starts the server (again) on its port and data, and waits until it accepts connections.
    pub async fn start(&self) {
        let (data, log) = (self.data_dir(), self.dir.path().join("server.log"));
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
        .await;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs a PostgreSQL binary (as `postgres` when root) off the runtime's
    /// threads; panics with its output and the server log if it fails.
    async fn run(&self, program: &str, args: &[&str]) {
        let mut command = self.command(program, args);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if !output.status.success() {
            let log = fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!("{program} {args:?} failed: {}\nserver log:\n{log}", describe(&output));
        }
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.bin.join(program);
        let mut command = match self.run_as {
            Some(_) => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(path);
                command
            }
            None => Command::new(path),
        };
        // A working directory the postgres user may enter.
        command.args(args).current_dir(self.dir.path());
        command
    }

    /// Makes `path` the server user's, with `mode`.
    fn hand_over(&self, path: &Path, mode: u32) {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // Immediate: nothing to keep. The directory goes with `dir`.
        let data = self.data_dir();
        let _ = self
            .command(
                "pg_ctl",
                &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"],
            )
            .output();
    }
}

/// The newest installed PostgreSQL's binaries.
fn binaries() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql (scripts/services installs it)")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL with initdb under /usr/lib/postgresql/*/bin")
        .1
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| {
        let output = Command::new("id").args([flag, "postgres"]).output().unwrap();
        assert!(output.status.success(), "no `postgres` OS user: {}", describe(&output));
        String::from_utf8_lossy(&output.stdout).trim().parse::<u32>().unwrap()
    };
    (id("-u"), id("-g"))
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
