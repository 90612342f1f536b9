//! The `polaris` binary: `server`, `bootstrap`, `bench`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use polaris_mesh::config::{LogFormat, ServerConfig};

// jemalloc gives freed memory back to the system after a burst (thousands of proxies syncing at
// once) where glibc keeps it, and reports live heap for `/metrics` and the benchmarks.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "polaris",
    version,
    about = "polaris-mesh: service registry and Envoy xDS control plane"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane (registry, REST API, xDS).
    Server(Box<ServerArgs>),
    /// Run the sidecar agent: workload certificates from the CA, served to Envoy over SDS.
    Agent(AgentArgs),
    /// Run the Kubernetes controller on its own, writing to a control plane over REST.
    Controller(ControllerArgs),
    /// Print an Envoy bootstrap (from bootstrap-templates/envoy.yaml) to stdout.
    Bootstrap(polaris_mesh::bootstrap::BootstrapArgs),
    /// Run a benchmark and print its figures.
    Bench(polaris_mesh::bench::BenchArgs),
}

#[derive(Args)]
struct ServerArgs {
    /// YAML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration (file and flags) and exit: 0 and "configuration OK", or the first
    /// error naming its setting.
    #[arg(long)]
    check_config: bool,
    /// Where the registry is stored [default: embedded].
    #[arg(long, value_enum)]
    store: Option<polaris_mesh::config::StoreKind>,
    /// etcd client URLs, comma-separated (with --store etcd) [default: http://127.0.0.1:2379].
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this registry in etcd [default: /polaris].
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// Directory of the embedded store [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// REST API address [default: 127.0.0.1:8090].
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// ADS gRPC address [default: 127.0.0.1:15010].
    #[arg(long)]
    xds_addr: Option<SocketAddr>,
    /// Log filter, e.g. `info` or `polaris_mesh=debug` [default: info; env RUST_LOG wins].
    #[arg(long)]
    log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Largest xDS request decoded, in bytes [default: 4 MiB].
    #[arg(long)]
    xds_max_request_bytes: Option<usize>,
    /// Bytes of xDS requests decoded at once across all streams; past it reads wait [default: 64 MiB].
    #[arg(long)]
    xds_decode_budget_bytes: Option<usize>,
    /// Open connections on the xDS port at most [default: 20000].
    #[arg(long)]
    xds_max_connections: Option<usize>,
    /// Open connections on the REST port at most [default: 10000].
    #[arg(long)]
    http_max_connections: Option<usize>,
    /// Time a new connection has to send its first request, in milliseconds [default: 10000].
    #[arg(long)]
    first_request_timeout_ms: Option<u64>,
    /// SPIFFE trust domain [default: cluster.local].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Time each step of a TLS mode change has to reach every proxy, in milliseconds [default: 400].
    #[arg(long)]
    xds_tls_phase_ms: Option<u64>,
    /// REST authentication (X-Polaris-Token) [default: auto: on unless the REST port is loopback].
    #[arg(long, value_enum)]
    auth: Option<polaris_mesh::config::AuthMode>,
    /// ADS authentication (TLS, workload identity) [default: auto: on unless the xDS port is loopback].
    #[arg(long, value_enum)]
    xds_auth: Option<polaris_mesh::config::AuthMode>,
    /// The ADS port's certificate chain (PEM) [default: issued by the CA].
    #[arg(long)]
    xds_cert_file: Option<PathBuf>,
    /// The ADS port's key (PEM).
    #[arg(long)]
    xds_key_file: Option<PathBuf>,
    /// PolarisMesh's gRPC client API (polaris-go, polaris-java), or `off` [default: 127.0.0.1:8091].
    #[arg(long, value_parser = parse_optional_addr)]
    grpc_addr: Option<OptionalAddr>,
    /// Serve the global rate-limit service (gRPC) on this address [default: off].
    #[arg(long)]
    rls_addr: Option<SocketAddr>,
    /// The address sidecars reach the rate-limit service at, `host:port` (an IP or a DNS name such
    /// as a Kubernetes Service's) [default: --rls-addr].
    #[arg(long)]
    rls_advertise_addr: Option<polaris_mesh::model::HostPort>,
    /// File with the bootstrap admin token (else $POLARIS_ADMIN_TOKEN, else generated into
    /// <data-dir>/admin-token at the first start with auth on).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Serve the CA (polaris-security, HTTPS) on this address [default: off].
    #[arg(long)]
    ca_addr: Option<SocketAddr>,
    /// The CA's signing certificate (PEM) [default: a development root in the data directory].
    #[arg(long)]
    ca_cert_file: Option<PathBuf>,
    /// The CA's key (PEM).
    #[arg(long)]
    ca_key_file: Option<PathBuf>,
    /// Intermediates above the signing certificate, up to the root (PEM).
    #[arg(long)]
    ca_chain_file: Option<PathBuf>,
    /// The root (PEM), when the signing certificate is an intermediate.
    #[arg(long)]
    ca_root_file: Option<PathBuf>,
    /// The CA's material from the Kubernetes secret <namespace>/<name>.
    #[arg(long)]
    ca_secret: Option<String>,
    /// Certificate lifetime when a request asks for none, in seconds [default: 3600].
    #[arg(long)]
    ca_default_ttl_secs: Option<u64>,
    /// Longest certificate lifetime granted, in seconds [default: 86400].
    #[arg(long)]
    ca_max_ttl_secs: Option<u64>,
    /// Audience a ServiceAccount token must be for (repeatable) [default: polaris-ca].
    #[arg(long = "ca-audience")]
    ca_audiences: Vec<String>,
    /// Certificates per minute per identity [default: 10].
    #[arg(long)]
    ca_signs_per_minute: Option<u32>,
    /// How long a positive TokenReview is reused, in seconds (0: never) [default: 30].
    #[arg(long)]
    ca_review_cache_secs: Option<u64>,
    /// Another name for the CA's serving certificate (repeatable).
    #[arg(long = "ca-dns-name")]
    ca_dns_names: Vec<String>,
    /// Kubeconfig for the Kubernetes API [default: in-cluster, then $KUBECONFIG, ~/.kube/config].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Serve the sidecar injector's admission webhook (HTTPS, /inject) on this address.
    #[arg(long)]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate chain (PEM).
    #[arg(long)]
    webhook_cert_file: Option<PathBuf>,
    /// The webhook's key (PEM).
    #[arg(long)]
    webhook_key_file: Option<PathBuf>,
    /// A name for the webhook's certificate when the CA issues it (repeatable).
    #[arg(long = "webhook-dns-name")]
    webhook_dns_names: Vec<String>,
    /// Inject pods whose pod and namespace labels say nothing.
    #[arg(long)]
    inject_default: bool,
    /// Sync Kubernetes Services and EndpointSlices into the registry (the API from --kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    /// This cluster's name in what its controller writes [default: default].
    #[arg(long)]
    cluster_name: Option<String>,
    /// Which Services are synced [default: all].
    #[arg(long, value_enum)]
    sync_mode: Option<polaris_mesh::controller::translate::SyncMode>,
}

#[derive(Args)]
struct ControllerArgs {
    /// The control plane's REST API.
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    server: String,
    /// File with an admin token for the control plane [default: $POLARIS_TOKEN; none when the
    /// control plane's REST authentication is off].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// With an https server: the CA certificates (PEM) its certificate chains to.
    #[arg(long)]
    server_ca_file: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API [default: in-cluster, then $KUBECONFIG, ~/.kube/config].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This cluster's name in what its controller writes.
    #[arg(long, default_value = "default")]
    cluster_name: String,
    /// Which Services are synced.
    #[arg(long, value_enum, default_value = "all")]
    sync_mode: polaris_mesh::controller::translate::SyncMode,
    /// Everything is reconciled this often, in seconds.
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
    /// Log filter [default: info; env RUST_LOG wins].
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[derive(Args)]
struct AgentArgs {
    /// The CA (https://host:port; without a scheme, https).
    #[arg(long)]
    ca_addr: String,
    /// The root the CA's certificate chains to (PEM).
    #[arg(long)]
    ca_root: PathBuf,
    /// The ServiceAccount token file (a projected token for the CA's audience).
    #[arg(long, default_value = "/var/run/secrets/tokens/polaris-ca")]
    token_file: PathBuf,
    /// Namespace [default: from the token's claims].
    #[arg(long)]
    namespace: Option<String>,
    /// ServiceAccount [default: from the token's claims].
    #[arg(long)]
    service_account: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Workload key algorithm.
    #[arg(long, value_enum, default_value_t = polaris_mesh::agent::KeyType::EcdsaP256)]
    key_type: polaris_mesh::agent::KeyType,
    /// Certificate lifetime to ask for, in seconds (renewed at half of it).
    #[arg(long, default_value_t = 3600)]
    cert_ttl_secs: u64,
    /// The SDS socket.
    #[arg(long, default_value = "/var/run/polaris-sidecar/mtls/sds.sock")]
    sds_socket: PathBuf,
    /// Log filter [default: info; env RUST_LOG wins].
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    polaris_mesh::metrics::purge_in_background();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    match cli.cmd {
        Cmd::Server(a) => {
            let mut cfg = match &a.config {
                Some(p) => ServerConfig::from_file(p)?,
                None => ServerConfig::default(),
            };
            if let Some(v) = a.data_dir {
                cfg.data_dir = v;
            }
            if let Some(v) = a.store {
                cfg.store = v;
            }
            if !a.etcd_endpoints.is_empty() {
                cfg.etcd_endpoints = a.etcd_endpoints;
            }
            if let Some(v) = a.etcd_prefix {
                cfg.etcd_prefix = v;
            }
            if let Some(v) = a.http_addr {
                cfg.http_addr = v;
            }
            if let Some(v) = a.xds_addr {
                cfg.xds_addr = v;
            }
            if let Some(v) = a.log_level {
                cfg.log_level = v;
            }
            if let Some(v) = a.log_format {
                cfg.log_format = v;
            }
            if let Some(v) = a.xds_max_request_bytes {
                cfg.xds_max_request_bytes = v;
            }
            if let Some(v) = a.xds_decode_budget_bytes {
                cfg.xds_decode_budget_bytes = v;
            }
            if let Some(v) = a.xds_max_connections {
                cfg.xds_max_connections = v;
            }
            if let Some(v) = a.http_max_connections {
                cfg.http_max_connections = v;
            }
            if let Some(v) = a.first_request_timeout_ms {
                cfg.first_request_timeout_ms = v;
            }
            if let Some(v) = a.trust_domain {
                cfg.trust_domain = v;
            }
            if let Some(v) = a.xds_tls_phase_ms {
                cfg.xds_tls_phase_ms = v;
            }
            if let Some(v) = a.auth {
                cfg.auth = v;
            }
            if let Some(v) = a.xds_auth {
                cfg.xds_auth = v;
            }
            if a.rls_addr.is_some() {
                cfg.rls_addr = a.rls_addr;
            }
            if let Some(OptionalAddr(v)) = a.grpc_addr {
                cfg.grpc_addr = v;
            }
            cfg.kubernetes |= a.kubernetes;
            cfg.inject_default |= a.inject_default;
            if a.webhook_addr.is_some() {
                cfg.webhook_addr = a.webhook_addr;
            }
            if a.webhook_cert_file.is_some() {
                cfg.webhook_cert_file = a.webhook_cert_file;
            }
            if a.webhook_key_file.is_some() {
                cfg.webhook_key_file = a.webhook_key_file;
            }
            cfg.webhook_dns_names.extend(a.webhook_dns_names);
            if let Some(v) = a.cluster_name {
                cfg.cluster_name = v;
            }
            if let Some(v) = a.sync_mode {
                cfg.sync_mode = v;
            }
            if a.rls_advertise_addr.is_some() {
                cfg.rls_advertise_addr = a.rls_advertise_addr;
            }
            if a.xds_cert_file.is_some() {
                cfg.xds_cert_file = a.xds_cert_file;
            }
            if a.xds_key_file.is_some() {
                cfg.xds_key_file = a.xds_key_file;
            }
            if a.admin_token_file.is_some() {
                cfg.admin_token_file = a.admin_token_file;
            }
            cfg.admin_token = std::env::var("POLARIS_ADMIN_TOKEN").ok();
            macro_rules! set_opt {
                ($($f:ident),*) => {$( if a.$f.is_some() { cfg.$f = a.$f; } )*};
            }
            set_opt!(
                ca_addr,
                ca_cert_file,
                ca_key_file,
                ca_chain_file,
                ca_root_file,
                ca_secret,
                kubeconfig
            );
            macro_rules! set_val {
                ($($f:ident),*) => {$( if let Some(v) = a.$f { cfg.$f = v; } )*};
            }
            set_val!(
                ca_default_ttl_secs,
                ca_max_ttl_secs,
                ca_signs_per_minute,
                ca_review_cache_secs
            );
            if !a.ca_audiences.is_empty() {
                cfg.ca_audiences = a.ca_audiences;
            }
            if !a.ca_dns_names.is_empty() {
                cfg.ca_dns_names = a.ca_dns_names;
            }
            if a.check_config {
                cfg.validate()?;
                cfg.ca()?;
                println!("configuration OK");
                return Ok(());
            }
            init_tracing(&cfg.log_level, cfg.log_format);
            if cfg!(feature = "test-hooks") {
                tracing::warn!("built with the test-hooks feature: not for production");
            }
            rt.block_on(polaris_mesh::server::run(
                cfg,
                polaris_mesh::server::shutdown_signal(),
                |_| {},
            ))
        }
        Cmd::Agent(a) => {
            init_tracing(&a.log_level, LogFormat::Text);
            let config = polaris_mesh::agent::Config {
                ca_addr: a.ca_addr,
                ca_root: a.ca_root,
                token_file: a.token_file,
                namespace: a.namespace,
                service_account: a.service_account,
                trust_domain: a.trust_domain,
                key_type: a.key_type,
                cert_ttl: std::time::Duration::from_secs(a.cert_ttl_secs),
                sds_socket: a.sds_socket,
            };
            rt.block_on(polaris_mesh::agent::run(
                config,
                polaris_mesh::server::shutdown_signal(),
            ))
            .context("polaris agent")
        }
        Cmd::Controller(a) => {
            init_tracing(&a.log_level, LogFormat::Text);
            let token = match &a.token_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => std::env::var("POLARIS_TOKEN").ok(),
            };
            let roots = match &a.server_ca_file {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                }
                None => None,
            };
            let config = polaris_mesh::controller::run::Config {
                translate: polaris_mesh::controller::translate::Config {
                    cluster_name: a.cluster_name,
                    mode: a.sync_mode,
                },
                resync: std::time::Duration::from_secs(a.resync_secs),
                ..Default::default()
            };
            rt.block_on(async {
                let kube = polaris_mesh::server::kube_client(a.kubeconfig.as_deref()).await?;
                polaris_mesh::controller::run::standalone(
                    a.server,
                    token,
                    roots,
                    kube,
                    config,
                    polaris_mesh::server::shutdown_signal(),
                )
                .await
            })
            .context("polaris controller")
        }
        Cmd::Bootstrap(a) => {
            let text = polaris_mesh::bootstrap::render(&a)?;
            match &a.output {
                Some(path) => std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
        Cmd::Bench(a) => {
            init_tracing("warn", LogFormat::Text);
            rt.block_on(polaris_mesh::bench::run(a))
        }
    }
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy)]
struct OptionalAddr(Option<SocketAddr>);

fn parse_optional_addr(v: &str) -> Result<OptionalAddr, String> {
    if v == "off" {
        return Ok(OptionalAddr(None));
    }
    v.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("{v:?} is not an address (host:port) or off: {e}"))
}
