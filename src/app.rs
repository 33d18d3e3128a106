//! The composition root: turns a parsed command line into running parts, in a fixed order.
//!
//! `run`: merge and validate settings (exit 64 on any error, before anything else happens),
//! start logging, install signal handlers, bind every listener (all or nothing), log the
//! start-up line, serve, and on SIGTERM/SIGINT stop accepting and drain within the bound.
//! `simulate` follows the same order with the simulator as the handler.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::cli::{Cli, Command, RulesAction, RulesArgs, RunArgs, SimulateArgs};
use crate::config::{Config, ConfigError, RawSettings};
use crate::demo::{self, DemoError};
use crate::listener::{self, ConnInfo, ListenError, ServeOptions};
use crate::logging::{self, LoggingError};
use crate::proxy::{plain_text, Proxy};
use crate::redirect::RuleKeeper;
use crate::rules::{self, Backend, BackendChoice, RulesError, SystemRunner};
use crate::shutdown::StopSignals;
use crate::simulator::{Simulator, SimulatorConfig, SimulatorConfigError};
use crate::systemd::{self, ActivationError};
use crate::testbed::TestbedError;

/// Exit code for invalid configuration or usage (sysexits' EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code when a privilege is missing (sysexits' EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;
/// Exit code when a system tool is missing (sysexits' EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code after Ctrl-C (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code for any other failure to start or run.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of `rules status` when our rules are missing or changed (like `systemctl status`).
pub const EXIT_RULES_INCOMPLETE: u8 = 3;

/// Largest body the simulator reads from a request; IMDS requests carry none.
const SIM_MAX_REQUEST_BODY_BYTES: usize = 4_096;

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Settings were refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The simulator's user-data file could not be read.
    #[error("user_data: cannot read {path}: {source}")]
    UserData {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A simulator setting is outside what EC2 allows.
    #[error(transparent)]
    Simulator(#[from] SimulatorConfigError),
    /// Sockets handed over by systemd are unusable, or do not match the configuration.
    #[error(transparent)]
    Activation(#[from] ActivationError),
    /// The sockets systemd passed listen on another port than the rules redirect to.
    #[error("listen: systemd passed sockets on {found}, but the redirect sends traffic to port {port}: make the .socket unit's ListenStream= ports match the listen setting")]
    ActivationPort { found: String, port: u16 },
    /// Logging could not start.
    #[error(transparent)]
    Logging(#[from] LoggingError),
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The redirect rules could not be installed, checked or removed.
    #[error("redirect rules: {0}{hint}", hint = permission_hint(.0))]
    Rules(#[from] RulesError),
    /// `rules` was asked for with the redirect turned off.
    #[error("redirect: the rules subcommand needs the redirect on; drop --no-redirect / redirect = false")]
    RulesWithoutRedirect,
    /// `rules status` found our rules missing or changed (the status was printed).
    #[error("the redirect rules are missing or changed")]
    RulesIncomplete,
    /// The demo stopped early.
    #[error("demo: {0}")]
    Demo(#[from] DemoError),
    /// The async runtime or the signal handlers could not start.
    #[error("starting the runtime failed: {0}")]
    Runtime(#[source] std::io::Error),
}

impl AppError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_)
            | AppError::UserData { .. }
            | AppError::Simulator(_)
            | AppError::RulesWithoutRedirect
            | AppError::Activation(_)
            | AppError::ActivationPort { .. } => EXIT_USAGE,
            AppError::Rules(err) if err.is_permission_denied() => EXIT_NOPERM,
            AppError::Rules(err) if err.is_tool_missing() => EXIT_UNAVAILABLE,
            AppError::RulesIncomplete => EXIT_RULES_INCOMPLETE,
            AppError::Demo(DemoError::Interrupted) => EXIT_INTERRUPTED,
            AppError::Demo(DemoError::Testbed(TestbedError::NotRoot)) => EXIT_NOPERM,
            AppError::Listen(ListenError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                EXIT_NOPERM
            }
            _ => EXIT_FAILURE,
        }
    }
}

/// Runs the chosen subcommand to completion.
pub fn main_inner(cli: Cli) -> Result<(), AppError> {
    match cli.command {
        Command::Run(args) => {
            let config = load_config(&args)?;
            // Before any thread exists: this edits the environment.
            let inherited = systemd::inherited_listeners()?;
            logging::init(config.log_format, &config.log_level)?;
            block_on(|signals| run(config, inherited, signals.recv()))
        }
        Command::Rules(args) => rules_command(&args),
        Command::Demo => demo_command(),
        Command::Simulate(args) => {
            let config = simulator_config(&args)?;
            logging::init(args.log_format, &args.log_level)?;
            block_on(|signals| simulate(&args, config, signals.recv()))
        }
    }
}

/// Runs the demo with a Ctrl-C handler that only raises a flag, so the demo always gets to
/// remove what it built.
fn demo_command() -> Result<(), AppError> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let flag = interrupted.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let Ok(runtime) = runtime else {
            let _ = ready_tx.send(false);
            return;
        };
        runtime.block_on(async move {
            let handler = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
            let _ = ready_tx.send(handler.is_ok());
            if let Ok(mut handler) = handler {
                while handler.recv().await.is_some() {
                    flag.store(true, Ordering::SeqCst);
                    eprintln!("\ninterrupted: finishing the current step, then cleaning up");
                }
            }
        });
    });
    if ready_rx.recv() != Ok(true) {
        return Err(AppError::Runtime(std::io::Error::other(
            "cannot install the Ctrl-C handler",
        )));
    }
    Ok(demo::run(interrupted)?)
}

fn permission_hint(err: &RulesError) -> &'static str {
    if err.is_permission_denied() {
        " (changing firewall rules needs root or the CAP_NET_ADMIN capability)"
    } else {
        ""
    }
}

/// `imds-hop-proxy rules install|remove|status [--dry-run]`: the same rules `run` manages, by
/// hand. Prints to stdout; changes nothing with `--dry-run`.
/// `writeln!` into a String, which cannot fail.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

fn rules_command(args: &RulesArgs) -> Result<(), AppError> {
    let config = load_config(&args.run)?;
    let redirect = config.redirect.ok_or(AppError::RulesWithoutRedirect)?;
    let runner = SystemRunner::host();
    let spec = redirect.rule_spec();
    let backend = redirect.backend.resolve(&runner)?;
    let mut out = String::new();
    match (args.action, args.dry_run) {
        (RulesAction::Install, true) => {
            let snapshot = rules::Snapshot::gather(&runner)?;
            let blocks = rules::find_blocking_rules(&snapshot.rulesets());
            let exempt = rules::exemptions(&blocks, &spec.allowed)?;
            outln!(out, "# dry run: nothing is changed");
            out.push_str(&rules::plan(backend, &spec, &exempt).to_string());
        }
        (RulesAction::Install, false) => {
            let report = rules::install(&runner, backend, &spec)?;
            outln!(out, "installed the redirect rules with {backend}");
            for exempt in &report.exempted {
                outln!(
                    out,
                    "not redirected: {} (blocked by: {})",
                    exempt.pattern,
                    exempt.because
                );
            }
            for warning in &report.warnings {
                outln!(out, "warning: {warning}");
            }
        }
        (RulesAction::Remove, true) => {
            let status = rules::status(&runner, backend, &spec)?;
            outln!(
                out,
                "# backend: {backend} (dry run: nothing is changed); would remove:"
            );
            out.push_str(&status.text);
        }
        (RulesAction::Remove, false) => {
            // With `auto`, clean every backend present: rules left by an earlier choice (or by
            // an older version) must not survive an uninstall.
            let backends = match redirect.backend {
                BackendChoice::Auto => Backend::ALL.to_vec(),
                BackendChoice::Fixed(backend) => vec![backend],
            };
            for backend in backends {
                match rules::remove(&runner, backend) {
                    Ok(()) => outln!(out, "removed the redirect rules ({backend})"),
                    Err(err)
                        if err.is_tool_missing() && redirect.backend == BackendChoice::Auto => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
        (RulesAction::Status, _) => {
            let status = rules::status(&runner, backend, &spec)?;
            let verdict = if status.complete {
                "complete"
            } else {
                "missing or changed"
            };
            outln!(out, "# backend: {backend}; rules {verdict}");
            out.push_str(&status.text);
            for problem in &status.problems {
                outln!(out, "# problem: {problem}");
            }
            if !status.complete {
                print_stdout(&out);
                return Err(AppError::RulesIncomplete);
            }
        }
    }
    print_stdout(&out);
    Ok(())
}

/// Writes a command's report; a reader that went away (`| head`) is not an error.
fn print_stdout(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Merges flags and environment (already in `args`) over the TOML file, then validates.
pub fn load_config(args: &RunArgs) -> Result<Config, ConfigError> {
    let file = match &args.config {
        Some(path) => RawSettings::from_file(path)?,
        None => RawSettings::default(),
    };
    args.settings.clone().or(file).validate()
}

fn block_on<F, Fut>(body: F) -> Result<(), AppError>
where
    F: FnOnce(StopSignals) -> Fut,
    Fut: Future<Output = Result<(), AppError>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    runtime.block_on(async {
        let signals = StopSignals::install().map_err(AppError::Runtime)?;
        body(signals).await
    })
}

/// Serves the proxy until `shutdown` resolves (a stop signal in production, a test's future in
/// tests), then drains. `inherited` are listening sockets from systemd's socket activation;
/// without them the `listen` addresses are bound.
///
/// Order: open the listeners; serve at once (connections waiting in a socket unit's backlog
/// across a restart are answered without waiting for the rules); install the rules alongside;
/// report `started` and READY once they are in place; keep them while serving; remove them
/// after the drain. A failed install stops serving and returns the error.
pub async fn run(
    config: Config,
    inherited: Vec<std::net::TcpListener>,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), AppError> {
    let listeners = open_listeners(&config, inherited)?;
    let listen = addresses(&listeners);
    let _watchdog = systemd::watchdog_interval()
        .map(|interval| AbortOnDrop(tokio::spawn(systemd::watchdog(interval))));
    let options = ServeOptions {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        max_header_bytes: config.max_header_bytes,
        response_ttl: Some(config.response_ttl),
        drain_timeout: config.drain_timeout,
        socket_handle: false,
        original_destination: config.redirect.is_some(),
    };
    let proxy = Arc::new(Proxy::new(&config));
    let handler = move |request, conn| proxy.clone().handle(request, conn);
    let (abort, aborted) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        tokio::select! {
            signal = shutdown => {
                systemd::stopping();
                info!(signal, "stop requested");
            }
            _ = aborted => info!("stopping: the redirect rules could not be installed"),
        }
    };
    let serving = listener::serve(listeners, options, handler, stop);
    tokio::pin!(serving);

    let install = async {
        match &config.redirect {
            None => Ok(None),
            Some(redirect) => RuleKeeper::install(redirect).await.map(Some),
        }
    };
    tokio::pin!(install);
    let installed = tokio::select! {
        installed = &mut install => installed,
        report = &mut serving => {
            // Stopped while the rules went in: let the install finish (its commands are already
            // running), then take the rules out again.
            if let Ok(Some(keeper)) = install.await {
                keeper.finish().await;
            }
            info!(abandoned = report.abandoned, "stopped");
            return Ok(());
        }
    };
    let keeper = match installed {
        Ok(keeper) => keeper,
        Err(err) => {
            let _ = abort.send(());
            serving.await;
            return Err(err.into());
        }
    };
    log_started(&config, &listen, keeper.as_ref());
    systemd::ready(&match &keeper {
        Some(keeper) => format!(
            "serving on {listen}; redirect rules in place ({})",
            keeper.backend()
        ),
        None => format!("serving on {listen}; no redirect rules (--no-redirect)"),
    });

    // The rules are kept (checked, restored) until the drain is over, then removed.
    let report = match &keeper {
        Some(keeper) => tokio::select! {
            report = &mut serving => report,
            never = keeper.keep() => match never {},
        },
        None => serving.await,
    };
    if let Some(keeper) = keeper {
        keeper.finish().await;
    }
    info!(abandoned = report.abandoned, "stopped");
    Ok(())
}

/// The listening sockets: systemd's when it passed some, else freshly bound. Bound first, so a
/// port conflict never leaves rules pointing at someone else's listener.
fn open_listeners(
    config: &Config,
    inherited: Vec<std::net::TcpListener>,
) -> Result<Vec<TcpListener>, AppError> {
    if inherited.is_empty() {
        return Ok(bind_all(&config.listen)?);
    }
    let listeners: Vec<TcpListener> = inherited
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<Result<_, _>>()
        .map_err(|source| ActivationError::NotTcp { index: 0, source })?;
    if let Some(redirect) = &config.redirect {
        let ports: Vec<u16> = listeners
            .iter()
            .filter_map(|listener| listener.local_addr().ok())
            .map(|addr| addr.port())
            .collect();
        if ports.iter().any(|port| *port != redirect.port) {
            return Err(AppError::ActivationPort {
                found: addresses(&listeners),
                port: redirect.port,
            });
        }
    }
    info!(listen = %addresses(&listeners), "using the listening sockets systemd passed");
    Ok(listeners)
}

fn log_started(config: &Config, listen: &str, keeper: Option<&RuleKeeper>) {
    let allowed = config
        .redirect
        .as_ref()
        .map_or_else(String::new, |redirect| {
            let names: Vec<&str> = redirect
                .allowed_interfaces
                .iter()
                .map(|p| p.as_str())
                .collect();
            names.join(",")
        });
    info!(
        listen = %listen,
        redirect = %keeper.map_or("off".to_owned(), |k| k.backend().to_string()),
        allowed_interfaces = %allowed,
        upstream = %config.upstream.authority,
        response_ttl = config.response_ttl,
        max_connections = config.max_connections,
        header_read_timeout_ms = config.header_read_timeout.as_millis() as u64,
        max_header_bytes = config.max_header_bytes,
        max_request_body_bytes = config.max_request_body_bytes,
        max_response_body_bytes = config.max_response_body_bytes,
        upstream_connect_timeout_ms = config.upstream_connect_timeout.as_millis() as u64,
        upstream_response_timeout_ms = config.upstream_response_timeout.as_millis() as u64,
        drain_timeout_ms = config.drain_timeout.as_millis() as u64,
        version = env!("CARGO_PKG_VERSION"),
        "started"
    );
    if config.upstream_budget_exceeds_sdk_timeout() {
        warn!(
            "upstream_connect_timeout_ms + upstream_response_timeout_ms reach the SDKs' 1 s \
             IMDS timeout: when IMDS is slow, clients time out before they see our 504"
        );
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the simulator until `shutdown` resolves.
pub async fn simulate(
    args: &SimulateArgs,
    config: SimulatorConfig,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), AppError> {
    let listeners = bind_all(&args.listen)?;
    info!(
        listen = %addresses(&listeners),
        hop_limit = config.hop_limit,
        tokens = %config.tokens,
        role = %config.role,
        credential_lifetime_secs = config.credential_lifetime.as_secs(),
        user_data = config.user_data.is_some(),
        "simulator started"
    );
    let hop_limit = config.hop_limit;
    let simulator = Arc::new(Simulator::new(config));
    let options = ServeOptions {
        max_connections: crate::config::DEFAULT_MAX_CONNECTIONS as usize,
        header_read_timeout: std::time::Duration::from_millis(
            crate::config::DEFAULT_HEADER_READ_TIMEOUT_MS,
        ),
        max_header_bytes: crate::config::DEFAULT_MAX_HEADER_BYTES as usize,
        // The kernel's default TTL for everything but token answers, like the real service.
        response_ttl: None,
        drain_timeout: std::time::Duration::from_millis(crate::config::DEFAULT_DRAIN_TIMEOUT_MS),
        socket_handle: true,
        original_destination: false,
    };
    let handler =
        move |request, conn| simulator_answer(simulator.clone(), hop_limit, request, conn);
    let stop = async move {
        let signal = shutdown.await;
        info!(signal, "stop requested");
    };
    listener::serve(listeners, options, handler, stop).await;
    info!("simulator stopped");
    Ok(())
}

async fn simulator_answer(
    simulator: Arc<Simulator>,
    hop_limit: u8,
    request: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, SIM_MAX_REQUEST_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return plain_text(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            )
        }
    };
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let answer = simulator.respond(
        &parts.method,
        path_and_query,
        &parts.headers,
        &body,
        SystemTime::now(),
    );
    if answer.hop_limited {
        if let Some(socket) = &conn.socket {
            // What the real IMDS does to token answers: the TTL is the hop limit, so each
            // forward on the way back takes one off and the kernel drops it at zero.
            let set = if conn.peer.is_ipv6() {
                socket.set_unicast_hops_v6(hop_limit.into())
            } else {
                socket.set_ttl_v4(hop_limit.into())
            };
            if let Err(err) = set {
                warn!(client = %conn.peer, cause = %err, "could not set the token answer's hop limit");
            }
        }
    }
    info!(
        client = %conn.peer,
        method = %parts.method,
        path = %parts.uri.path(),
        status = answer.response.status().as_u16(),
        hop_limited = answer.hop_limited,
        "request"
    );
    answer.response.map(Full::new)
}

fn simulator_config(args: &SimulateArgs) -> Result<SimulatorConfig, AppError> {
    let defaults = SimulatorConfig::default();
    let user_data = if args.no_user_data {
        None
    } else if let Some(path) = &args.user_data {
        Some(read_user_data(path)?)
    } else {
        defaults.user_data
    };
    let config = SimulatorConfig {
        hop_limit: args.hop_limit,
        tokens: args.tokens,
        role: args.role.clone(),
        credential_lifetime: std::time::Duration::from_secs(args.credential_lifetime_secs),
        user_data,
    };
    config.validate()?;
    Ok(config)
}

fn read_user_data(path: &Path) -> Result<Bytes, AppError> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|source| AppError::UserData {
            path: path.to_owned(),
            source,
        })
}

fn bind_all(addrs: &[std::net::SocketAddr]) -> Result<Vec<TcpListener>, ListenError> {
    addrs.iter().map(|addr| listener::bind(*addr)).collect()
}

fn addresses(listeners: &[TcpListener]) -> String {
    listeners
        .iter()
        .filter_map(|listener| listener.local_addr().ok())
        .map(|addr| addr.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
